"""robots.txt by RFC 9309: real crawls against the local site, real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import scrapy
from scrapy.http import Response

from scrapy_polite.robots import sitemaps_found


class RobotsSpider(scrapy.Spider):
    """Fetch ``urls``; ``unobeyed`` with ``dont_obey_robotstxt``; ``direct`` through
    ``engine.download_async`` (not the scheduler); follow sitemaps from robots.txt."""

    name = "robots"

    def __init__(
        self, urls: Any = "[]", unobeyed: Any = "[]", direct: Any = "[]", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.urls = json.loads(urls)
        self.unobeyed = json.loads(unobeyed)
        self.direct = json.loads(direct)

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> RobotsSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.follow_sitemaps, signal=sitemaps_found)
        return spider

    def follow_sitemaps(self, origin: str, sitemaps: list[str], request: Any) -> None:
        for url in sitemaps:
            self.crawler.engine.crawl(scrapy.Request(url, callback=self.parse, errback=self.failed))

    async def start(self) -> AsyncIterator[Any]:
        for url in self.urls:
            yield scrapy.Request(url, errback=self.failed)
        for url in self.unobeyed:
            yield scrapy.Request(url, meta={"dont_obey_robotstxt": True}, errback=self.failed)
        if self.direct:
            yield scrapy.Request("data:,direct", callback=self.download_directly, dont_filter=True)

    async def download_directly(self, response: Response) -> AsyncIterator[Any]:
        for url in self.direct:
            try:
                result = await self.crawler.engine.download_async(scrapy.Request(url))
            except Exception as exc:  # noqa: BLE001
                yield {"url": url, "error": repr(exc), "direct": True}
            else:
                yield {"url": result.url, "status": result.status, "direct": True}

    def parse(self, response: Response) -> Iterator[Any]:
        yield {"url": response.url, "status": response.status}

    def failed(self, failure: Any) -> Iterator[Any]:
        yield {"url": failure.request.url, "error": failure.getErrorMessage()}
