"""robots.txt by RFC 9309: real crawls against the local site, real Redis."""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import scrapy
from scrapy import Request
from scrapy.http import Response
from scrapy.settings import Settings
from scrapy.utils.test import get_crawler

from scrapy_polite import PoliteSettingError
from scrapy_polite._robots_rules import MAX_SIZE
from scrapy_polite.robots import PoliteRobotsTxtMiddleware, RobotsConfig, _State, sitemaps_found
from scrapy_polite.testing.crawl import CrawlResult, crawl, finish_crawl, start_crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Hit, Reply, Site
from tests.test_robots_rules import GROUPS

SPIDER = "tests.test_robots.RobotsSpider"
OBEY = {"ADDONS": {"scrapy_polite.Addon": 100}, "ROBOTSTXT_OBEY": True}
HTML = [("Content-Type", "text/html")]
UA = "PoliteTestBot/1.0 (+https://example.invalid/bot)"  # scrapy_polite.testing.crawl's USER_AGENT


class RobotsSpider(scrapy.Spider):
    """Fetch ``urls``; ``unobeyed`` ones with ``dont_obey_robotstxt``; ``direct`` ones
    through ``engine.download_async`` (not the scheduler); follow the sitemaps that
    robots.txt files list. Every request gives an item: its status, or its error.

    It also counts, in stats, the Redis clients built and connections opened in
    its process (``test/redis_clients``, ``test/redis_connects``).
    """

    name = "robots"

    def __init__(
        self, urls: Any = "[]", unobeyed: Any = "[]", direct: Any = "[]", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.urls = json.loads(urls)
        self.unobeyed = json.loads(unobeyed)
        self.direct = json.loads(direct)
        self.redis_use = {"clients": 0, "connects": 0}

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> RobotsSpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.follow_sitemaps, signal=sitemaps_found)
        spider._count_redis_use()  # built before the middlewares, so it sees them
        return spider

    def _count_redis_use(self) -> None:
        import redis
        import redis.connection

        def counted(cls: Any, name: str, what: str) -> None:
            original = getattr(cls, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.redis_use[what] += 1
                return original(*args, **kwargs)

            setattr(cls, name, wrapper)

        import redis.asyncio
        import redis.asyncio.connection

        counted(redis.Redis, "__init__", "clients")
        counted(redis.asyncio.Redis, "__init__", "clients")
        counted(redis.connection.AbstractConnection, "connect", "connects")
        counted(redis.asyncio.connection.AbstractConnection, "connect", "connects")

    def closed(self, reason: str) -> None:
        for what, count in self.redis_use.items():
            self.crawler.stats.set_value(f"test/redis_{what}", count)

    def follow_sitemaps(self, origin: str, sitemaps: list[str], request: Any) -> None:
        for url in sitemaps:
            self.crawler.engine.crawl(scrapy.Request(url, errback=self.failed))

    async def start(self) -> AsyncIterator[Any]:
        for url in self.urls:
            yield scrapy.Request(url, errback=self.failed)
        for url in self.unobeyed:
            yield scrapy.Request(url, meta={"dont_obey_robotstxt": True}, errback=self.failed)
        if self.direct:
            yield scrapy.Request("data:,", callback=self.download_directly, dont_filter=True)

    async def download_directly(self, response: Response) -> AsyncIterator[Any]:
        for url in self.direct:
            try:
                result = await self.crawler.engine.download_async(scrapy.Request(url))
            except Exception as exc:
                yield {"url": url, "error": repr(exc), "direct": True}
            else:
                yield {"url": result.url, "status": result.status, "direct": True}

    def parse(self, response: Response) -> Iterator[Any]:
        yield {"url": response.url, "status": response.status}

    def failed(self, failure: Any) -> Iterator[Any]:
        yield {"url": failure.request.url, "error": failure.getErrorMessage()}


def _paths(hits: list[Hit]) -> set[str]:
    return {h.path for h in hits if h.path != "/robots.txt"}


def _robots(hits: list[Hit]) -> list[Hit]:
    return [h for h in hits if h.path == "/robots.txt"]


def _forbidden(result: CrawlResult, host: str) -> set[str]:
    """Paths of *host* whose request failed as forbidden by robots.txt."""
    prefix = f"//{host}:"
    return {
        "/" + i["url"].split("/", 3)[3]
        for i in result.items
        if prefix in i["url"] and i.get("error") == "Forbidden by robots.txt"
    }


# -- settings ---------------------------------------------------------------------------


def test_settings_have_their_documented_defaults():
    config = RobotsConfig.from_settings(Settings({"USER_AGENT": UA}))
    assert (config.product_token, config.expiry, config.timeout) == ("PoliteTestBot", 86400, 10)
    assert (config.retry_delay, config.retry_max_delay) == (10, 300)
    assert config.unreachable_timeout == 900
    assert config.redis_url is None
    assert [config.backoff(n) for n in (1, 2, 3, 6, 99)] == [10, 20, 40, 300, 300]
    own = RobotsConfig.from_settings(
        Settings(
            {"USER_AGENT": UA, "ROBOTSTXT_USER_AGENT": "Other", "POLITE_ROBOTS_USER_AGENT": "Mine"}
        )
    )
    assert own.product_token == "Mine"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"POLITE_ROBOTS_EXPIRY": "soon"}, "POLITE_ROBOTS_EXPIRY"),
        ({"POLITE_ROBOTS_EXPIRY": 0}, "POLITE_ROBOTS_EXPIRY"),
        ({"POLITE_ROBOTS_TIMEOUT": -1}, "POLITE_ROBOTS_TIMEOUT"),
        ({"POLITE_ROBOTS_RETRY_DELAY": [1]}, "POLITE_ROBOTS_RETRY_DELAY"),
        ({"POLITE_ROBOTS_RETRY_DELAY": 600}, "POLITE_ROBOTS_RETRY_MAX_DELAY"),
        ({"POLITE_ROBOTS_UNREACHABLE_TIMEOUT": "never"}, "POLITE_ROBOTS_UNREACHABLE_TIMEOUT"),
        ({"POLITE_ROBOTS_USER_AGENT": "/1.0"}, "POLITE_ROBOTS_USER_AGENT"),
        ({"USER_AGENT": "(none)"}, "USER_AGENT"),
        ({"POLITE_ROBOTS_REDIS_URL": "localhost:6379"}, "POLITE_ROBOTS_REDIS_URL"),
    ],
)
def test_a_bad_setting_is_an_error_naming_it(settings, named):
    with pytest.raises(PoliteSettingError, match=f"Invalid setting {named}="):
        RobotsConfig.from_settings(Settings({"USER_AGENT": UA, **settings}))


def test_a_bad_setting_stops_the_crawl_before_any_request(site: Site):
    result = crawl(
        SPIDER,
        {**OBEY, "POLITE_ROBOTS_EXPIRY": "soon"},
        args={"urls": json.dumps([site.url(site.hosts[0], "/p/0")])},
        check=False,
    )
    assert "Invalid setting POLITE_ROBOTS_EXPIRY='soon'" in result.log
    assert site.hits() == []


# -- rules, status codes, size, redirects: one crawl, many hosts -------------------------


@dataclass
class RulesCrawl:
    site: Site
    result: CrawlResult
    hits: dict[str, list[Hit]]

    def host(self, index: int) -> str:
        return self.site.hosts[index]


def _big_robots() -> bytes:
    filler = "".join(f"Disallow: /filler/{i:06d}\n" for i in range(30_000)).encode()
    head = b"User-agent: *\n" + filler[: 400 * 1024] + b"\nDisallow: /early\n"
    body = head + filler[: MAX_SIZE - len(head) + 10] + b"\nDisallow: /late\n"
    body += filler[: 600 * 1024 - len(body)]
    assert body.index(b"/early") < MAX_SIZE < body.index(b"/late")
    return body


@pytest.fixture(scope="module", params=["asyncio", "epoll"])
def rules_crawl(request: pytest.FixtureRequest, _site_session: Site) -> RulesCrawl:
    site = _site_session
    site.reset()
    h = site.hosts
    url = site.url
    site.route(
        h[0],
        "/robots.txt",
        Reply(
            200,
            "# rules with Allow, * and $\nUser-agent: *\nDisallow: /private/\n"
            "Allow: /private/open\nDisallow: /*.pdf$\nDisallow: /*?q=\n"
            f"Sitemap: {url(h[0], '/sitemap.xml')}\n",
        ),
    )
    site.route(h[0], "/sitemap.xml", Reply(200, "<urlset/>", [("Content-Type", "text/xml")]))
    site.route(h[1], "/robots.txt", Reply(200, GROUPS))
    # h[2]: no route, so robots.txt is a 404
    site.route(h[3], "/robots.txt", Reply(200, random.Random(3).randbytes(5000)))
    site.route(
        h[4],
        "/robots.txt",
        Reply(
            200,
            "<!doctype html><html><body><h1>Welcome!</h1></body></html>",
            [("Content-Type", "text/html")],
        ),
    )
    site.route(h[5], "/robots.txt", Reply(200, _big_robots()))
    site.route(h[6], "/robots.txt", Reply(403, "forbidden"))
    hops = [
        (h[7], "/robots.txt", 301, url(h[7], "/hop1")),
        (h[7], "/hop1", 302, url(h[0], "/hop2")),
        (h[0], "/hop2", 307, url(h[1], "/hop3")),
        (h[1], "/hop3", 308, url(h[2], "/hop4")),
        (h[2], "/hop4", 301, url(h[3], "/rules-of-h7.txt")),
    ]
    for host, path, status, target in hops:
        site.route(host, path, Reply(status, headers=[("Location", target)]))
    site.route(h[3], "/rules-of-h7.txt", Reply(200, "User-agent: *\nDisallow: /secret\n"))
    paths = {
        h[0]: ["/private/a", "/private/open", "/private/opener", "/doc.pdf", "/doc.pdf?x=1",
               "/p/1?q=x", "/p/2"],
        h[1]: ["/our-group", "/bot-group", "/prefix-group", "/star-group"],
        h[2]: ["/p/0", "/private/a", "/secret"],
        h[3]: ["/p/0", "/p/1"],
        h[4]: ["/p/0", "/p/1"],
        h[5]: ["/early", "/late", "/p/1"],
        h[6]: ["/p/0", "/private/a"],
        h[7]: ["/secret", "/p/1"],
    }  # fmt: skip
    result = crawl(
        SPIDER,
        OBEY,
        args={
            "urls": json.dumps([url(host, p) for host, ps in paths.items() for p in ps]),
            "unobeyed": json.dumps([url(h[0], "/private/unobeyed")]),
        },
        reactor=request.param,
    )
    hits = {host: site.hits(host) for host in h}
    site.reset()
    return RulesCrawl(site, result, hits)


def test_disallowed_paths_are_never_fetched_and_allow_star_dollar_follow_the_rfc(rules_crawl):
    host = rules_crawl.host(0)
    assert _paths(rules_crawl.hits[host]) >= {
        "/private/open",  # Allow: the longer match wins over Disallow: /private/
        "/private/opener",
        "/doc.pdf?x=1",  # $ anchors the end
        "/p/2",
    }
    assert not _paths(rules_crawl.hits[host]) & {"/private/a", "/doc.pdf", "/p/1?q=x"}
    assert _forbidden(rules_crawl.result, host) == {"/private/a", "/doc.pdf", "/p/1?q=x"}
    assert rules_crawl.result.stat("polite/robots/forbidden") == 3 + 1 + 1 + 1


def test_dont_obey_robotstxt_in_meta_skips_the_rules(rules_crawl):
    assert "/private/unobeyed" in _paths(rules_crawl.hits[rules_crawl.host(0)])


def test_sitemaps_listed_in_robots_txt_reach_the_spider(rules_crawl):
    assert "/sitemap.xml" in _paths(rules_crawl.hits[rules_crawl.host(0)])


def test_groups_match_the_product_token_exactly(rules_crawl):
    host = rules_crawl.host(1)
    assert _paths(rules_crawl.hits[host]) - {"/hop3"} == {
        "/bot-group",
        "/prefix-group",
        "/star-group",
    }
    assert _forbidden(rules_crawl.result, host) == {"/our-group"}


def test_unavailable_garbage_or_html_robots_txt_allows_everything(rules_crawl):
    for index in (2, 3, 4, 6):  # 404, random bytes, an HTML page, 403
        host = rules_crawl.host(index)
        assert not _forbidden(rules_crawl.result, host), host
    assert _paths(rules_crawl.hits[rules_crawl.host(2)]) >= {"/p/0", "/private/a", "/secret"}
    assert _paths(rules_crawl.hits[rules_crawl.host(6)]) == {"/p/0", "/private/a"}
    assert rules_crawl.result.stat("polite/robots/fetch/4xx") == 2
    assert rules_crawl.result.stat("polite/robots/unavailable") == 2


def test_a_600_kib_robots_txt_is_obeyed_up_to_500_kib(rules_crawl):
    host = rules_crawl.host(5)
    assert _paths(rules_crawl.hits[host]) == {"/late", "/p/1"}
    assert rules_crawl.result.stat("polite/robots/truncated") == 1


def test_five_redirects_across_hosts_give_the_original_origin_its_rules(rules_crawl):
    host = rules_crawl.host(7)
    assert _paths(rules_crawl.hits[host]) == {"/hop1", "/p/1"}  # /secret is forbidden
    assert _robots(rules_crawl.hits[host])  # fetched from the origin itself first
    assert rules_crawl.result.stat("polite/robots/fetch/3xx") == 5


def test_each_origin_fetches_robots_txt_once_through_the_engine(rules_crawl):
    for host, hits in rules_crawl.hits.items():
        assert len(_robots(hits)) == 1, host
    assert rules_crawl.result.stat("polite/robots/fetch/2xx") == 6
    assert rules_crawl.result.stat("downloader/request_count") >= 8 + 5  # robots.txt + hops
    assert rules_crawl.result.stat("polite/robots/held") > 0


def test_the_addon_uses_this_middleware_instead_of_scrapys(rules_crawl):
    log = rules_crawl.result.log
    assert "robots.txt on (RFC 9309)" in log
    assert "scrapy_polite.robots.PoliteRobotsTxtMiddleware" in log
    assert "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware" not in log
    assert not any(k.startswith("robotstxt/") for k in rules_crawl.result.stats)


def test_without_a_redis_url_nothing_connects_to_redis(rules_crawl):
    assert rules_crawl.result.stat("test/redis_clients", None) == 0
    assert rules_crawl.result.stat("test/redis_connects", None) == 0


# -- hostile robots.txt: one that never ends, a redirect loop, 5 MB -----------------------
def _five_mb_robots() -> bytes:
    head = b"User-agent: *\nDisallow: /early\n"
    filler = b"".join(b"Disallow: /f%07d\n" % i for i in range(5 * 1024 * 1024 // 18))
    return head + filler + b"Disallow: /late\n"


def test_a_robots_txt_that_never_ends_a_redirect_loop_or_5_mb_never_stop_the_crawl(site: Site):
    dripping, looping, huge, healthy = site.hosts[:4]
    site.route(dripping, "/robots.txt", Reply(200, drip=1.0))  # a byte a second, forever
    site.route(looping, "/robots.txt", Reply(302, headers=[("Location", "/again")]))
    site.route(looping, "/again", Reply(302, headers=[("Location", "/robots.txt")]))
    body = _five_mb_robots()
    assert len(body) > 5 * 1024 * 1024
    site.route(huge, "/robots.txt", Reply(200, body, [("Content-Type", "text/plain")]))
    urls = [site.url(host, p) for host in (dripping, looping) for p in ("/p/0", "/p/1")]
    urls += [site.url(huge, p) for p in ("/early", "/late", "/p/0")]
    urls += [site.url(healthy, f"/p/{i}") for i in range(5)]
    result = crawl(
        SPIDER,
        {**UNREACHABLE, "POLITE_ROBOTS_UNREACHABLE_TIMEOUT": 2},
        args={"urls": json.dumps(urls)},
    )
    assert result.stat("finish_reason") == "finished"
    # Never ends: each try times out (POLITE_ROBOTS_TIMEOUT), then the origin is given up.
    assert site.page_hits(dripping) == []
    assert len(_robots(site.hits(dripping))) >= 2
    failed = [i for i in result.items if f"//{dripping}:" in i["url"]]
    assert len(failed) == 2
    assert all("unreachable for 2 s" in i["error"] for i in failed), failed
    # A loop: five redirects followed, then robots.txt is unavailable and pages may be crawled.
    assert _paths(site.hits(looping)) == {"/again", "/p/0", "/p/1"}
    assert len(site.hits(looping)) == 6 + 2  # the first request and five hops, two pages
    assert result.stat("polite/robots/fetch/too_many_redirects") == 1
    # 5 MB: only the first 500 KiB are read, so /late is not forbidden.
    assert _paths(site.page_hits(huge)) == {"/late", "/p/0"}
    assert result.stat("polite/robots/truncated") == 1
    assert len(site.page_hits(healthy)) == 5


# -- unreachable robots.txt: requests wait, robots.txt is tried again, then they fail -----

UNREACHABLE = {
    **OBEY,
    "CONCURRENT_REQUESTS": 4,
    "POLITE_ROBOTS_TIMEOUT": 0.5,
    "POLITE_ROBOTS_RETRY_DELAY": 0.3,
    "POLITE_ROBOTS_RETRY_MAX_DELAY": 0.6,
    "POLITE_ROBOTS_UNREACHABLE_TIMEOUT": 4,
}


@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_unreachable_robots_txt_holds_the_origin_without_starving_the_others(
    site: Site, reactor: str
):
    recovering, healthy, slow, dropped, redirecting = site.hosts[:5]
    site.route(
        recovering,
        "/robots.txt",
        Reply(500),
        Reply(502),
        Reply(500),
        Reply(504),
        Reply(200, "User-agent: *\nDisallow: /p/1\n"),
    )
    site.route(slow, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /\n", delay=1.5))
    site.route(dropped, "/robots.txt", Reply(close=True))
    for i in range(6):  # six redirects: one too many, so robots.txt is unavailable
        site.route(
            redirecting,
            "/robots.txt" if i == 0 else f"/r{i}",
            Reply(301, headers=[("Location", f"/r{i + 1}")]),
        )
    site.route(redirecting, "/r6", Reply(200, "User-agent: *\nDisallow: /\n"))
    urls = [
        site.url(host, f"/p/{i}")
        for host in (recovering, slow, dropped, redirecting)
        for i in range(5)
    ]
    urls += [site.url(healthy, f"/p/{i}") for i in range(30)]
    result = crawl(
        SPIDER,
        UNREACHABLE,
        args={"urls": json.dumps(urls), "direct": json.dumps([site.url(recovering, "/p/7")])},
        reactor=reactor,
    )  # fmt: skip

    # 5xx four times, then a file: no page before the file, every allowed page after it.
    robots = _robots(site.hits(recovering))
    assert len(robots) == 5
    recovered = robots[4].time
    assert robots[1].time - robots[0].time >= 0.3 - 0.01  # back-off
    assert all(h.time > recovered for h in site.page_hits(recovering))
    assert _paths(site.hits(recovering)) == {"/p/0", "/p/2", "/p/3", "/p/4", "/p/7"}
    direct = [i for i in result.items if i.get("direct")]
    assert direct == [{"url": site.url(recovering, "/p/7"), "status": 200, "direct": True}]
    assert result.stat("polite/robots/waited_in_downloader") >= 1

    # The waiting origin held no download slot: the healthy host was done before it recovered.
    assert len(site.page_hits(healthy)) == 30
    assert max(h.time for h in site.page_hits(healthy)) < recovered

    # A timeout and a dropped connection: unreachable until POLITE_ROBOTS_UNREACHABLE_TIMEOUT,
    # then every request fails with a reason, and none reaches the site.
    for host in (slow, dropped):
        assert site.page_hits(host) == [], host
        assert len(_robots(site.hits(host))) >= 2, host  # tried again after a back-off
        failed = [i for i in result.items if f"//{host}:" in i["url"]]
        assert len(failed) == 5
        assert all("unreachable for 4 s" in i["error"] for i in failed), failed
    assert result.stat("polite/robots/unreachable") == 3
    assert result.stat("polite/robots/unreachable/gave_up") == 2
    assert result.stat("polite/robots/unreachable/failed") == 10
    assert result.stat("polite/robots/fetch/error") >= 6
    assert (
        len(re.findall(r"robots.txt of \S+ unreachable for 4\.\d s .*giving up", result.log)) == 2
    )

    # Six redirects: unavailable, so everything may be crawled; the sixth is not followed.
    assert _paths(site.hits(redirecting)) == {f"/r{i}" for i in range(1, 6)} | {
        f"/p/{i}" for i in range(5)
    }
    assert result.stat("polite/robots/fetch/too_many_redirects") == 1


def test_crawl_delay_and_request_rate_space_every_hit_at_the_site(site: Site):
    crawl_delay, request_rate, capped = site.hosts[:3]
    site.route(crawl_delay, "/robots.txt", Reply(200, "User-agent: *\nCrawl-delay: 1\n"))
    site.route(request_rate, "/robots.txt", Reply(200, "User-agent: *\nRequest-rate: 2/3s\n"))
    site.route(capped, "/robots.txt", Reply(200, "User-agent: PoliteTestBot\nCrawl-delay: 60\n"))
    urls = [
        site.url(h, f"/p/{i}")
        for h, n in ((crawl_delay, 4), (request_rate, 3), (capped, 2))
        for i in range(n)
    ]
    result = crawl(SPIDER, {**OBEY, "POLITE_DELAY_MAX": 2}, args={"urls": json.dumps(urls)})
    assert len(result.items) == len(urls)
    # Every hit counts, robots.txt included (5 ms for timer and network jitter).
    for host, floor, count in ((crawl_delay, 1.0, 4), (request_rate, 1.5, 3), (capped, 2.0, 2)):
        gaps = site.gaps(host)
        assert len(gaps) == count, host
        assert min(gaps) >= floor - 0.005, (host, gaps)
    assert max(site.gaps(capped)) < 3  # clamped to POLITE_DELAY_MAX, not 60 s
    assert result.stat(f"polite/delay/crawl_delay/{capped}") == 2


# -- the shared robots cache ----------------------------------------------------------------


def test_three_crawlers_sharing_redis_fetch_each_robots_txt_once(
    site: Site, redis_server: RedisServer
):
    rules, missing, failing = site.hosts[:3]
    site.route(rules, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /p/1\n", delay=0.3))
    site.route(failing, "/robots.txt", Reply(500))
    urls = [site.url(h, f"/p/{i}") for h in (rules, missing, failing) for i in range(6)]
    settings = {
        **UNREACHABLE,
        "POLITE_ROBOTS_REDIS_URL": redis_server.url,
        "POLITE_ROBOTS_UNREACHABLE_TIMEOUT": 1.5,
    }
    started = [
        start_crawl(SPIDER, settings, args={"urls": json.dumps(urls)}, reactor=reactor)
        for reactor in ("asyncio", "epoll", "asyncio")
    ]
    results = [finish_crawl(*s) for s in started]
    for result in results:
        assert result.returncode == 0, result.log[-3000:]
        assert "Traceback" not in result.log
        assert result.stat("test/redis_connects") > 0  # the Redis use counter works
    assert len(_robots(site.hits(rules))) == 1
    assert len(_robots(site.hits(missing))) == 1
    assert "/p/1" not in _paths(site.hits(rules))
    assert len(site.page_hits(rules)) == 3 * 5
    assert len(site.page_hits(missing)) == 3 * 6
    assert sum(r.stat("polite/robots/cache_hit/redis") for r in results) == 2 * 2
    assert site.page_hits(failing) == []

    client = redis_server.client()

    def key(host: str) -> str:
        return f"polite:{{{host}}}:robots:{site.url(host, '')}"

    entry = json.loads(client.get(key(rules)))
    assert entry["kind"] == "rules"
    assert entry["body"] == "User-agent: *\nDisallow: /p/1\n"
    assert 86_000_000 < client.pttl(key(rules)) <= 86_400_000
    assert json.loads(client.get(key(missing)))["kind"] == "unavailable"
    # An unreachable robots.txt is never stored as a file (its short ":down" marker
    # has expired by now), and every crawler gave its origin up.
    assert client.get(key(failing)) is None
    assert all(r.stat("polite/robots/unreachable/gave_up") == 1 for r in results)
    assert not client.keys("polite:*:lock")


def test_robots_txt_is_fetched_again_after_it_expires_despite_the_http_cache(
    site: Site, redis_server: RedisServer, tmp_path: Path
):
    host = site.hosts[0]
    site.route(host, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /private\n"))
    result = crawl(
        SPIDER,
        {
            **OBEY,
            "POLITE_ROBOTS_REDIS_URL": redis_server.url,
            "POLITE_ROBOTS_EXPIRY": 1,
            "POLITE_DELAY": 0.4,
            "CONCURRENT_REQUESTS": 1,  # each request is checked just before it leaves
            "HTTPCACHE_ENABLED": True,
            "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.FilesystemCacheStorage",
            "HTTPCACHE_DIR": str(tmp_path / "httpcache"),
        },
        args={"urls": json.dumps([site.url(host, f"/p/{i}") for i in range(8)])},
    )
    assert len(result.items) == 8
    assert len(_robots(site.hits(host))) >= 2
    assert result.stat("httpcache/store") == 8  # pages only: robots.txt never went to it


def test_a_refresh_that_finds_robots_txt_unreachable_keeps_obeying_the_last_copy(site: Site):
    host = site.hosts[0]
    site.route(host, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /private\n"), Reply(500))
    paths = [f"/p/{i}" for i in range(6)] + ["/private/a", "/private/b"]
    result = crawl(
        SPIDER,
        {
            **OBEY,
            "POLITE_ROBOTS_EXPIRY": 0.5,
            "POLITE_ROBOTS_RETRY_DELAY": 0.3,
            "POLITE_DELAY": 0.3,
            "CONCURRENT_REQUESTS": 1,  # each request is checked just before it leaves
        },
        args={"urls": json.dumps([site.url(host, p) for p in paths])},
    )
    robots = _robots(site.hits(host))
    assert len(robots) >= 2  # the first answer (200), then refreshes (500)
    assert _paths(site.hits(host)) == {f"/p/{i}" for i in range(6)}
    assert _forbidden(result, host) == {"/private/a", "/private/b"}
    assert "is unreachable (500): obeying the copy from" in result.log
    # Pages after the first refresh went on, spaced by the delay, not held back.
    later = [h.time for h in site.page_hits(host) if h.time > robots[1].time]
    assert later
    assert max(later) - robots[1].time < 0.3 * 6 + 2


def test_an_unreachable_redis_falls_back_to_memory_with_one_warning(
    site: Site, redis_server: RedisServer
):
    rules, other = site.hosts[:2]
    site.route(rules, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /p/1\n"))
    redis_server.stop()
    urls = [site.url(h, f"/p/{i}") for h in (rules, other) for i in range(4)]
    result = crawl(
        SPIDER,
        {**OBEY, "POLITE_ROBOTS_REDIS_URL": redis_server.url},
        args={"urls": json.dumps(urls)},
    )
    assert result.log.count("robots.txt results stay in this process") == 1
    assert result.stat("polite/redis/error") >= 1
    assert result.stat("polite/redis/outage") == 1
    assert _paths(site.hits(rules)) == {"/p/0", "/p/2", "/p/3"}
    assert len(site.page_hits(other)) == 4
    assert [len(_robots(site.hits(h))) for h in (rules, other)] == [1, 1]


# -- bounded memory -------------------------------------------------------------------------
def test_past_the_origin_limit_the_least_recently_used_idle_origin_is_forgotten():
    crawler = get_crawler(
        scrapy.Spider, {**OBEY, "USER_AGENT": "PoliteTestBot/1.0", "POLITE_ROBOTS_MAX_ORIGINS": 10}
    )
    middleware = PoliteRobotsTxtMiddleware.from_crawler(crawler)
    origins = [middleware._origin(Request(f"http://127.0.1.{i}/p")) for i in range(1, 11)]
    assert all(o is not None for o in origins)
    for origin in origins:
        assert origin is not None
        origin.used_at -= 10  # unused for 10 s
    fetching = origins[0]
    assert fetching is not None
    fetching.state = _State.FETCHING  # being loaded: never forgotten
    again = middleware._origin(Request("http://127.0.1.2/q"))  # now the most recent
    assert again is origins[1]
    middleware._origin(Request("http://127.0.1.11/p"))  # one too many
    kept = set(middleware._origins)
    assert len(kept) == 10
    assert "http://127.0.1.1:80" in kept  # fetching
    assert "http://127.0.1.2:80" in kept  # used just now
    assert "http://127.0.1.3:80" not in kept  # the least recently used idle one
    assert crawler.stats.get_value("polite/robots/evicted") == 1
    # Its next request starts from nothing: robots.txt is read again, never assumed.
    back = middleware._origin(Request("http://127.0.1.3/p"))
    assert back is not None
    assert back.state is _State.UNKNOWN
    assert back.rules is None
    assert crawler.stats.get_value("polite/robots/evicted") == 2  # and one more for it
    # Origins used in the last seconds are kept even past the limit.
    for key in list(middleware._origins):
        middleware._origin(Request(key + "/again"))
    middleware._origin(Request("http://127.0.1.12/p"))
    assert len(middleware._origins) == 11
    assert crawler.stats.get_value("polite/robots/evicted") == 2
