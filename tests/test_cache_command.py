"""``scrapy polite-cache``: entries per namespace, and clearing, through the real entry point."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

from scrapy_polite.httpcache import cache_usage
from scrapy_polite.testing.redis_server import RedisServer
from tests.conftest import html_response

ROOT = Path(__file__).resolve().parent.parent


def _polite_cache(
    tmp_path: Path, redis_server: RedisServer, *args: str
) -> subprocess.CompletedProcess:
    """``scrapy polite-cache ...`` with the entry point declared in setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    dist = tmp_path / "polite_cache_entry_point-0.dist-info"
    if not dist.exists():
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: polite-cache-entry-point\nVersion: 0\n"
        )
        entry_points = config["options.entry_points"]["scrapy.commands"]
        (dist / "entry_points.txt").write_text(f"[scrapy.commands]\n{entry_points.strip()}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "scrapy",
            "polite-cache",
            *args,
            "-s",
            f"POLITE_REDIS_URL={redis_server.url}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
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
