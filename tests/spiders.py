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
