"""Cluster mode: several real worker processes sharing one scrapy-redis crawl and one Redis."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_polite._httpcache_entry import decode_entry
from scrapy_polite.testing.crawl import CrawlResult, finish_crawl, start_crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Reply, Site

SPIDER = "tests.spiders.SharedSpider"
EPS = 0.01  # timer resolution and a server thread that wakes late for one request
PAGES = 12


def _cluster(redis_server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {
        "ADDONS": {"scrapy_polite.Addon": 100},
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_polite.cluster.DupeFilter",
        "REDIS_URL": redis_server.url,
        "POLITE_DELAY": [0.3, 0.6],
        "POLITE_CLUSTER_LEASE": 3,
        **extra,
    }


def _workers(
    site: Site, hosts: tuple[str, ...], settings: dict[str, Any], count: int = 3
) -> list[CrawlResult]:
    urls = json.dumps([site.url(h, "/") for h in hosts])
    started = [start_crawl(SPIDER, settings, args={"urls": urls}) for _ in range(count)]
    return [_finished(*s) for s in started]


def _start_workers(
    site: Site, hosts: tuple[str, ...], settings: dict[str, Any], *, until_pages: int
) -> list[Any]:
    """Start three workers; return once the site has served *until_pages* pages."""
    urls = json.dumps([site.url(h, "/") for h in hosts])
    started = [start_crawl(SPIDER, settings, args={"urls": urls}) for _ in range(3)]
    deadline = time.monotonic() + 30
    while len(site.page_hits()) < until_pages:
        assert time.monotonic() < deadline, "the crawl did not start"
        time.sleep(0.05)
    return started


def _finished(*started: Any, timeout: float = 240) -> CrawlResult:
    result = finish_crawl(*started, timeout=timeout)
    assert result.returncode == 0, result.log[-4000:]
    assert "Traceback" not in result.log, result.log[-4000:]
    return result


def _pages(site: Site, host: str) -> list[str]:
    return [h.path for h in site.page_hits(host)]


@pytest.fixture
def three_hosts(site: Site) -> tuple[str, ...]:
    hosts = site.hosts[:3]
    for host in hosts:
        site.set_pages(host, PAGES)
    return hosts


def test_three_workers_keep_each_hosts_pace_only_in_cluster_mode(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    pages = 25  # 25 gaps a host: the mean of a uniform 0.3-0.6 s is then within 4 % (1 sigma)
    for host in three_hosts:
        site.set_pages(host, pages)
    # The problem: three workers, each pacing alone, hit every host about three times as often.
    _workers(site, three_hosts, _cluster(redis_server, POLITE_CLUSTER=False))
    alone = [g for h in three_hosts for g in site.gaps(h)]
    assert min(alone) < 0.3 - EPS
    assert statistics.mean(alone) < 0.45 * 0.85

    site.reset()
    for host in three_hosts:
        site.set_pages(host, pages)
    redis_server.client().flushall()
    results = _workers(site, three_hosts, _cluster(redis_server))
    for host in three_hosts:
        gaps = site.gaps(host)
        assert min(gaps) >= 0.3 - EPS, (host, sorted(gaps)[:3])
        assert abs(statistics.mean(gaps) - 0.45) <= 0.45 * 0.15, (host, statistics.mean(gaps))
        fetched = _pages(site, host)
        assert sorted(fetched) == sorted({"/", *(f"/p/{i}" for i in range(pages))})  # each once
    assert sum(len(r.items) for r in results) == 3 * (pages + 1)
    assert sum(1 for r in results if r.items) >= 2  # the work was shared
    assert all("cluster mode on" in r.log for r in results)
    assert all(r.stat("polite/cluster/reserved") == len(r.items) for r in results)


def test_a_retry_after_answered_to_one_worker_holds_every_worker(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    host = three_hosts[0]
    site.route(host, "/p/3", Reply(429, headers=[("Retry-After", "3")]), Reply(200, "back"))
    results = _workers(site, three_hosts, _cluster(redis_server))
    hits = sorted(site.hits(host), key=lambda h: h.time)
    refused = next(h for h in hits if h.path == "/p/3")
    after = [h for h in hits if h.time > refused.time]
    assert after, "the host was not crawled to the end"
    assert after[0].time - refused.time >= 3 - EPS, [(h.path, h.time - refused.time) for h in after]
    assert sorted(_pages(site, host)).count("/p/3") == 2  # refused, then fetched again
    assert len(set(_pages(site, host))) == PAGES + 1
    assert sum(r.stat("polite/delay/backoff") for r in results) == 1


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis that keeps its data across a restart, as a production one does."""
    with RedisServer(persist=True) as server:
        yield server


def test_redis_away_mid_crawl_with_cache_and_robots_on_loses_no_page_and_keeps_the_pace(
    site: Site, durable_redis: RedisServer, three_hosts: tuple[str, ...]
):
    redis_server = durable_redis
    for host in three_hosts:
        site.set_pages(host, 20)
        site.route(host, "/robots.txt", Reply(200, "User-agent: *\nDisallow: /private\n"))
    settings = _cluster(
        redis_server,
        POLITE_DELAY=0.3,
        POLITE_REDIS_RETRY_INTERVAL=0.5,
        POLITE_CLUSTER_LEASE=10,
        ROBOTSTXT_OBEY=True,
        HTTPCACHE_ENABLED=True,
    )
    started = _start_workers(site, three_hosts, settings, until_pages=15)
    redis_server.stop()
    down_at = time.monotonic()
    time.sleep(3)
    redis_server.start()
    up_at = time.monotonic()
    results = [_finished(*s) for s in started]
    # Redis is back for every worker within its retry window.
    back_at = up_at + 0.5 + 0.5
    for host in three_hosts:
        pages = _pages(site, host)
        assert len(set(pages)) == 21, host  # every page, none lost
        # A page fetched twice was fetched while Redis was away: its store was skipped,
        # and the shared dupefilter could not see it. Never otherwise.
        for path in {p for p in pages if pages.count(p) > 1}:
            times = [h.time for h in site.page_hits(host) if h.path == path]
            assert any(down_at <= t <= back_at for t in times), (host, path)
        during = [h for h in site.page_hits(host) if down_at + 0.5 < h.time < up_at]
        # Alone, each worker spaces a host by 0.3 s times the live workers it saw (3):
        # at most one request per 0.9 s per worker, three workers.
        assert len(during) <= 3 * (up_at - down_at) / 0.9 + 3, len(during)
        before = sorted(h.time for h in site.hits(host) if h.time < down_at)
        assert min(b - a for a, b in itertools.pairwise(before)) >= 0.3 - EPS, host
    assert sum(r.stat("polite/cluster/alone") for r in results) >= 1
    # The cache resumed: every page fetched once Redis was back is in it.
    client = redis_server.client()
    cached = {decode_entry(client.get(k)).url for k in client.scan_iter("polite:httpcache:*")}
    after = {
        site.url(host, h.path)
        for host in three_hosts
        for h in site.page_hits(host)
        if h.time > back_at + 1
    }
    assert after <= cached, after - cached
    # One outage per worker: stale connections after the restart are not new outages.
    assert all(r.stat("polite/redis/outage") == 1 for r in results if r.items)


def test_a_stopped_worker_hands_back_its_requests_and_a_killed_ones_come_back_after_its_lease(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    for host in three_hosts:
        site.set_pages(host, 20)
    settings = _cluster(redis_server, POLITE_DELAY=0.2, CONCURRENT_REQUESTS_PER_DOMAIN=2)
    started = _start_workers(site, three_hosts, settings, until_pages=12)
    stopped, killed, survivor = started
    os.kill(stopped[0].pid, signal.SIGTERM)
    os.kill(killed[0].pid, signal.SIGKILL)
    killed[0].wait(10)
    # What the killed worker held, as Redis still has it (its lease has not expired yet).
    client = redis_server.client()
    held = sum(client.hlen(key) for key in client.scan_iter(f"*:leased:*:{killed[0].pid}:*"))
    stopped_result = finish_crawl(*stopped, timeout=60)
    survivor_result = _finished(*survivor)
    assert "Traceback" not in stopped_result.log
    for host in three_hosts:
        pages = _pages(site, host)
        assert set(pages) == {"/", *(f"/p/{i}" for i in range(20))}, host  # every page
    refetched = len(site.page_hits()) - 3 * 21
    # Only what a worker was downloading when it stopped can be fetched twice.
    assert 0 <= refetched <= 2 * 3 * 2, refetched
    # The killed worker's leases came back through the others once it stopped answering.
    requeued = survivor_result.stat("polite/cluster/queue/requeued")
    assert requeued + stopped_result.stat("polite/cluster/queue/requeued") >= held
    assert stopped_result.stat("finish_reason") == "shutdown"


def test_a_slow_domain_does_not_hold_back_the_fast_ones_across_workers(
    site: Site, redis_server: RedisServer
):
    slow, *fast = site.hosts[:4]
    settings = _cluster(
        redis_server, POLITE_DELAY=0.05, POLITE_DELAY_DOMAINS={slow: 2.0}, CONCURRENT_REQUESTS=4
    )

    def fast_hosts_done(with_slow: bool) -> float:
        site.reset()
        redis_server.client().flushall()
        for host in fast:
            site.set_pages(host, 15)
        site.set_pages(slow, 8)
        hosts = (slow, *fast) if with_slow else tuple(fast)
        _workers(site, hosts, settings)
        first = min(h.time for h in site.hits())
        return max(h.time for host in fast for h in site.hits(host)) - first

    alone = fast_hosts_done(with_slow=False)
    beside = fast_hosts_done(with_slow=True)
    # With scrapy-redis's own PriorityQueue the slow domain's parked requests fill the
    # workers' CONCURRENT_REQUESTS and the fast ones wait (measured: 1.06 s alone, 1.86 s
    # beside the slow one); with the domain-aware queue, 0.78 s and 0.77 s.
    assert beside <= alone * 1.3 + 0.2, (alone, beside)
    assert len(site.page_hits(slow)) == 9


# -- cluster mode on real sites: every crawl ends, nothing is lost, nothing read runs ------

SLOW_SPIDER = "tests.spiders.SlowSharedSpider"
QUEUE_KEY = "slow-shared:requests"
ROBOTS = "User-agent: *\nDisallow: /p/1\n"  # forbids /p/1, /p/10, /p/11 of 12 pages
BOUND = 120  # seconds: every crawl below ends well within it, or the test fails


def _allowed(pages: int = PAGES) -> set[str]:
    return {"/", *(f"/p/{i}" for i in range(pages) if not str(i).startswith("1"))}


def _forbidding_site(site: Site, hosts: tuple[str, ...]) -> None:
    for host in hosts:
        site.set_pages(host, PAGES)
        site.route(host, "/robots.txt", Reply(200, ROBOTS))


def _slow(
    site: Site,
    hosts: tuple[str, ...],
    settings: dict[str, Any],
    parse: float = 0.1,
    reactor: str = "asyncio",
):
    urls = json.dumps([site.url(h, "/") for h in hosts])
    args = {"urls": urls, "parse_seconds": parse}
    return start_crawl(SLOW_SPIDER, settings, args=args, reactor=reactor)


def _everything_on(redis_server: RedisServer, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "POLITE_DELAY": 0.05,
        "ROBOTSTXT_OBEY": True,
        "HTTPCACHE_ENABLED": True,
        "POLITE_ROBOTS_RETRY_DELAY": 0.5,
        "CONCURRENT_REQUESTS": 4,
    }
    return _cluster(redis_server, **{**settings, **extra})


def _site_saw_every_allowed_page_and_no_forbidden_one(site: Site, hosts: tuple[str, ...]):
    for host in hosts:
        fetched = set(_pages(site, host))
        assert fetched == _allowed(), (host, sorted(fetched ^ _allowed()))


@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_a_cluster_crawl_with_robots_cache_429_and_an_unreachable_robots_ends_and_a_warm_rerun_fetches_nothing(  # noqa: E501
    site: Site, redis_server: RedisServer, reactor: str
):
    hosts = site.hosts[:4]
    _forbidding_site(site, hosts)
    unreachable, throttled = hosts[2], hosts[3]
    first_asked: list[float] = []

    def robots(hit: Any) -> Reply:  # 503 for 2 s from the first ask, however late it comes
        first_asked[:] = first_asked or [hit.time]
        return Reply(503) if hit.time < first_asked[0] + 2 else Reply(200, ROBOTS)

    site.route(unreachable, "/robots.txt", robots)
    site.route(throttled, "/p/3", Reply(429, headers=[("Retry-After", "1")]), Reply(200, "ok"))
    settings = _everything_on(redis_server)
    started = [_slow(site, hosts, settings, reactor=reactor) for _ in range(3)]
    results = [_finished(*s, timeout=BOUND) for s in started]
    _site_saw_every_allowed_page_and_no_forbidden_one(site, hosts)
    assert sum(r.stat("polite/robots/forbidden") for r in results) >= 3 * len(hosts)
    assert sorted(_pages(site, throttled)).count("/p/3") == 2  # refused, then fetched
    assert len(site.hits(unreachable, "/robots.txt")) >= 2  # 503, then tried again
    assert redis_server.client().get(f"{QUEUE_KEY}:size") in (b"0", None)
    items = sum(len(r.items) for r in results)
    assert items == len(hosts) * len(_allowed()), items

    # The same crawl again on the warm cache, with a fresh dupefilter: no page reaches the site.
    site.reset()
    _forbidding_site(site, hosts)
    redis_server.client().delete("slow-shared:dupefilter")
    started = [_slow(site, hosts, settings, reactor=reactor) for _ in range(3)]
    again = [_finished(*s, timeout=BOUND) for s in started]
    assert site.page_hits() == []
    assert sum(len(r.items) for r in again) == items
    assert sum(r.stat("httpcache/hit") for r in again) >= items


def test_a_worker_killed_inside_the_start_pages_callback_loses_none_of_its_links(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    host = three_hosts[0]
    settings = _cluster(redis_server, POLITE_DELAY=0.05)
    victim = _slow(site, (host,), settings, parse=30)
    deadline = time.monotonic() + 30
    while not site.page_hits(host):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)  # inside the start page's 30 s callback
    victim[0].kill()
    victim[0].wait(10)
    fresh = _finished(*_slow(site, (host,), settings, parse=0.05), timeout=BOUND)
    assert set(_pages(site, host)) == {"/", *(f"/p/{i}" for i in range(PAGES))}
    assert _pages(site, host).count("/") == 2  # the start page again, from its expired lease
    assert len(fresh.items) == PAGES + 1


def test_an_idle_worker_stays_open_while_another_parses_and_honours_idle_before_close(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    host = three_hosts[0]
    settings = _cluster(redis_server, POLITE_DELAY=0.05)
    parser = _slow(site, (host,), settings, parse=8)  # the start page takes 8 s to parse
    deadline = time.monotonic() + 30
    while not site.page_hits(host):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    idle = _slow(site, (host,), {**settings, "SCHEDULER_IDLE_BEFORE_CLOSE": 3}, parse=0.05)
    started = time.monotonic()
    idle_result = _finished(*idle, timeout=BOUND)
    took = time.monotonic() - started
    parser_result = _finished(*parser, timeout=BOUND)
    assert len(idle_result.items) + len(parser_result.items) == PAGES + 1
    # The idle worker stayed open while the other parsed (8 s a page, from its last page's
    # arrival at the site), then SCHEDULER_IDLE_BEFORE_CLOSE (3 s) more.
    parsed = {item["url"] for item in parser_result.items}
    last = max(h.time for h in site.page_hits(host) if site.url(host, h.path) in parsed)
    assert started + took - last >= 8 + 3 - 0.5, (started + took - last)


@pytest.mark.parametrize(
    "seed", [int(s) for s in os.environ.get("POLITE_CHAOS_SEEDS", "1,2").split(",")]
)
def test_chaos_workers_killed_stopped_and_joining_at_random_fetch_every_allowed_page_and_end(
    site: Site, redis_server: RedisServer, seed: int
):
    rng = random.Random(seed)
    hosts = site.hosts[:3]
    _forbidding_site(site, hosts)
    site.route(hosts[0], "/p/3", Reply(429, headers=[("Retry-After", "1")]), Reply(200, "ok"))
    settings = _everything_on(redis_server, POLITE_DELAY=0.3)
    workers = [_slow(site, hosts, settings, parse=0.3) for _ in range(3)]
    killed = 0
    began = time.monotonic()
    while not site.page_hits():  # the events fall while pages are fetched and parsed
        assert time.monotonic() < began + 30
        time.sleep(0.02)
    for _ in range(4):
        time.sleep(rng.uniform(0.2, 1.2))
        live = [w for w in workers if w[0].poll() is None]
        if not live:
            break
        victim = rng.choice(live)
        if rng.random() < 0.6:
            victim[0].kill()
            killed += 1
        else:
            victim[0].terminate()
        workers.append(_slow(site, hosts, settings, parse=0.3))
    results = [finish_crawl(*w, timeout=BOUND) for w in workers]
    duration = time.monotonic() - began
    _site_saw_every_allowed_page_and_no_forbidden_one(site, hosts)
    refetched = len(site.page_hits()) - len(hosts) * len(_allowed()) - 1  # the 429's retry
    requeued = sum(r.stat("polite/cluster/queue/requeued") for r in results)
    print(f"seed {seed}: {killed} killed, {requeued} requeued, {refetched} refetched", end="")
    print(f", {duration:.1f} s")
    # Only what a killed worker held (at most CONCURRENT_REQUESTS downloading, and the
    # responses its scraper held) can be fetched again.
    assert 0 <= refetched <= killed * 2 * 4, refetched
    assert all("Traceback" not in r.log for r in results)
    assert redis_server.client().get(f"{QUEUE_KEY}:size") in (b"0", None)


def _push_raw(redis_server: RedisServer, domain: str, member: bytes) -> None:
    client = redis_server.client()
    client.zadd(f"polite:{{{domain}}}:queue:{QUEUE_KEY}", {member: -100})
    client.zadd(f"{QUEUE_KEY}:domains", {domain: 0})
    client.incr(f"{QUEUE_KEY}:size")


def _poison(url: str) -> list[bytes]:
    good = {"url": url, "method": "GET", "callback": "parse", "meta": {}}
    entries: list[Any] = [
        b"not json at all",
        b"[1, 2, 3]",
        {**good, "_class": "tests.canary_module.CanaryRequest"},  # would import the module
        {**good, "_class": "tests.spiders.Canary"},  # imported, not a Request: never built
        {**good, "_class": "os.system"},
        {**good, "callback": "start"},  # Scrapy's, not a callback
        {**good, "callback": "__init__"},
        {**good, "callback": "no_such_method"},
        {**good, "url": 42},
        {**good, "headers": "not headers"},
    ]
    return [e if isinstance(e, bytes) else json.dumps(e).encode() for e in entries]


def test_poisoned_queue_entries_are_quarantined_never_imported_or_built_and_the_crawl_ends(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...], tmp_path, monkeypatch
):
    monkeypatch.setenv("POLITE_CANARY_DIR", str(tmp_path))
    host = three_hosts[0]
    poison = _poison(site.url(host, "/p/poison"))
    for member in poison[:5]:  # some before the crawl starts...
        _push_raw(redis_server, host, member)
    settings = _cluster(redis_server, POLITE_DELAY=0.05)
    started = [_slow(site, (host,), settings, parse=0.2) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not site.page_hits(host):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for member in poison[5:]:  # ...and the rest into the live queue
        _push_raw(redis_server, host, member)
    results = [_finished(*s, timeout=BOUND) for s in started]
    assert list(tmp_path.iterdir()) == []  # no canary imported or built
    assert "/p/poison" not in _pages(site, host)
    assert set(_pages(site, host)) == {"/", *(f"/p/{i}" for i in range(PAGES))}
    dead = [json.loads(d) for d in redis_server.client().lrange(f"{QUEUE_KEY}:dead", 0, -1)]
    assert sorted(d["member"].encode("latin-1") for d in dead) == sorted(poison)
    assert sum(r.stat("polite/cluster/queue/quarantined") for r in results) == len(poison)
    assert redis_server.client().get(f"{QUEUE_KEY}:size") == b"0"


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_redis_refusing_writes_for_a_moment_loses_no_request(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...], refusal: str
):
    host = three_hosts[0]
    site.set_pages(host, 16)
    settings = _cluster(redis_server, POLITE_DELAY=0.05)
    worker = _slow(site, (host,), settings, parse=0.3)
    client = redis_server.client()
    deadline = time.monotonic() + 30
    while not site.page_hits(host):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if refusal == "oom":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
    else:
        client.execute_command("REPLICAOF", "127.0.0.1", "1")  # nobody there: no sync
    time.sleep(1.0)  # the start page's callback pushes its links meanwhile
    if refusal == "oom":
        client.config_set("maxmemory", 0)
    else:
        client.execute_command("REPLICAOF", "NO", "ONE")
    result = _finished(*worker, timeout=BOUND)
    assert set(_pages(site, host)) == {"/", *(f"/p/{i}" for i in range(16))}
    assert result.stat("polite/cluster/queue/refused") >= 1
    assert "refused" in result.log


def test_a_redis_that_never_answers_keeps_the_reactor_lag_under_a_second(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    host = three_hosts[0]
    site.set_pages(host, 16)
    settings = _cluster(redis_server, POLITE_DELAY=0.05, HTTPCACHE_ENABLED=True)
    worker = _slow(site, (host,), settings, parse=0.3)
    deadline = time.monotonic() + 30
    while not site.page_hits(host):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    redis_server.pause()
    try:
        time.sleep(4)
    finally:
        redis_server.resume()
    result = _finished(*worker, timeout=BOUND)
    assert result.stat("polite/redis/outage") >= 1  # it did hang on Redis
    assert result.stat("test/max_lag_ms") < 1000, result.stat("test/max_lag_ms")
    assert set(_pages(site, host)) == {"/", *(f"/p/{i}" for i in range(16))}


# -- the queue and the dupefilter, on their own --------------------------------------------


def _spider(redis_server: RedisServer):
    from scrapy.utils.test import get_crawler

    from tests.spiders import SlowSharedSpider

    crawler = get_crawler(SlowSharedSpider, {"REDIS_URL": redis_server.url})
    return SlowSharedSpider.from_crawler(crawler)


def test_trusted_request_builds_only_imported_request_classes_and_the_spiders_own_methods(
    redis_server: RedisServer, tmp_path, monkeypatch
):
    from scrapy import FormRequest

    from scrapy_polite.cluster import trusted_request
    from scrapy_polite.serializer import loads

    monkeypatch.setenv("POLITE_CANARY_DIR", str(tmp_path))
    spider = _spider(redis_server)
    good = trusted_request({"url": "http://a/", "callback": "parse"}, spider)
    assert good.callback == spider.parse
    form = {"url": "http://a/", "_class": "scrapy.http.request.form.FormRequest"}
    assert type(trusted_request(form, spider)) is FormRequest
    for member in _poison("http://a/"):
        with pytest.raises(Exception):  # noqa: B017, PT011
            trusted_request(loads(member), spider)
    assert list(tmp_path.iterdir()) == []


def test_the_dupefilter_never_records_a_request_the_queue_cannot_store(
    redis_server: RedisServer,
):
    from scrapy import Request

    from scrapy_polite.cluster import DupeFilter

    spider = _spider(redis_server)
    dupefilter = DupeFilter.from_spider(spider)
    unstorable = Request("http://a/x", meta={"tags": {"a", "b"}})
    assert dupefilter.request_seen(unstorable)  # refused: not scheduled
    assert redis_server.client().scard(dupefilter.key) == 0  # and not recorded
    assert spider.crawler.stats.get_value("polite/cluster/queue/unstorable") == 1
    assert not dupefilter.request_seen(Request("http://a/y"))
    assert dupefilter.request_seen(Request("http://a/y"))
    assert redis_server.client().scard(dupefilter.key) == 1
    dupefilter.close()


def test_identical_dont_filter_requests_are_each_queued_and_each_counted(
    redis_server: RedisServer,
):
    from scrapy import Request

    from scrapy_polite.cluster import DomainQueue

    spider = _spider(redis_server)
    queue = DomainQueue(None, spider, QUEUE_KEY)
    for _ in range(2):
        queue.push(Request("http://a/same", dont_filter=True))
    assert redis_server.client().get(f"{QUEUE_KEY}:size") == b"2"
    assert redis_server.client().zcard(f"polite:{{a}}:queue:{QUEUE_KEY}") == 2


def test_a_worker_stopped_while_its_requests_wait_for_an_unreachable_robots_txt_hands_them_back(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    host = three_hosts[0]
    site.route(host, "/robots.txt", Reply(503))
    settings = _everything_on(redis_server, POLITE_ROBOTS_RETRY_DELAY=60)
    worker = _slow(site, (host,), settings)
    deadline = time.monotonic() + 30
    while not site.hits(host, "/robots.txt"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)  # the start page waits, leased, for a robots.txt tried again in 60 s
    client = redis_server.client()
    assert sum(client.hlen(k) for k in client.scan_iter(f"{QUEUE_KEY}:leased:*")) == 1
    stopping = time.monotonic()
    worker[0].terminate()
    stopped = _finished(*worker, timeout=BOUND)
    assert time.monotonic() - stopping < 10  # the stop did not wait for the robots.txt
    assert stopped.stat("polite/robots/requeued_at_stop") == 1
    assert site.page_hits(host) == []
    assert client.get(f"{QUEUE_KEY}:size") == b"1"  # the start page is queued again
    # robots.txt answers now (and its shared "unreachable" is forgotten): a fresh worker
    # finds the start page in the queue and crawls the host.
    site.route(host, "/robots.txt", Reply(200, ROBOTS))
    for key in client.scan_iter("polite:*:robots*"):
        client.delete(key)
    fresh = _finished(*_slow(site, (host,), settings), timeout=BOUND)
    assert set(_pages(site, host)) == _allowed()
    assert len(fresh.items) == len(_allowed())


@deferred_f_from_coro_f
async def test_a_dead_workers_lease_of_a_download_slot_with_a_newline_goes_back_to_its_queue(
    redis_server: RedisServer,
):
    from scrapy import Request

    from scrapy_polite.cluster import DomainQueue, Heartbeat, worker_id

    dead = DomainQueue(None, _spider(redis_server), QUEUE_KEY)
    dead.push(Request("http://a/x", meta={"download_slot": "odd\nslot"}))
    taken = dead.pop()
    assert taken is not None
    assert taken.meta["download_slot"] == "odd\nslot"
    client = redis_server.client()
    client.zadd(f"{QUEUE_KEY}:workers", {worker_id(dead.spider.crawler): 0})  # it died
    alive = DomainQueue(None, _spider(redis_server), QUEUE_KEY)
    await Heartbeat.join(alive.spider.crawler, alive.config).beat()  # its riders requeue
    again = alive.pop()
    assert again is not None
    assert again.url == "http://a/x"
    assert again.meta["download_slot"] == "odd\nslot"
    assert client.get(f"{QUEUE_KEY}:size") == b"1"  # leased to the live worker now


def test_a_worker_whose_downloads_outlast_its_lease_is_not_taken_for_dead(
    site: Site, redis_server: RedisServer, three_hosts: tuple[str, ...]
):
    # Delays off (no delay middleware) and a full downloader: no pop for longer than the
    # lease. The heartbeat is a timer of its own, so the other worker leaves its leases alone.
    host = three_hosts[0]
    site.set_pages(host, 4)
    for i in range(4):
        site.route(host, f"/p/{i}", Reply(200, f"<title>{i}</title>", delay=3))
    settings = _cluster(
        redis_server,
        POLITE_DELAY_ENABLED=False,
        POLITE_CLUSTER_LEASE=1.5,
        CONCURRENT_REQUESTS=2,
        CONCURRENT_REQUESTS_PER_DOMAIN=2,
    )
    busy = _slow(site, (host,), settings, parse=0.05)
    deadline = time.monotonic() + 30
    while len(site.page_hits(host)) < 3:  # the start page, then two slow pages
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other = _slow(site, (host,), settings, parse=0.05)
    results = [_finished(*busy, timeout=BOUND), _finished(*other, timeout=BOUND)]
    assert sorted(_pages(site, host)) == sorted({"/", *(f"/p/{i}" for i in range(4))})  # once
    assert sum(r.stat("polite/cluster/queue/requeued") for r in results) == 0


def test_with_the_domain_queue_a_url_is_recorded_seen_only_in_the_step_that_queues_it(
    redis_server: RedisServer,
):
    from scrapy import Request
    from scrapy.utils.test import get_crawler

    from scrapy_polite.cluster import DomainQueue, DupeFilter
    from tests.spiders import SlowSharedSpider

    settings = {"REDIS_URL": redis_server.url, "SCHEDULER_QUEUE_CLASS": DomainQueue}
    spider = SlowSharedSpider.from_crawler(get_crawler(SlowSharedSpider, settings))
    dupefilter = DupeFilter.from_spider(spider)
    queue = DomainQueue(None, spider, QUEUE_KEY)
    client = redis_server.client()
    first, twin = Request("http://a/x"), Request("http://a/x")
    # Two workers check the same new URL before either pushes it: both find it new...
    assert not dupefilter.request_seen(first)
    assert not dupefilter.request_seen(twin)
    assert client.scard(dupefilter.key) == 0  # ...and nothing is recorded by a check alone
    queue.push(first)
    queue.push(twin)  # the push that records it finds it recorded: not queued twice
    assert client.scard(dupefilter.key) == 1
    assert client.get(f"{QUEUE_KEY}:size") == b"1"
    assert dupefilter.request_seen(Request("http://a/x"))
    dupefilter.close()
