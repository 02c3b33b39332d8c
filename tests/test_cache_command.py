"""``scrapy polite-cache``: entries per namespace, and clearing, through the real entry point."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scrapy_polite.httpcache import cache_usage
from scrapy_polite.testing.redis_server import RedisServer
from tests.conftest import html_response, scrapy_command


def _polite_cache(
    tmp_path: Path, redis_server: RedisServer, *args: str
) -> subprocess.CompletedProcess:
    return scrapy_command(
        tmp_path, "polite-cache", *args, "-s", f"POLITE_REDIS_URL={redis_server.url}"
    )


def test_tool_shows_entries_and_bytes_per_namespace_and_clears_one(
    open_storage, redis_server, tmp_path
):
    for name, count in (("alpha", 3), ("beta", 2)):
        storage = open_storage(name)
        for i in range(count):
            storage.store(html_response(f"http://example.com/{i}"))
        storage.close()
    client = redis_server.client()
    client.set("unrelated:key", "x")
    usage = cache_usage(client)
    alpha_bytes = sum(client.strlen(k) for k in client.keys("polite:httpcache:alpha:*"))
    assert (usage["alpha"].entries, usage["alpha"].bytes) == (3, alpha_bytes)
    assert usage["beta"].entries == 2

    stats = _polite_cache(tmp_path, redis_server, "stats")
    assert stats.returncode == 0, stats.stderr
    lines = {line.split()[0]: line.split()[1:] for line in stats.stdout.splitlines()[2:]}
    assert lines["alpha"] == ["3", str(alpha_bytes)]
    assert lines["beta"][0] == "2"
    assert lines["(total)"][0] == "5"

    refused = _polite_cache(tmp_path, redis_server, "clear")
    assert refused.returncode == 2
    assert "--namespace" in refused.stderr
    assert client.dbsize() == 6

    cleared = _polite_cache(tmp_path, redis_server, "clear", "--namespace", "alpha")
    assert cleared.returncode == 0, cleared.stderr
    assert "alpha: 3 entries deleted" in cleared.stdout
    assert client.keys("polite:httpcache:alpha:*") == []
    assert len(client.keys("polite:httpcache:beta:*")) == 2
    assert client.get("unrelated:key") == b"x"
