"""Where should an item step run: inline, in threads, in ``async def``, or in processes?

Crawls local pages (the test site, 4 hosts) and runs, with ``--step cpu`` (the
default), a pure-Python step of about 10 ms per item (a loop that holds the
GIL), or with ``--step io`` a step that waits about 20 ms (``--ms``) on a local
server per item, as a pipeline writing to a database or calling an HTTP API
does (a blocking ``urllib`` call; in ``async``, an asyncio client). Placed in turn:

- ``none``: no step at all, the crawl's own ceiling (for reference);
- ``inline``: a plain ``process_item`` (the baseline of every ratio);
- ``thread``: ``deferToThread`` (Twisted's reactor thread pool, 10 threads by default);
- ``async``: an ``async def process_item``;
- ``process xN``: scrapy-polite's ``ProcessPipeline`` with 1 worker and with one per core.

For each it prints items/s (between the first and the last item scraped, so
start-up is left out; the whole crawl's wall time is shown too), the ratio to
``inline``, and the reactor's lag: how late a 10 ms timer ran (95th percentile
and worst), measured inside the crawl. The variants run in alternating rounds,
in one run; the table shows each one's median round.

    python -m bench.bench_process [--step cpu|io] [--items 400] [--rounds 3] [--ms 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scrapy.utils.defer import maybe_deferred_to_future

from scrapy_polite.process import available_cores
from scrapy_polite.testing import free_port
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.site import HOSTS, Site
from tests.test_process import CrawlProbe

LOOPS_ENV = "BENCH_PROCESS_LOOPS"  # set by the bench; inherited by crawls and their workers
STEP_ENV = "BENCH_PROCESS_STEP"  # "cpu" or "io"
IO_URL_ENV = "BENCH_PROCESS_IO_URL"  # the slow local page the io step waits on


# -- the step, and the pipelines that run it ----------------------------------------------
def cpu_step(fields: dict[str, Any]) -> dict[str, Any]:
    """About 10 ms of pure-Python work (calibrated by the bench), holding the GIL."""
    acc = 0
    for i in range(int(os.environ[LOOPS_ENV])):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return {**fields, "digest": acc}


def io_step(fields: dict[str, Any]) -> dict[str, Any]:
    """A blocking call to a local server that answers after about 20 ms."""
    import urllib.request

    with urllib.request.urlopen(os.environ[IO_URL_ENV], timeout=30) as answer:
        return {**fields, "answer": len(answer.read())}


async def io_step_async(fields: dict[str, Any]) -> dict[str, Any]:
    """:func:`io_step` with an async client: Twisted's ``Agent``, on the crawl's reactor."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    agent = Agent(reactor)
    response = await maybe_deferred_to_future(
        agent.request(b"GET", os.environ[IO_URL_ENV].encode())
    )
    body = await maybe_deferred_to_future(readBody(response))
    return {**fields, "answer": len(body)}


def step(fields: dict[str, Any]) -> dict[str, Any]:
    """The bench's step: :func:`cpu_step` or :func:`io_step` (``--step``)."""
    return io_step(fields) if os.environ.get(STEP_ENV) == "io" else cpu_step(fields)


class InlinePipeline:
    def process_item(self, item: Any, spider: Any = None) -> Any:
        return step(item)


class ThreadPipeline:
    async def process_item(self, item: Any, spider: Any = None) -> Any:
        from twisted.internet.threads import deferToThread

        return await maybe_deferred_to_future(deferToThread(step, item))


class AsyncPipeline:
    async def process_item(self, item: Any, spider: Any = None) -> Any:
        if os.environ.get(STEP_ENV) == "io":
            return await io_step_async(item)
        return step(item)


class BenchProbe(CrawlProbe):
    """The tests' reactor-lag probe, plus the times of the first and the last item."""

    def scraped(self, item: Any) -> None:
        now = time.monotonic()
        if self.stats.get_value("bench/first_item") is None:
            self.stats.set_value("bench/first_item", now)
        self.stats.set_value("bench/last_item", now)


# -- the bench ------------------------------------------------------------------------------
def calibrate(milliseconds: float) -> int:
    """Loops of :func:`cpu_step` that take *milliseconds* here (best of several tries)."""
    loops = 10_000
    os.environ[LOOPS_ENV] = str(loops)
    best = min(_timed(cpu_step) for _ in range(20))
    loops = int(loops * milliseconds / 1000 / best)
    os.environ[LOOPS_ENV] = str(loops)
    return loops


def _timed(function: Any) -> float:
    started = time.perf_counter()
    function({})
    return time.perf_counter() - started


def variants(cores: int) -> dict[str, dict[str, Any]]:
    here = "bench.bench_process"
    process = {
        "ITEM_PIPELINES": {"scrapy_polite.process.ProcessPipeline": 1000},
        "POLITE_PROCESS_FUNCTION": f"{here}.step",
    }
    return {
        "none": {},
        "inline": {"ITEM_PIPELINES": {f"{here}.InlinePipeline": 300}},
        "thread": {"ITEM_PIPELINES": {f"{here}.ThreadPipeline": 300}},
        "async": {"ITEM_PIPELINES": {f"{here}.AsyncPipeline": 300}},
        "process x1": {**process, "POLITE_PROCESS_WORKERS": 1},
        f"process x{cores}": {**process, "POLITE_PROCESS_WORKERS": cores},
    }


def run_once(site: Site, urls: list[str], settings: dict[str, Any]) -> dict[str, float]:
    base = {
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 8,
        "LOG_LEVEL": "WARNING",
        "EXTENSIONS": {"bench.bench_process.BenchProbe": 0},
    }
    result = crawl(
        "tests.spiders.PagesSpider", {**base, **settings}, args={"urls": json.dumps(urls)}
    )
    count = len(result.items)
    if count != len(urls):
        raise SystemExit(f"expected {len(urls)} items, got {count}:\n{result.log[-3000:]}")
    span = result.stat("bench/last_item") - result.stat("bench/first_item")
    return {
        "rate": (count - 1) / span,
        "wall": result.stat("elapsed_time_seconds"),
        "lag_p95": result.stat("probe/lag_p95") * 1000,
        "lag_max": result.stat("probe/lag_max") * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step", choices=("cpu", "io"), default="cpu")
    parser.add_argument(
        "--ms", type=float, default=None, help="per item: CPU time (10), or the wait (20)"
    )
    args = parser.parse_args()
    ms = args.ms if args.ms is not None else (10.0 if args.step == "cpu" else 20.0)

    cores = available_cores()
    os.environ[STEP_ENV] = args.step
    loops = calibrate(ms)
    hosts = HOSTS[:4]
    per_host = -(-args.items // len(hosts))
    kind = f"a {ms:g} ms CPU step ({loops} loops)" if args.step == "cpu" else f"a {ms:g} ms wait"
    print(
        f"{args.items} items from {len(hosts)} hosts, {kind}, "
        f"{cores} cores, {args.rounds} rounds; load average {_load()}"
    )
    measured: dict[str, list[dict[str, float]]] = {}
    slow_port = free_port()
    slow = multiprocessing.get_context("spawn").Process(target=_serve_slow, args=(slow_port, ms))
    slow.start()
    os.environ[IO_URL_ENV] = f"http://127.0.0.1:{slow_port}/slow"
    time.sleep(1)
    with Site(hosts, pages=per_host) as site:
        urls = [site.url(h, f"/p/{i}") for i in range(per_host) for h in hosts][: args.items]
        names = list(variants(cores))
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                measured.setdefault(name, []).append(run_once(site, urls, variants(cores)[name]))
            print(
                f"  round {round_ + 1}: "
                + ", ".join(f"{n} {measured[n][-1]['rate']:.0f}/s" for n in names),
                flush=True,
            )

    inline = statistics.median(m["rate"] for m in measured["inline"])
    print()
    print(
        f"{'variant':<12} {'items/s':>8} {'x inline':>9} {'wall s':>7} "
        f"{'lag p95 ms':>11} {'lag max ms':>11}   rounds (items/s)"
    )
    for name in names:
        runs = measured[name]
        rate = statistics.median(r["rate"] for r in runs)
        print(
            f"{name:<12} {rate:>8.1f} {rate / inline:>9.2f} "
            f"{statistics.median(r['wall'] for r in runs):>7.2f} "
            f"{statistics.median(r['lag_p95'] for r in runs):>11.1f} "
            f"{statistics.median(r['lag_max'] for r in runs):>11.1f}   "
            + " ".join(f"{r['rate']:.0f}" for r in runs)
        )
    slow.terminate()
    print(f"\nload average at the end {_load()} (the machine is shared: figures are under load)")


class _SlowHandler(BaseHTTPRequestHandler):
    """Answers every request after the wait, then closes (HTTP/1.0)."""

    wait = 0.02

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(self.wait)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def _serve_slow(port: int, ms: float) -> None:
    _SlowHandler.wait = ms / 1000
    server = ThreadingHTTPServer(("127.0.0.1", port), _SlowHandler)
    server.daemon_threads = True
    server.serve_forever()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
