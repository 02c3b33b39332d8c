"""``scrapy polite-report``: the cluster's report from Redis, through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

from scrapy_polite.report import report_key
from scrapy_polite.testing.redis_server import RedisServer
from tests.conftest import scrapy_command


def _worker_entry(worker: str, host: str, times: list[float]) -> str:
    report = {
        "spider": "shop",
        "started": times[0],
        "finished": times[-1],
        "finish_reason": "finished",
        "items_processed_in_pool": None,
        "domains": {
            host: {
                "requests": len(times),
                "responses": {"2xx": len(times)},
                "robots": "file",
                "forbidden": 1,
                "backoff_answers": 0,
                "waits_honoured": [],
                "cache_hits": 0,
                "cache_misses": None,
                "items": len(times),
                "items_dropped": 0,
                "delay_source": "POLITE_DELAY",
                "configured_per_minute": 120.0,
            }
        },
    }
    return json.dumps({"worker": worker, "report": report, "departures": {host: times}})


def test_the_command_merges_the_workers_reports_and_writes_json_and_html(
    redis_server: RedisServer, tmp_path: Path
):
    client = redis_server.client()
    key = report_key("shop")
    # Two workers took turns on one host: 0.5 s apart in all, 1.0 s apart in each.
    client.hset(key, "w1", _worker_entry("w1", "127.0.0.2", [100.0, 101.0, 102.0]))
    client.hset(key, "w2", _worker_entry("w2", "127.0.0.2", [100.5, 101.5]))
    client.hset(key, "junk", b"\x80 not json")
    url = f"--redis-url={redis_server.url}"
    shown = scrapy_command(
        tmp_path, "polite-report", "shop", url, "--json", "r.json", "--html", "r.html"
    )
    assert shown.returncode == 0, shown.stderr
    assert "Politeness report for spider 'shop' (1 domains, 2 workers: finished)" in shown.stdout
    assert "workers: w1, w2" in shown.stdout
    merged = json.loads((tmp_path / "r.json").read_text())
    entry = merged["domains"]["127.0.0.2"]
    assert entry["requests"] == 5
    assert entry["forbidden"] == 2
    assert (entry["gap_min"], entry["gap_median"], entry["gap_mean"]) == (0.5, 0.5, 0.5)
    assert entry["requests_per_minute"] == 120.0
    assert (tmp_path / "r.html").read_text().count("<svg") == 1

    cleared = scrapy_command(tmp_path, "polite-report", "shop", url, "--clear")
    assert "shop: report deleted" in cleared.stdout
    assert client.exists(key) == 0
    missing = scrapy_command(tmp_path, "polite-report", "shop", url)
    assert missing.returncode == 1
    assert "No politeness report for spider 'shop'" in missing.stdout


def test_the_command_without_a_redis_url_says_which_settings_to_set(tmp_path: Path):
    result = scrapy_command(tmp_path, "polite-report", "shop")
    assert result.returncode != 0
    assert "POLITE_CLUSTER_REDIS_URL" in result.stderr + result.stdout
