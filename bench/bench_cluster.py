"""Cluster benchmark: one worker against three in cluster mode, Redis local and 1 ms away.

Run from the repository root: ``python -m bench.bench_cluster [--hosts 30] [--pages 30]``,
or ``python -m bench.bench_cluster --scale`` for the case where the workers, not the
hosts' pace, are the limit (200 hosts x 5 pages at 0.05 s, 1, 2 and 3 workers; it also
prints Redis commands/s).

A crawl of ``--hosts`` local hosts (127.0.0.2, ...) with ``--pages`` pages each and a
0.5 s delay, through scrapy-redis with scrapy-polite's cluster mode, crawled by one
worker and by three, alternating, each against a local Redis and against the same
Redis behind a TCP proxy that delays every chunk by 0.5 ms each way (1 ms round trip,
as when Redis runs on another machine). For each it prints pages/s, the shortest gap
any host saw, Redis calls per page (a script counts once) and commands per page (those
inside scripts too), the reservation's latency (p50, p99) and the
reactor's lag (p50, p99, from a 10 ms timer in every worker), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from scrapy import signals

from scrapy_polite.testing.crawl import finish_crawl, start_crawl
from scrapy_polite.testing.proxy import DelayProxy
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Site

DELAY = 0.5


class LagProbe:
    """An extension: how late a 10 ms timer fires on the worker's reactor (stats, ms)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.lags: list[float] = []
        self.call: Any = None
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> LagProbe:
        return cls(crawler)

    def opened(self) -> None:
        from twisted.internet.task import LoopingCall

        self.expected = time.monotonic() + 0.01
        self.call = LoopingCall(self.tick)
        self.call.start(0.01, now=False)

    def tick(self) -> None:
        now = time.monotonic()
        self.lags.append(max(0.0, now - self.expected) * 1000)
        self.expected = now + 0.01

    def closed(self) -> None:
        if self.call is not None and self.call.running:
            self.call.stop()
        lags = sorted(self.lags) or [0.0]
        stats = self.crawler.stats
        stats.set_value("bench/lag_p50_ms", lags[len(lags) // 2])
        stats.set_value("bench/lag_p99_ms", lags[int(len(lags) * 0.99)])


def _run(
    site: Site, hosts: list[str], redis: RedisServer, url: str, workers: int, delay: float
) -> dict:
    site.reset()
    for host in hosts:
        site.set_pages(host, site.default_pages)
    client = redis.client()
    client.flushall()
    commands = int(client.info("stats")["total_commands_processed"])
    sent_before = _sent(client)
    settings = {
        "ADDONS": {"scrapy_polite.Addon": 100},
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_polite.cluster.DupeFilter",
        "REDIS_URL": url,
        "POLITE_DELAY": delay,
        "LOG_LEVEL": "WARNING",
        "EXTENSIONS": {"bench.bench_cluster.LagProbe": 0},
    }
    urls = json.dumps([site.url(h, "/") for h in hosts])
    start = time.monotonic()
    started = [
        start_crawl("tests.spiders.SharedSpider", settings, args={"urls": urls})
        for _ in range(workers)
    ]
    results = [finish_crawl(*s, timeout=900) for s in started]
    elapsed = time.monotonic() - start
    for result in results:
        assert result.returncode == 0, result.log[-3000:]
    pages = len(site.page_hits())
    expected = len(hosts) * (site.default_pages + 1)
    assert pages == expected, f"{pages} pages fetched, {expected} expected"
    gaps = [g for h in hosts for g in site.gaps(h)]
    used = int(client.info("stats")["total_commands_processed"]) - commands - 3
    sent = _sent(client) - sent_before
    return {
        "pages/s": pages / elapsed,
        "min gap": min(gaps),
        "mean gap": statistics.mean(gaps),
        "calls/page": sent / pages,
        "commands/page": used / pages,
        "commands/s": used / elapsed,
        "reserve p50": statistics.median(r.stat("polite/cluster/reserve_ms_p50") for r in results),
        "reserve p99": max(r.stat("polite/cluster/reserve_ms_p99") for r in results),
        "lag p50": statistics.median(r.stat("bench/lag_p50_ms") for r in results),
        "lag p99": max(r.stat("bench/lag_p99_ms") for r in results),
        "alone": sum(r.stat("polite/cluster/alone") for r in results),
        "late": sum(r.stat("polite/cluster/late") for r in results),
        "shifted": sum(r.stat("polite/cluster/shifted") for r in results),
    }


def _sent(client: Any) -> int:
    """Calls clients sent (scripts count once; the commands inside them do not).

    The dupefilter's call is its SISMEMBER; its SADD runs inside the push script
    (Redis counts commands run by scripts too, so SADD is left out)."""
    stats = client.info("commandstats")
    sent = ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_sismember", "cmdstat_get", "cmdstat_ping")
    return sum(int(stats[name]["calls"]) for name in sent if name in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=None)
    parser.add_argument("--pages", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", action="store_true", help="many hosts, a short delay")
    args = parser.parse_args()
    delay = 0.05 if args.scale else DELAY
    args.hosts = args.hosts or (200 if args.scale else 30)
    args.pages = args.pages or (5 if args.scale else 30)
    counts = (1, 2, 3) if args.scale else (1, 3)
    hosts = [f"127.0.{i // 256}.{i % 256}" for i in range(2, 2 + args.hosts)]
    rows: dict[str, list[dict]] = {}
    with Site(hosts, pages=args.pages) as site, RedisServer() as redis:
        proxy = DelayProxy(("127.0.0.1", redis.port), 0.0005)
        far = f"redis://127.0.0.1:{proxy.port}/0"
        variants = [
            (f"{n} worker{'s' if n > 1 else ''}, {where}", url, n)
            for where, url in (("Redis local", redis.url), ("Redis 1 ms away", far))
            for n in counts
        ]
        print(
            f"{args.hosts} hosts x {args.pages} pages, {delay} s delay, cluster mode, "
            f"{args.rounds} alternating rounds"
        )
        for round_ in range(args.rounds):
            for name, url, workers in variants if round_ % 2 == 0 else variants[::-1]:
                row = _run(site, hosts, redis, url, workers, delay)
                rows.setdefault(name, []).append(row)
                print(
                    f"  round {round_ + 1} {name:28s} "
                    + "  ".join(f"{k} {v:.3f}" for k, v in row.items()),
                    flush=True,
                )
        proxy.close()
    print("\nmedians (range) over the rounds")
    for name, values in rows.items():
        cells = []
        for key in values[0]:
            column = [v[key] for v in values]
            cells.append(
                f"{key} {statistics.median(column):.3f} ({min(column):.3f}-{max(column):.3f})"
            )
        print(f"  {name:28s} " + "; ".join(cells))
    for where in ("Redis local", "Redis 1 ms away"):
        one = [v["pages/s"] for v in rows[f"1 worker, {where}"]]
        for n in counts[1:]:
            more = [v["pages/s"] for v in rows[f"{n} workers, {where}"]]
            ratios = [t / o for t, o in zip(more, one, strict=True)]
            print(
                f"  throughput {n} workers / 1, {where}: {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f})"
            )
    floor = min(v["min gap"] for values in rows.values() for v in values)
    print(f"  shortest gap at any host in any crawl: {floor:.3f} s (floor {delay} s)")


if __name__ == "__main__":
    main()
