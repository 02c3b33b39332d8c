"""Spiders the tests run (by import path, in a child process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.http import Response


class PagesSpider(scrapy.Spider):
    """Fetch the given URLs; with ``follow``, also every link on them.

    Arguments (strings or JSON): ``urls``, a list of start URLs; ``follow``,
    whether to follow links found on them.
    """

    name = "pages"

    def __init__(self, urls: Any = "[]", follow: Any = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = json.loads(urls) if isinstance(urls, str) else list(urls)
        self.follow = follow in (True, "1", "true", "True")

    def parse(self, response: Response) -> Iterator[Any]:
        yield _item(response)
        if self.follow and hasattr(response, "css"):
            yield from response.follow_all(css="a::attr(href)", callback=self.parse_page)

    def parse_page(self, response: Response) -> Iterator[Any]:
        yield _item(response)


def _item(response: Response) -> dict[str, Any]:
    return {
        "url": response.url,
        "status": response.status,
        "title": response.css("title::text").get(),
        "length": len(response.body),
    }


class SharedSpider(PagesSpider):
    """:class:`PagesSpider` for a crawl shared by several workers (scrapy-redis).

    Its start requests go through the shared dupefilter, so however many workers
    start, each start URL is fetched once; every page's links are followed.
    """

    name = "shared"

    async def start(self) -> Any:
        for url in self.start_urls:
            yield scrapy.Request(url, callback=self.parse)

    def parse(self, response: Response) -> Iterator[Any]:
        yield _item(response)
        if hasattr(response, "css"):
            yield from response.follow_all(css="a::attr(href)", callback=self.parse)


class CacheWatchingSpider(PagesSpider):
    """:class:`PagesSpider` whose items say whether the page's entry was in the
    Redis HTTP cache when the spider got the page (``in_redis``)."""

    name = "cache-watching"

    def parse(self, response: Response) -> Iterator[Any]:
        import redis

        if not hasattr(self, "_redis"):
            self._redis = redis.Redis.from_url(self.settings["POLITE_HTTPCACHE_REDIS_URL"])
        assert response.request is not None
        assert self.crawler is not None
        fingerprint = self.crawler.request_fingerprinter.fingerprint(response.request).hex()
        key = f"polite:httpcache:{self.name}:{fingerprint}"
        yield {**_item(response), "in_redis": bool(self._redis.exists(key))}


class SlowSharedSpider(SharedSpider):
    """:class:`SharedSpider` whose callback takes ``parse_seconds`` (default 0.3) without
    blocking the reactor, so a worker can be stopped or killed inside it; its stats hold
    the reactor's longest lag (``test/max_lag_ms``), measured every 50 ms."""

    name = "slow-shared"

    def __init__(self, parse_seconds: Any = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parse_seconds = float(parse_seconds)
        self._max_lag = 0.0

    async def start(self) -> Any:
        from twisted.internet import reactor
        from twisted.internet.task import LoopingCall

        last = [reactor.seconds()]  # type: ignore[attr-defined]

        def tick() -> None:
            now = reactor.seconds()  # type: ignore[attr-defined]
            self._max_lag = max(self._max_lag, now - last[0] - 0.05)
            last[0] = now

        self._lag_timer = LoopingCall(tick)
        self._lag_timer.start(0.05)
        async for request in super().start():
            yield request

    async def parse(self, response: Response) -> Any:  # type: ignore[override]
        from scrapy.utils.defer import maybe_deferred_to_future
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        await maybe_deferred_to_future(deferLater(reactor, self.parse_seconds, lambda: None))
        for output in super().parse(response):
            yield output

    def closed(self, reason: str) -> None:
        assert self.crawler.stats is not None
        self.crawler.stats.set_value("test/max_lag_ms", round(self._max_lag * 1000))


class Canary:
    """Not a request: a queue entry naming it must never build it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import os
        from pathlib import Path

        Path(os.environ["POLITE_CANARY_DIR"], "built").write_text("Canary was built")
