"""Jittered per-domain delays, back-off and concurrency, measured at the site."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections.abc import Iterator
from email.utils import formatdate
from time import monotonic, time
from typing import Any

import pytest
import scrapy
from scrapy.http import Response
from scrapy.settings import Settings
from scrapy.utils.test import get_crawler

from scrapy_polite import PoliteSettingError
from scrapy_polite.delays import DelayConfig, DelayRange, _DomainPace
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.site import Reply, Site

ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}}
REACTORS = ["asyncio", "epoll"]
# A gap at the site may come this much short of its floor: timer resolution, and a
# server thread that wakes late for one request and on time for the next.
EPS = 0.01


def _urls(site: Site, host: str, count: int, start: int = 0) -> list[str]:
    return [site.url(host, f"/p/{i}") for i in range(start, start + count)]


def _crawl_urls(urls: list[str], settings: dict[str, Any], **kwargs: Any):
    return crawl(
        "tests.spiders.PagesSpider",
        {**ADDON, **settings},
        args={"urls": json.dumps(urls)},
        **kwargs,
    )


def _gaps_after(site: Site, host: str, path: str) -> list[float]:
    """Gaps at *host* from the first hit on *path* on."""
    times = sorted(h.time for h in site.hits(host))
    first = min(h.time for h in site.hits(host, path))
    times = [t for t in times if t >= first]
    return [b - a for a, b in itertools.pairwise(times)]


# -- the delay, as the site sees it -------------------------------------------------------


@pytest.mark.parametrize("reactor", REACTORS)
def test_uniform_delay_spaces_each_host_and_hosts_run_in_parallel(site: Site, reactor: str):
    hosts = site.hosts[:3]
    urls = [u for host in hosts for u in _urls(site, host, 20)]
    result = _crawl_urls(
        urls,
        {"POLITE_DELAY": [0.3, 0.6], "CONCURRENT_REQUESTS_PER_DOMAIN": 2},
        reactor=reactor,
    )
    assert len(result.items) == len(urls)
    all_gaps = []
    for host in hosts:
        gaps = site.gaps(host)
        assert len(gaps) == 19
        assert min(gaps) >= 0.3 - EPS, gaps
        all_gaps += gaps
    mean = statistics.mean(all_gaps)
    assert 0.45 * 0.9 <= mean <= 0.45 * 1.1, all_gaps
    assert statistics.stdev(all_gaps) > 0.03, all_gaps  # jitter is real
    # In parallel: the hosts' crawls overlap instead of running one after another.
    spans = [(site.hits(h)[0].time, site.hits(h)[-1].time) for h in hosts]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    for host in hosts:
        assert 0.3 <= result.stat(f"polite/delay/current/{host}") <= 0.6


def test_domain_override_gets_its_own_range_and_others_keep_the_default(site: Site):
    slow, fast = site.hosts[0], site.hosts[1]
    _crawl_urls(
        _urls(site, slow, 6) + _urls(site, fast, 12),
        {"POLITE_DELAY": [0.1, 0.2], "POLITE_DELAY_DOMAINS": {slow: [0.6, 0.8]}},
    )
    assert min(site.gaps(slow)) >= 0.6 - EPS
    assert min(site.gaps(fast)) >= 0.1 - EPS
    assert statistics.mean(site.gaps(fast)) < 0.45  # not the slow range


def test_heavy_tailed_distribution_never_undercuts_the_floor_at_the_site(site: Site):
    host = site.hosts[0]
    _crawl_urls(
        _urls(site, host, 15),
        {"POLITE_DELAY": [0.2, 0.4], "POLITE_DELAY_DISTRIBUTION": "exponential"},
    )
    gaps = site.gaps(host)
    assert len(gaps) == 14
    assert min(gaps) >= 0.2 - EPS, gaps


@pytest.mark.parametrize("reactor", REACTORS)
def test_per_domain_concurrency_holds_at_the_site_with_no_delay(site: Site, reactor: str):
    hosts = site.hosts[:2]
    for host in hosts:
        site.set_latency(host, 0.05)
    urls = [u for host in hosts for u in _urls(site, host, 40)]
    result = _crawl_urls(
        urls,
        {"POLITE_DELAY": 0, "CONCURRENT_REQUESTS_PER_DOMAIN": 2, "CONCURRENT_REQUESTS": 32},
        reactor=reactor,
    )
    assert len(result.items) == len(urls)
    for host in hosts:
        assert site.max_in_flight(host) == 2, [h.in_flight for h in site.hits(host)]


# -- slowing down when the site asks -----------------------------------------------------


@pytest.mark.parametrize("reactor", REACTORS)
def test_429_with_retry_after_2_is_followed_by_2s_of_silence_and_the_page_is_fetched(
    site: Site, reactor: str
):
    host = site.hosts[0]
    site.route(
        host,
        "/p/2",
        Reply(429, b"slow down", [("Retry-After", "2")]),
        Reply(200, b"<title>finally</title>"),
    )
    result = _crawl_urls(
        _urls(site, host, 6),
        {"POLITE_DELAY": [0.1, 0.2], "CONCURRENT_REQUESTS_PER_DOMAIN": 1},
        reactor=reactor,
    )
    assert [h.path for h in site.hits(host, "/p/2")] == ["/p/2", "/p/2"]
    assert _gaps_after(site, host, "/p/2")[0] >= 2.0 - EPS
    assert {i["title"] for i in result.items} >= {"finally"}
    assert len(result.items) == 6
    assert result.stat(f"polite/delay/backoff/{host}") == 1
    assert result.stat("polite/delay/retry/count") == 1


def test_retry_after_as_an_http_date_is_honoured(site: Site):
    host = site.hosts[0]

    def later(hit):
        if len(site.hits(host, "/p/1")) == 1:
            return Reply(503, b"busy", [("Retry-After", formatdate(time() + 3, usegmt=True))])
        return Reply(200, b"ok")

    site.route(host, "/p/1", later)
    result = _crawl_urls(
        _urls(site, host, 3), {"POLITE_DELAY": 0.1, "CONCURRENT_REQUESTS_PER_DOMAIN": 1}
    )
    assert len(result.items) == 3
    # An HTTP date has whole seconds: 3 s ahead leaves more than 2 s to wait.
    assert _gaps_after(site, host, "/p/1")[0] >= 2.0 - EPS


def test_503_backoff_raises_the_delay_then_recovers_with_successes(site: Site):
    host = site.hosts[0]
    site.route(host, "/p/1", Reply(503, b"busy"), Reply(200, b"ok"))
    result = _crawl_urls(
        _urls(site, host, 10),
        {
            "POLITE_DELAY": 0.1,
            "CONCURRENT_REQUESTS_PER_DOMAIN": 1,
            "POLITE_BACKOFF_DELAY": 1.0,
            "POLITE_BACKOFF_RECOVERY": 0.5,
        },
    )
    assert len(result.items) == 10
    gaps = _gaps_after(site, host, "/p/1")
    assert gaps[0] >= 1.1 - EPS  # floor plus the first back-off step
    assert gaps[1] >= 0.6 - EPS  # half of it left after one success
    assert gaps[-1] < 0.6  # nearly recovered (loose: a busy machine only adds)


class DontRetrySpider(scrapy.Spider):
    """Fetches the given URLs with ``dont_retry`` in meta."""

    name = "dont_retry"

    def __init__(self, urls: str = "[]", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.urls = json.loads(urls)

    async def start(self) -> Any:
        for url in self.urls:
            yield scrapy.Request(url, meta={"dont_retry": True})

    def parse(self, response: Response) -> Iterator[Any]:
        yield {"url": response.url, "status": response.status}


def test_dont_retry_requests_are_not_retried_but_the_domain_still_backs_off(site: Site):
    host = site.hosts[0]
    site.route(host, "/p/0", Reply(429, b"no", [("Retry-After", "1")]), Reply(200, b"ok"))
    result = crawl(
        "tests.test_delays.DontRetrySpider",
        {**ADDON, "POLITE_DELAY": 0, "HTTPERROR_ALLOWED_CODES": [429]},
        args={"urls": json.dumps(_urls(site, host, 1))},
    )
    assert len(site.hits(host, "/p/0")) == 1
    assert [i["status"] for i in result.items] == [429]
    assert result.stat(f"polite/delay/backoff/{host}") == 1
    assert result.stat("polite/delay/retry/count") == 0


# -- state that outlives Scrapy's slots; AutoThrottle; fairness -------------------------------


class SlotDroppingSpider(scrapy.Spider):
    """Fetches pages one after another and drops idle download slots in between."""

    name = "slot_dropping"

    def __init__(self, urls: str = "[]", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.todo = json.loads(urls)

    async def start(self) -> Any:
        yield scrapy.Request(self.todo.pop(0))

    def parse(self, response: Response) -> Iterator[Any]:
        downloader = self.crawler.engine.downloader
        downloader._slot_gc(age=0)  # what Scrapy does to a slot idle for 60 s
        if not downloader.slots:
            self.crawler.stats.inc_value("test/slots_dropped")
        yield {"url": response.url}
        if self.todo:
            yield scrapy.Request(self.todo.pop(0))


def test_domain_delay_and_backoff_survive_scrapy_dropping_the_idle_slot(site: Site):
    host = site.hosts[0]
    site.route(host, "/p/1", Reply(503, b"busy"), Reply(200, b"ok"))
    result = crawl(
        "tests.test_delays.SlotDroppingSpider",
        {
            **ADDON,
            "POLITE_DELAY": 0.3,
            "POLITE_BACKOFF_DELAY": 0.5,
            "POLITE_BACKOFF_RECOVERY": 1.0,  # the extra delay never fades here
        },
        args={"urls": json.dumps(_urls(site, host, 5))},
    )
    assert len(result.items) == 5
    assert result.stat("test/slots_dropped") >= 4
    gaps = site.gaps(host)
    assert min(gaps) >= 0.3 - EPS, gaps
    assert min(_gaps_after(site, host, "/p/1")) >= 0.8 - EPS, gaps


def test_autothrottle_cannot_undercut_the_floor(site: Site):
    host = site.hosts[0]
    result = _crawl_urls(
        _urls(site, host, 10),
        {
            "POLITE_DELAY": [0.3, 0.35],
            "AUTOTHROTTLE_ENABLED": True,
            "AUTOTHROTTLE_START_DELAY": 0.0,
            "AUTOTHROTTLE_TARGET_CONCURRENCY": 8.0,
        },
    )
    assert len(result.items) == 10
    assert min(site.gaps(host)) >= 0.3 - EPS


def test_a_slow_domain_does_not_starve_the_fast_ones(site: Site):
    slow, *fast = site.hosts[:4]
    urls = _urls(site, slow, 4) + [u for host in fast for u in _urls(site, host, 10)]
    random.Random(1).shuffle(urls)
    result = _crawl_urls(
        urls,
        {
            "POLITE_DELAY": 0.05,
            "POLITE_DELAY_DOMAINS": {slow: 2.0},
            "CONCURRENT_REQUESTS": 8,
            "CONCURRENT_REQUESTS_PER_DOMAIN": 2,
        },
    )
    assert len(result.items) == len(urls)
    fast_done = max(h.time for host in fast for h in site.hits(host))
    slow_times = sorted(h.time for h in site.hits(slow))
    # The slow host sends one request every 2 s; the fast hosts' 30 pages are all
    # fetched before its third request, instead of queueing behind it.
    assert fast_done < slow_times[2]


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"POLITE_DELAY": [5, 2]}, "POLITE_DELAY"),
        ({"POLITE_DELAY": "soon"}, "POLITE_DELAY"),
        ({"POLITE_DELAY": [-1, 2]}, "POLITE_DELAY"),
        ({"POLITE_DELAY_DISTRIBUTION": "gaussian"}, "POLITE_DELAY_DISTRIBUTION"),
        ({"POLITE_DELAY": [1, 90]}, "POLITE_DELAY_MAX"),
        ({"POLITE_DELAY_DOMAINS": {"a.example": [3, 1]}}, "POLITE_DELAY_DOMAINS['a.example']"),
        (
            {"POLITE_DELAY_DOMAINS": {"a.example": {"delay": 1, "distribution": "x"}}},
            "POLITE_DELAY_DOMAINS['a.example']",
        ),
        ({"POLITE_BACKOFF_FACTOR": 0.5}, "POLITE_BACKOFF_FACTOR"),
        ({"POLITE_BACKOFF_RECOVERY": 2}, "POLITE_BACKOFF_RECOVERY"),
        ({"POLITE_BACKOFF_RETRIES": -1}, "POLITE_BACKOFF_RETRIES"),
        ({"POLITE_BACKOFF_HTTP_CODES": ["slow"]}, "POLITE_BACKOFF_HTTP_CODES"),
    ],
)
def test_invalid_setting_is_rejected_with_its_name(settings: dict[str, Any], name: str):
    with pytest.raises(
        PoliteSettingError, match=rf"Invalid setting {__import__('re').escape(name)}="
    ):
        DelayConfig.from_settings(Settings(settings))


def test_invalid_setting_stops_the_crawl_at_start_up_naming_it(site: Site):
    host = site.hosts[0]
    result = _crawl_urls(_urls(site, host, 3), {"POLITE_DELAY": [5, 2]}, check=False)
    assert "Invalid setting POLITE_DELAY=[5, 2]" in result.log
    assert result.items == []
    assert site.hits(host) == []


def test_default_range_follows_scrapys_download_delay_and_jitter():
    config = DelayConfig.from_settings(
        Settings({"DOWNLOAD_DELAY": 2.0, "DOWNLOAD_DELAY_JITTER": 0.25})
    )
    assert config.default == DelayRange(1.5, 2.5, "uniform")


def test_domain_ranges_cover_subdomains_and_the_longest_match_wins():
    config = DelayConfig.from_settings(
        Settings({"POLITE_DELAY_DOMAINS": {"example.com": [2, 5], "api.example.com": 1}})
    )
    assert config.range_for("www.example.com", "www.example.com") == DelayRange(2, 5)
    assert config.range_for("v2.api.example.com", "v2.api.example.com") == DelayRange(1, 1)
    assert config.range_for("notexample.com", "notexample.com") == config.default


@pytest.mark.parametrize("distribution", ["uniform", "exponential", "lognormal"])
def test_every_distribution_keeps_its_floor_and_the_mean_of_the_range(distribution: str):
    rng = random.Random(7)
    delay_range = DelayRange(2.0, 5.0, distribution)
    draws = [delay_range.draw(rng) for _ in range(20000)]
    assert min(draws) >= 2.0
    assert statistics.mean(draws) == pytest.approx(3.5, rel=0.03)
    if distribution == "uniform":
        assert max(draws) <= 5.0
    else:
        assert max(draws) > 5.0  # a heavier tail than the range


# -- what a Scrapy user already set ---------------------------------------------------------


def test_download_slots_delay_jitter_and_concurrency_hold_with_the_addon_on(site: Site):
    paced, single, free = site.hosts[:3]
    for host in (single, free):
        site.set_latency(host, 0.2)
    urls = [u for host in (paced, single, free) for u in _urls(site, host, 8)]
    result = _crawl_urls(
        urls,
        {
            "POLITE_DELAY": 0,
            "DOWNLOAD_SLOTS": json.dumps(
                {paced: {"delay": 0.4, "jitter": 0.25}, single: {"concurrency": 1}}
            ),
            "CONCURRENT_REQUESTS_PER_DOMAIN": 4,
        },
    )
    assert len(result.items) == 24
    gaps = site.gaps(paced)
    assert min(gaps) >= 0.3 - EPS, gaps  # the slot's delay 0.4 s, jitter ±25 %
    assert statistics.mean(gaps) >= 0.35
    assert site.max_in_flight(single) == 1
    assert site.max_in_flight(free) > 1  # the control: the limit comes from DOWNLOAD_SLOTS
    assert min(site.gaps(free)) < 0.1  # and the delay too


@pytest.mark.parametrize(("polite", "scrapy"), [(2, 2), (1, 3), (3, 1)])
def test_a_429_is_retried_up_to_the_larger_of_backoff_retries_and_retry_times(
    site: Site, polite: int, scrapy: int
):
    host = site.hosts[0]
    site.route(host, "/p/0", Reply(429, b"no"))
    result = _crawl_urls(
        _urls(site, host, 1),
        {
            "POLITE_DELAY": 0,
            "POLITE_BACKOFF_DELAY": 0.02,
            "POLITE_BACKOFF_RETRIES": polite,
            "RETRY_TIMES": scrapy,
            "HTTPERROR_ALLOWED_CODES": [429],
        },
    )
    # Both count meta["retry_times"]; each retries while the count is under its own limit.
    assert len(site.hits(host, "/p/0")) == 1 + max(polite, scrapy)
    assert result.stat("polite/delay/retry/count") == polite
    assert result.stat("retry/count", 0) == max(0, scrapy - polite)
    assert result.stat("polite/delay/retry/max_reached") >= 1
    assert [i["status"] for i in result.items] == [429]  # given up, handed to the spider


# -- bounded memory -------------------------------------------------------------------------
def test_a_domain_is_forgotten_only_when_forgetting_it_loses_nothing():
    stats = get_crawler(scrapy.Spider, {}).stats
    assert stats is not None

    def pace() -> _DomainPace:
        return _DomainPace("a.example", DelayRange(0.2, 0.4), 1.0, random.Random(1), stats)

    now = monotonic()
    quiet = pace()
    quiet.last_start = quiet.last_departure = now - 2  # longer ago than the cap (1 s)
    assert quiet.idle(now)
    recent = pace()
    recent.last_start = now - 0.5  # a new pace could send its next request too soon
    assert not recent.idle(now)
    for learnt in ("backoff", "crawl_delay"):
        kept = pace()
        setattr(kept, learnt, 2.0)  # a back-off or a Crawl-delay would be forgotten
        assert not kept.idle(now), learnt
    held = pace()
    held.hold_until = now + 5  # a Retry-After still running
    assert not held.idle(now)
    opening = pace()
    opening.opening = now - 3  # its first download is still out
    assert not opening.idle(now)
