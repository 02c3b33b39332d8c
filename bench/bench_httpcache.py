"""What the Redis HTTP cache costs, side by side with no cache and Scrapy's filesystem cache.

One run, alternating rounds (the order of the variants rotates every round), on
a local 2,000-page site spread over eight hosts, with no delays. Each crawl is
a real Scrapy crawl in its own process (``scrapy_polite.testing.crawl``); throughput is items
per second of the crawl's own ``elapsed_time_seconds``. "Redis" is the Redis storage
as the add-on sets it up, with ``RedisHttpCacheMiddleware`` (awaited round trips);
"Redis, Scrapy's middleware" is the same storage under Scrapy's own
``HttpCacheMiddleware`` (a blocking round trip per call). "1 ms away" puts Redis
behind a proxy that delays every chunk 0.5 ms each way. Prints:

1. live crawl, Redis cache storing every page vs no cache (goal: under 5 % slower),
   and Scrapy's FilesystemCacheStorage storing, for reference;
2. fully cached re-run, Redis vs filesystem (goal: ratio at least 1.0), and with
   Redis 1 ms away vs the local filesystem (goal: at least 0.8);
3. each storage's own cost per store and per hit, in microseconds, measured
   in-process by calling ``store_response``/``retrieve_response`` on real
   responses fetched from the site (the Redis figure includes its batch writes);
4. bytes in Redis per page against the raw body.

Beside each throughput ratio it prints the ratio of the crawl process's own CPU
per page (Redis's and the site's CPU are not in it), which a noisy neighbour
disturbs less.

Usage: ``python -m bench.bench_httpcache [--rounds 5] [--pages 2000]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from scrapy import Spider
from scrapy.extensions.httpcache import FilesystemCacheStorage
from scrapy.http import HtmlResponse, Request
from scrapy.utils.test import get_crawler

from bench.bench_delays import children_cpu
from scrapy_polite.httpcache import RedisCacheStorage, cache_usage
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.proxy import DelayProxy
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import HOSTS, Site

REDIS_STORAGE = "scrapy_polite.httpcache.RedisCacheStorage"
FS_STORAGE = "scrapy.extensions.httpcache.FilesystemCacheStorage"
# As the add-on places it: our middleware instead of Scrapy's.
AWAITED = {
    "DOWNLOADER_MIDDLEWARES": {
        "scrapy.downloadermiddlewares.httpcache.HttpCacheMiddleware": None,
        "scrapy_polite.httpcache.RedisHttpCacheMiddleware": 900,
    }
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--micro", type=int, default=500, help="responses per in-process round")
    args = parser.parse_args()
    print(f"load average at start: {_load()}  ({os.cpu_count()} CPUs, shared machine)")
    work = Path(tempfile.mkdtemp(prefix="bench-httpcache-"))
    try:
        with Site(HOSTS) as site, RedisServer() as redis_server:
            urls = _urls(site, args.pages)
            proxy = DelayProxy(("127.0.0.1", redis_server.port), 0.0005)
            try:
                far = f"redis://127.0.0.1:{proxy.port}/0"
                crawls, cpu = _crawls(site, redis_server, far, work, urls, args.rounds)
            finally:
                proxy.close()
            micro = _micro(site, redis_server, work, urls, args.micro, args.rounds)
            sizes = _sizes(site, redis_server, urls)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(crawls, cpu, micro, sizes, args)
    print(f"load average at end: {_load()}")


# -- 1 and 2: real crawls ----------------------------------------------------------------
def _urls(site: Site, pages: int) -> list[str]:
    per_host = -(-pages // len(site.hosts))
    urls = [site.url(host, f"/p/{i}") for i in range(per_host) for host in site.hosts]
    return urls[:pages]


def _crawls(
    site: Site, redis_server: RedisServer, far: str, work: Path, urls: list[str], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Pages/s and the crawl's CPU µs per page, per variant and round."""
    client = redis_server.client()
    live_fs, cached_fs = work / "fs-live", work / "fs-cached"
    base = {"LOG_LEVEL": "WARNING", "POLITE_HTTPCACHE_REDIS_URL": redis_server.url}
    blocking = {"HTTPCACHE_ENABLED": True, "HTTPCACHE_STORAGE": REDIS_STORAGE}
    redis_cache = {**blocking, **AWAITED}
    fs_cache = {"HTTPCACHE_ENABLED": True, "HTTPCACHE_STORAGE": FS_STORAGE}
    cached = {"POLITE_HTTPCACHE_PREFIX": "cached"}

    def prepare_cached() -> None:  # one live crawl fills each cache for the re-runs
        _crawl(urls, {**base, **redis_cache, "POLITE_HTTPCACHE_PREFIX": "cached"})
        _crawl(urls, {**base, **fs_cache, "HTTPCACHE_DIR": str(cached_fs)})

    variants = {
        "live, no cache": lambda: _crawl(urls, base),
        "live, Redis storing": lambda: _crawl(
            urls, {**base, **redis_cache, "POLITE_HTTPCACHE_PREFIX": _fresh_prefix(client)}
        ),
        "live, Redis, Scrapy's mw": lambda: _crawl(
            urls, {**base, **blocking, "POLITE_HTTPCACHE_PREFIX": _fresh_prefix(client)}
        ),
        "live, filesystem storing": lambda: _crawl(
            urls, {**base, **fs_cache, "HTTPCACHE_DIR": str(_fresh_dir(live_fs))}
        ),
        "cached, Redis": lambda: _crawl(urls, {**base, **redis_cache, **cached}, cached=True),
        "cached, Redis, Scrapy's mw": lambda: _crawl(
            urls, {**base, **blocking, **cached}, cached=True
        ),
        "cached, filesystem": lambda: _crawl(
            urls, {**base, **fs_cache, "HTTPCACHE_DIR": str(cached_fs)}, cached=True
        ),
        "cached, Redis 1 ms away": lambda: _crawl(
            urls,
            {**base, **redis_cache, **cached, "POLITE_HTTPCACHE_REDIS_URL": far},
            cached=True,
        ),
        "cached, 1 ms, Scrapy's mw": lambda: _crawl(
            urls,
            {**base, **blocking, **cached, "POLITE_HTTPCACHE_REDIS_URL": far},
            cached=True,
        ),
    }
    prepare_cached()
    results: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            before = children_cpu()
            results[name].append(variants[name]())
            cpu[name].append((children_cpu() - before) / len(urls) * 1e6)
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {results[n][-1]:.0f} ({cpu[n][-1]:.0f} µs)" for n in names)
            + f" pages/s (CPU/page) (load {_load()})",
            flush=True,
        )
    return results, cpu


def _crawl(urls: list[str], settings: dict, *, cached: bool = False) -> float:
    result = crawl(
        "tests.spiders.PagesSpider",
        {**settings, "HTTPCACHE_IGNORE_MISSING": cached},
        args={"urls": json.dumps(urls)},
        timeout=600,
    )
    if len(result.items) != len(urls):
        raise SystemExit(f"crawl got {len(result.items)} of {len(urls)} pages")
    if cached and result.stat("httpcache/hit") != len(urls):
        raise SystemExit(f"cached re-run: {result.stat('httpcache/hit')} hits of {len(urls)}")
    return len(result.items) / float(result.stat("elapsed_time_seconds"))


def _fresh_prefix(client) -> str:
    for key in client.scan_iter("live-*"):
        client.unlink(key)
    return f"live-{time.monotonic_ns()}"


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# -- 3: the storages' own cost, in-process -------------------------------------------------
def _micro(
    site: Site, redis_server: RedisServer, work: Path, urls: list[str], count: int, rounds: int
) -> dict[str, list[float]]:
    responses = [_fetch(url) for url in urls[:count]]
    requests = [Request(r.url) for r in responses]
    results: dict[str, list[float]] = {"Redis": [], "filesystem": []}
    hits: dict[str, list[float]] = {"Redis": [], "filesystem": []}
    for r in range(-1, rounds):  # round -1 warms both up and is not counted
        for name in ["Redis", "filesystem"] if r % 2 == 0 else ["filesystem", "Redis"]:
            settings = {
                "POLITE_HTTPCACHE_REDIS_URL": redis_server.url,
                "POLITE_HTTPCACHE_PREFIX": f"micro{r + 1}",
                "HTTPCACHE_DIR": str(work / f"micro{r + 1}"),
            }
            cls = RedisCacheStorage if name == "Redis" else FilesystemCacheStorage
            store_us, hit_us = _time_storage(cls, settings, requests, responses)
            if r >= 0:
                results[name].append(store_us)
                hits[name].append(hit_us)
    return {
        "store Redis": results["Redis"],
        "store filesystem": results["filesystem"],
        "hit Redis": hits["Redis"],
        "hit filesystem": hits["filesystem"],
    }


def _time_storage(cls, settings: dict, requests: list, responses: list) -> tuple[float, float]:
    crawler = get_crawler(Spider, settings)
    spider = Spider.from_crawler(crawler, name="bench")
    # Fingerprints are computed (and cached) before timing, as the middleware's
    # earlier lookup would have done.
    for request in requests:
        crawler.request_fingerprinter.fingerprint(request)
    storage = cls(crawler.settings)
    storage.open_spider(spider)
    start = time.perf_counter()
    for request, response in zip(requests, responses, strict=True):
        storage.store_response(spider, request, response)
    storage.close_spider(spider)  # the Redis storage writes its last batch here
    store_us = (time.perf_counter() - start) / len(requests) * 1e6
    storage = cls(crawler.settings)
    storage.open_spider(spider)
    start = time.perf_counter()
    for request in requests:
        if storage.retrieve_response(spider, request) is None:
            raise SystemExit(f"{cls.__name__}: a stored response was not found")
    hit_us = (time.perf_counter() - start) / len(requests) * 1e6
    storage.close_spider(spider)
    return store_us, hit_us


def _fetch(url: str) -> HtmlResponse:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return HtmlResponse(
            url, status=answer.status, headers=list(answer.headers.items()), body=answer.read()
        )


# -- 4: bytes per page ------------------------------------------------------------------
def _sizes(site: Site, redis_server: RedisServer, urls: list[str]) -> dict[str, float]:
    client = redis_server.client()
    usage = cache_usage(client, "cached")["pages"]
    keys = list(client.scan_iter("cached:pages:*", count=1000))[:200]
    memory = statistics.mean(client.memory_usage(key) for key in keys)
    sample = [_fetch(url) for url in urls[:200]]
    return {
        "entries": usage.entries,
        "value": usage.bytes / usage.entries,
        "memory": memory,
        "body": statistics.mean(len(r.body) for r in sample),
        "headers": statistics.mean(len(r.headers.to_string()) for r in sample),
    }


# -- report -------------------------------------------------------------------------------
def _report(crawls: dict, cpu: dict, micro: dict, sizes: dict, args: argparse.Namespace) -> None:
    med = {name: statistics.median(values) for name, values in crawls.items()}

    def ratio(a: str, b: str) -> float:  # median of the per-round ratios a/b
        return statistics.median(x / y for x, y in zip(crawls[a], crawls[b], strict=True))

    def cpu_ratio(a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
        median = statistics.median(ratios)
        return f"CPU/page {median:.3f}, rounds {min(ratios):.2f}-{max(ratios):.2f}"

    def rounds(a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(crawls[a], crawls[b], strict=True)]
        return f"rounds {min(ratios):.3f}-{max(ratios):.3f}; {cpu_ratio(a, b)}"

    print(
        f"\n== {args.pages}-page local crawl over {len(HOSTS)} hosts, no delays, "
        f"{args.rounds} alternating rounds; medians, pages/s"
    )
    for name, value in med.items():
        spread = f"{min(crawls[name]):.0f}-{max(crawls[name]):.0f}"
        print(
            f"  {name:<28} {value:6.0f}   (rounds {spread})   "
            f"CPU {statistics.median(cpu[name]):5.0f} µs/page"
        )
    live = ratio("live, Redis storing", "live, no cache")
    live_fs = ratio("live, filesystem storing", "live, no cache")
    print(
        "\n(1) live crawl, Redis cache storing vs no cache: "
        f"{live:.3f} (cost {100 * (1 - live):+.1f} %; goal under 5 %: "
        f"{'met' if live > 0.95 else 'NOT met'}; {rounds('live, Redis storing', 'live, no cache')})"
    )
    print(
        f"    filesystem cache storing vs no cache:        {live_fs:.3f} "
        f"(cost {100 * (1 - live_fs):+.1f} %)"
    )
    live_blocking = ratio("live, Redis, Scrapy's mw", "live, no cache")
    print(
        f"    Redis under Scrapy's middleware vs no cache: {live_blocking:.3f} "
        f"(cost {100 * (1 - live_blocking):+.1f} %)"
    )
    cached = ratio("cached, Redis", "cached, filesystem")
    print(
        f"(2) fully cached re-run, Redis vs filesystem:    {cached:.3f} "
        f"(goal at least 1.0: {'met' if cached >= 1.0 else 'NOT met'}; "
        f"{rounds('cached, Redis', 'cached, filesystem')})"
    )
    blocking = ratio("cached, Redis, Scrapy's mw", "cached, filesystem")
    print(f"    Redis under Scrapy's middleware:             {blocking:.3f}")
    far = ratio("cached, Redis 1 ms away", "cached, filesystem")
    print(
        f"    Redis 1 ms away vs local filesystem:         {far:.3f} "
        f"(goal at least 0.8: {'met' if far >= 0.8 else 'NOT met'}; "
        f"{rounds('cached, Redis 1 ms away', 'cached, filesystem')})"
    )
    far_blocking = ratio("cached, 1 ms, Scrapy's mw", "cached, filesystem")
    print(f"    1 ms away, under Scrapy's middleware:        {far_blocking:.3f}")
    print(
        f"\n(3) storage's own cost, in-process, {args.micro} real responses, "
        f"median of {args.rounds} rounds, microseconds"
    )
    for op in ("store", "hit"):
        redis_us = statistics.median(micro[f"{op} Redis"])
        fs_us = statistics.median(micro[f"{op} filesystem"])
        print(
            f"    per {op:<5}  Redis {redis_us:7.1f}   filesystem {fs_us:7.1f}   "
            f"(filesystem / Redis {fs_us / redis_us:.1f}x)"
        )
    print(
        f"\n(4) bytes per page ({sizes['entries']} entries): in Redis {sizes['value']:.0f} "
        f"(value) / {sizes['memory']:.0f} (MEMORY USAGE, key and overhead included); "
        f"raw body {sizes['body']:.0f}, raw headers {sizes['headers']:.0f}"
    )
    print(
        f"    value / raw body = {sizes['value'] / sizes['body']:.2f} (the site's generated "
        "pages repeat a few words, so zlib does better here than on real HTML)"
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
