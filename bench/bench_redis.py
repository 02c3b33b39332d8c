"""Redis from async code: calls in a thread against redis-py's asyncio client.

Run from the repository root: ``python -m bench.bench_redis [--calls 2000] [--rounds 3]``.

On the asyncio reactor (Scrapy's default), against a throw-away local Redis, it
times one ``GET`` awaited from a coroutine three ways, in alternating rounds:

- ``blocking``: the synchronous client on the reactor thread (what a cache storage
  must do; the reactor is frozen for the round trip);
- ``thread``: the synchronous client in the reactor's thread pool, awaited
  (``scrapy_polite._redis``'s choice: works on every reactor);
- ``asyncio``: ``redis.asyncio`` (only on the asyncio reactor).

For each it prints the median and p99 latency of one awaited call, and the
throughput of 50 calls in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.reactor import install_reactor

from scrapy_polite.testing.redis_server import RedisServer


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _time(call: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float, float]:
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(calls // 50):
        await asyncio.gather(*(asyncio.ensure_future(call()) for _ in range(50)))
    rate = (calls // 50 * 50) / (time.perf_counter() - start)
    return statistics.median(latencies) * 1e6, _p(latencies, 0.99) * 1e6, rate


async def _main(url: str, calls: int, rounds: int) -> None:
    import redis
    import redis.asyncio
    from twisted.internet.threads import deferToThread

    sync = redis.Redis.from_url(url)
    aio = redis.asyncio.Redis.from_url(url)
    sync.set("k", b"x" * 100)

    async def blocking() -> Any:
        return sync.get("k")

    async def thread() -> Any:
        return await maybe_deferred_to_future(deferToThread(sync.get, "k"))

    async def asyncio_client() -> Any:
        return await aio.get("k")

    variants = {"blocking": blocking, "thread": thread, "asyncio": asyncio_client}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(await _time(variants[name], calls))
    print(f"{calls} awaited GETs per round, {rounds} alternating rounds; medians (range)")
    print(f"{'':10} {'p50 µs':>18} {'p99 µs':>18} {'50 in flight, calls/s':>26}")
    for name, rows in results.items():
        cols = []
        for i in range(3):
            vals = [row[i] for row in rows]
            cols.append(f"{statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})")
        print(f"{name:10} {cols[0]:>18} {cols[1]:>18} {cols[2]:>26}")
    await aio.aclose()
    sync.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from twisted.internet import reactor

    with RedisServer() as server:
        done = deferred_from_coro(_main(server.url, args.calls, args.rounds))
        done.addErrback(lambda f: f.printTraceback())
        done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
