"""Crawl every host of the bundled demo site: its index, then each page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.http import Response


class DemoSpider(scrapy.Spider):
    name = "demo"

    def __init__(self, site: str = "http://127.0.0.2:8350", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # ``site`` is a comma-separated list of the demo hosts' base URLs.
        self.start_urls = [url.rstrip("/") + "/" for url in site.split(",")]

    async def start(self) -> Any:
        # Through the dupefilter (not Scrapy's default dont_filter=True), so that the
        # workers of a cluster fetch each start page once between them.
        for url in self.start_urls:
            yield scrapy.Request(url)

    def parse(self, response: Response) -> Iterator[Any]:
        yield from response.follow_all(css="a::attr(href)", callback=self.parse_page)

    def parse_page(self, response: Response) -> Iterator[dict[str, Any]]:
        yield {
            "url": response.url,
            "title": response.css("title::text").get(),
            "text": " ".join(response.css("p::text").getall()),
        }
