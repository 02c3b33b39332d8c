"""Memory of a broad crawl: peak RSS and throughput as the number of hosts grows.

Run from the repository root: ``python -m bench.bench_memory [--rounds 2]``.

Crawls of one page on each of 100, 1,000 and 10,000 distinct hosts (loopback
addresses 127.1.x.y, one small server answering them all, robots.txt included),
with the add-on (robots.txt obeyed, no delay, the politeness report on), each in
its own process. Two variants, alternating: "bounded", where robots.txt origins,
domain paces and the report's lines are capped at 1,000
(``POLITE_ROBOTS_MAX_ORIGINS``, ``POLITE_DELAY_MAX_DOMAINS``,
``POLITE_REPORT_MAX_DOMAINS``), and "unbounded", capped at 1,000,000. For each it
prints the crawl process's peak RSS (MiB), pages/s, and how many entries were
forgotten. Scrapy's own per-host download slots are freed by Scrapy after 60 s
idle; they are the same in both variants.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scrapy import signals

from scrapy_polite.testing import free_port
from scrapy_polite.testing.crawl import crawl

SIZES = (100, 1000, 10_000)
LIMITS = {"bounded": 1000, "unbounded": 1_000_000}


class PeakMemory:
    """An extension: the crawl process's peak RSS, in stats (KiB)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> PeakMemory:
        return cls(crawler)

    def closed(self) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.crawler.stats.set_value("bench/maxrss_kib", peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="hosts per crawl")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    print(f"load average at start: {_load()}  ({os.cpu_count()} CPUs, shared machine)")
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,))
    server.start()
    time.sleep(1)
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        for r in range(args.rounds):
            for size in sizes:
                names = list(LIMITS) if r % 2 == 0 else list(reversed(LIMITS))
                for name in names:
                    figures = _crawl(port, size, LIMITS[name])
                    results.setdefault((size, name), []).append(figures)
                    print(
                        f"round {r + 1}: {size:>6} hosts, {name:<9} "
                        f"{figures['rss']:7.1f} MiB  {figures['rate']:6.0f} pages/s  "
                        f"forgotten: robots {figures['robots']:.0f}, paces "
                        f"{figures['paces']:.0f}  (load {_load()})",
                        flush=True,
                    )
    finally:
        server.terminate()
        server.join(10)
    print("\n== peak RSS (MiB) and pages/s, medians of the rounds")
    print(f"{'hosts':>7}  {'bounded':>22}  {'unbounded':>22}")
    for size in sizes:
        cells = []
        for name in LIMITS:
            runs = results[(size, name)]
            rss = statistics.median(f["rss"] for f in runs)
            rate = statistics.median(f["rate"] for f in runs)
            cells.append(f"{rss:7.1f} MiB {rate:6.0f}/s")
        print(f"{size:>7}  {cells[0]:>22}  {cells[1]:>22}")
    print(f"load average at end: {_load()}")


def _crawl(port: int, size: int, limit: int) -> dict[str, float]:
    urls = [f"http://{_host(i)}:{port}/page" for i in range(size)]
    settings = {
        "ADDONS": {"scrapy_polite.Addon": 100},
        "ROBOTSTXT_OBEY": True,
        "POLITE_DELAY": 0,
        "LOG_LEVEL": "WARNING",
        "CONCURRENT_REQUESTS": 64,
        "POLITE_ROBOTS_MAX_ORIGINS": limit,
        "POLITE_DELAY_MAX_DOMAINS": limit,
        "POLITE_REPORT_MAX_DOMAINS": limit,
        "EXTENSIONS": {"bench.bench_memory.PeakMemory": 0},
    }
    result = crawl(
        "tests.spiders.PagesSpider", settings, args={"urls": json.dumps(urls)}, timeout=900
    )
    if len(result.items) != size:
        raise SystemExit(f"{size} hosts: {len(result.items)} pages")
    return {
        "rss": result.stat("bench/maxrss_kib") / 1024,
        "rate": size / float(result.stat("elapsed_time_seconds")),
        "robots": result.stat("polite/robots/evicted"),
        "paces": result.stat("polite/delay/evicted"),
    }


def _host(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no idle connections pile up

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/robots.txt":
            body, kind = b"User-agent: *\nDisallow: /private\n", "text/plain"
        else:
            body, kind = (
                b"<html><head><title>page</title></head><body>hi</body></html>",
                "text/html",
            )
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return str(client_address[0]).startswith("127.")  # loopback peers only


def _serve(port: int) -> None:
    # Bound to every address, so that it answers every 127.x.y.z; it serves loopback only.
    _LoopbackServer(("0.0.0.0", port), _Handler).serve_forever()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
