"""Fixtures: the local multi-host site, a throw-away Redis, and cache storages opened on it."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from scrapy import Spider
from scrapy.http import HtmlResponse, Request, Response
from scrapy.utils.test import get_crawler

from scrapy_polite.httpcache import RedisCacheStorage
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import HOSTS, Site, page_body


@pytest.fixture(scope="session")
def _site_session() -> Iterator[Site]:
    with Site(HOSTS) as site:
        yield site


@pytest.fixture
def site(_site_session: Site) -> Iterator[Site]:
    """The site, with no routes and no recorded hits."""
    _site_session.reset()
    yield _site_session
    _site_session.reset()


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> Iterator[RedisServer]:
    """A running, empty Redis on a free port (tests may stop and start it)."""
    _redis_session.start()
    _redis_session.client().flushall()
    yield _redis_session
    _redis_session.start()


class _Storage:
    """A storage opened for a spider of a real crawler, as HttpCacheMiddleware opens it."""

    def __init__(self, url: str, name: str = "alpha", **settings) -> None:
        self.crawler = get_crawler(
            Spider,
            {
                "POLITE_HTTPCACHE_REDIS_URL": url,
                **settings,
            },
        )
        self.spider = Spider.from_crawler(self.crawler, name=name)
        self.storage = RedisCacheStorage(self.crawler.settings)
        self.storage.open_spider(self.spider)

    def store(self, response: Response, url: str | None = None) -> None:
        self.storage.store_response(self.spider, Request(url or response.url), response)

    def retrieve(self, url: str) -> Response | None:
        return self.storage.retrieve_response(self.spider, Request(url))

    def close(self) -> None:
        self.storage.close_spider(self.spider)

    def stat(self, name: str) -> int:
        return self.crawler.stats.get_value(f"polite/httpcache/{name}", 0)

    def redis_stat(self, name: str) -> int:
        return self.crawler.stats.get_value(f"polite/redis/{name}", 0)


@pytest.fixture
def open_storage(redis_server):
    """Open storages on the test Redis; all are closed (their batches written) at the end."""
    opened: list[_Storage] = []

    def open_(name: str = "alpha", **settings) -> _Storage:
        storage = _Storage(settings.pop("url", redis_server.url), name, **settings)
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        storage.close()


def html_response(
    url: str = "http://example.com/page", body: bytes | None = None, **kw
) -> HtmlResponse:
    return HtmlResponse(
        url,
        body=page_body("example.com", 1) if body is None else body,
        headers=kw.pop("headers", [("Content-Type", "text/html; charset=utf-8")]),
        **kw,
    )


ROOT = Path(__file__).resolve().parent.parent


def scrapy_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``scrapy <args>`` in *tmp_path*, with the commands declared in setup.cfg's entry
    points (from this checkout, installed or not)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    dist = tmp_path / "polite_commands_entry_points-0.dist-info"
    if not dist.exists():
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: polite-commands-entry-points\nVersion: 0\n"
        )
        entry_points = config["options.entry_points"]["scrapy.commands"]
        (dist / "entry_points.txt").write_text(f"[scrapy.commands]\n{entry_points.strip()}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "-m", "scrapy", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
