"""Delays benchmark: the add-on's overhead, the per-domain limit at the site, and fairness.

Run from the repository root: ``python -m bench.bench_delays [--rounds 3] [--pages 2000]``.

1. Overhead: the same crawl of ``--pages`` pages over 4 local hosts with no delays, stock
   Scrapy vs Scrapy with the add-on (``POLITE_DELAY = 0``), after one warm-up crawl of each,
   in ``--overhead-rounds`` alternating rounds. Prints pages/s of each round and the median
   and range of the rounds' ratios add-on / stock.
2. Per-domain concurrency: ``CONCURRENT_REQUESTS_PER_DOMAIN = 2``, no delay, pages
   answering in 50 ms; the most requests the site saw in flight to one host, stock vs
   add-on, on the asyncio and epoll reactors.
3. Fairness: three fast hosts (0.05 s delay, 20 pages each) crawled alone, then beside a
   slow host (2 s delay); the time the fast hosts take to finish, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from typing import Any

from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.site import Site

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}}
QUIET = {"LOG_LEVEL": "WARNING"}


def _urls(site: Site, hosts: tuple[str, ...] | list[str], per_host: int) -> list[str]:
    return [site.url(h, f"/p/{i}") for i in range(per_host) for h in hosts]


def _run(urls: list[str], settings: dict[str, Any], reactor: str = "asyncio") -> dict[str, Any]:
    result = crawl(
        "tests.spiders.PagesSpider",
        {**QUIET, **settings},
        args={"urls": json.dumps(urls)},
        reactor=reactor,
    )
    assert len(result.items) == len(urls), f"{len(result.items)} of {len(urls)} pages"
    return result.stats


def overhead(site: Site, pages: int, rounds: int) -> None:
    urls = _urls(site, HOSTS, pages // len(HOSTS))
    speeds: dict[str, list[float]] = {"stock": [], "add-on": []}
    cpu: dict[str, list[float]] = {"stock": [], "add-on": []}  # µs of the crawl's CPU per page
    variants = {"stock": {}, "add-on": {**ADDON, "POLITE_DELAY": 0}}
    print(f"1. overhead: {len(urls)} pages over {len(HOSTS)} hosts, no delay, asyncio reactor")
    for name in variants:  # a warm-up crawl of each, not counted: the first crawls run slow
        site.reset()
        _run(urls, variants[name])
    for round_ in range(rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            site.reset()
            before = children_cpu()
            stats = _run(urls, variants[name])
            cpu[name].append((children_cpu() - before) / len(urls) * 1e6)
            speed = len(urls) / float(stats["elapsed_time_seconds"])
            speeds[name].append(speed)
            print(
                f"   round {round_ + 1} {name:7s} {speed:7.1f} pages/s, "
                f"{cpu[name][-1]:6.0f} µs CPU/page"
            )
    stock, addon = (statistics.median(speeds[n]) for n in ("stock", "add-on"))
    ratios = [a / s for a, s in zip(speeds["add-on"], speeds["stock"], strict=True)]
    print(f"   median: stock {stock:.1f} pages/s, add-on {addon:.1f} pages/s")
    print(
        f"   ratio add-on / stock, median of the {rounds} rounds' ratios: "
        f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}; "
        f"goal at least 0.97: {'met' if statistics.median(ratios) >= 0.97 else 'NOT met'})"
    )
    cpu_ratios = [a / s for a, s in zip(cpu["add-on"], cpu["stock"], strict=True)]
    print(
        f"   crawl CPU per page, add-on / stock: {statistics.median(cpu_ratios):.3f} "
        f"(rounds {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})"
    )


def children_cpu() -> float:
    """CPU seconds used so far by finished child processes (the crawls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def concurrency(site: Site) -> None:
    print("2. most requests in flight to one host (CONCURRENT_REQUESTS_PER_DOMAIN = 2)")
    hosts = list(HOSTS[:2])
    for reactor in ("asyncio", "epoll"):
        for name, settings in (("stock", {}), ("add-on", {**ADDON, "POLITE_DELAY": 0})):
            site.reset()
            for host in hosts:
                site.set_latency(host, 0.05)
            _run(
                _urls(site, hosts, 40),
                {**settings, "CONCURRENT_REQUESTS_PER_DOMAIN": 2, "CONCURRENT_REQUESTS": 32},
                reactor,
            )
            seen = max(site.max_in_flight(h) for h in hosts)
            print(f"   {reactor:7s} {name:7s} {seen:3d} in flight")


def fairness(site: Site, rounds: int) -> None:
    slow, fast = HOSTS[0], list(HOSTS[1:])
    settings = {
        **ADDON,
        "POLITE_DELAY": 0.05,
        "POLITE_DELAY_DOMAINS": {slow: 2.0},
        "CONCURRENT_REQUESTS_PER_DOMAIN": 2,
    }
    print("3. fairness: 3 fast hosts (0.05 s, 20 pages each), alone and beside a slow one (2 s)")
    times: dict[str, list[float]] = {"alone": [], "beside slow": []}
    for round_ in range(rounds):
        for name in ("alone", "beside slow") if round_ % 2 == 0 else ("beside slow", "alone"):
            site.reset()
            urls = _urls(site, fast, 20)
            if name == "beside slow":
                urls = _urls(site, [slow], 10) + urls
            _run(urls, settings)
            first = min(h.time for h in site.hits())
            fast_done = max(h.time for host in fast for h in site.hits(host))
            times[name].append(fast_done - first)
            print(f"   round {round_ + 1} {name:11s} fast hosts done in {fast_done - first:5.2f} s")
    alone, mixed = (statistics.median(times[n]) for n in ("alone", "beside slow"))
    print(f"   ratio of fast hosts' time, beside slow / alone: {mixed / alone:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-rounds", type=int, default=6)
    parser.add_argument("--pages", type=int, default=2000)
    args = parser.parse_args()
    with Site(HOSTS) as site:
        overhead(site, args.pages, args.overhead_rounds)
        concurrency(site)
        fairness(site, args.rounds)


if __name__ == "__main__":
    main()
