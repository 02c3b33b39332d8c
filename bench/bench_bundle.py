"""The whole bundle's cost: stock Scrapy against Scrapy with every scrapy-polite component on.

Run from the repository root: ``python -m bench.bench_bundle [--rounds 4] [--pages 2000]``.

A crawl of ``--pages`` pages over 4 local hosts, alternating rounds, each crawl
in its own process. "stock" is Scrapy with its defaults; "bundle" is the add-on
with delays at 0, robots.txt obeyed (RFC 9309 middleware), the Redis HTTP cache
storing every page (a fresh namespace each round: all misses), and the process
pipeline running a trivial function in worker processes. Both allow 16 requests
per host (``CONCURRENT_REQUESTS_PER_DOMAIN = 16``, as many as
``CONCURRENT_REQUESTS``), so that the per-host limit never binds and the figure is
the bundle's cost, not stock Scrapy's per-host concurrency leak on the asyncio
reactor. Prints pages/s, the ratio bundle / stock, the crawl process's peak RSS,
and the CPU per page of the crawl process and the processes it waited for (the
worker pool's included, with their start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from bench.bench_delays import children_cpu
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import HOSTS, Site

COMMON = {
    "LOG_LEVEL": "WARNING",
    "CONCURRENT_REQUESTS": 16,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 16,
    "EXTENSIONS": {"bench.bench_memory.PeakMemory": 0},
}


def passthrough(fields: dict[str, Any]) -> dict[str, Any]:
    """The worker pool's trivial function."""
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pages", type=int, default=2000)
    args = parser.parse_args()
    print(f"load average at start: {_load()}  ({os.cpu_count()} CPUs, shared machine)")
    hosts = HOSTS[:4]
    figures: dict[str, list[dict[str, float]]] = {"stock": [], "bundle": []}
    with Site(hosts) as site, RedisServer() as redis_server:
        per_host = -(-args.pages // len(hosts))
        urls = [site.url(h, f"/p/{i}") for i in range(per_host) for h in hosts][: args.pages]
        for r in range(args.rounds):
            names = ["stock", "bundle"] if r % 2 == 0 else ["bundle", "stock"]
            for name in names:
                settings = dict(COMMON)
                if name == "bundle":
                    settings |= _bundle(redis_server, r)
                figures[name].append(_crawl(urls, settings))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{n} {figures[n][-1]['rate']:.0f} pages/s, {figures[n][-1]['rss']:.0f} MiB, "
                    f"{figures[n][-1]['cpu']:.0f} µs CPU/page"
                    for n in ("stock", "bundle")
                )
                + f" (load {_load()})",
                flush=True,
            )
    _report(figures, args)
    print(f"load average at end: {_load()}")


def _bundle(redis_server: RedisServer, round_: int) -> dict[str, Any]:
    return {
        "ADDONS": {"scrapy_polite.Addon": 100},
        "POLITE_DELAY": 0,
        "ROBOTSTXT_OBEY": True,
        "HTTPCACHE_ENABLED": True,
        "POLITE_HTTPCACHE_REDIS_URL": redis_server.url,
        "POLITE_HTTPCACHE_PREFIX": f"bundle-{round_}-{time.monotonic_ns()}",  # all misses
        "POLITE_PROCESS_FUNCTION": "bench.bench_bundle.passthrough",
    }


def _crawl(urls: list[str], settings: dict[str, Any]) -> dict[str, float]:
    before = children_cpu()
    args = {"urls": json.dumps(urls)}
    result = crawl("tests.spiders.PagesSpider", settings, args=args, timeout=900)
    cpu = children_cpu() - before
    if len(result.items) != len(urls):
        raise SystemExit(f"crawl got {len(result.items)} of {len(urls)} pages")
    return {
        "rate": len(urls) / float(result.stat("elapsed_time_seconds")),
        "rss": result.stat("bench/maxrss_kib") / 1024,
        "cpu": cpu / len(urls) * 1e6,
    }


def _report(figures: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def ratios(key: str) -> list[float]:
        pairs = zip(figures["bundle"], figures["stock"], strict=True)
        return [b[key] / s[key] for b, s in pairs]

    print(f"\n== {args.pages} pages over 4 hosts, {args.rounds} alternating rounds; medians")
    for name in ("stock", "bundle"):
        runs = figures[name]
        print(
            f"  {name:<7} {statistics.median(f['rate'] for f in runs):6.0f} pages/s  "
            f"peak RSS {statistics.median(f['rss'] for f in runs):6.1f} MiB  "
            f"CPU {statistics.median(f['cpu'] for f in runs):6.0f} µs/page"
        )
    for key, what in (("rate", "throughput"), ("rss", "peak RSS"), ("cpu", "CPU per page")):
        values = ratios(key)
        print(
            f"  bundle / stock, {what:<12} {statistics.median(values):.3f} "
            f"(rounds {min(values):.3f}-{max(values):.3f})"
        )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
