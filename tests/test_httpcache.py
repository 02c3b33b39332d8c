"""The Redis HTTP cache storage: its contract, real crawls through it, outages, the tool."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
import zlib
from pathlib import Path

import pytest
import scrapy
from scrapy import Spider
from scrapy.http import HtmlResponse, Request, Response, TextResponse
from scrapy.utils.test import get_crawler

from scrapy_polite import PoliteSettingError
from scrapy_polite._httpcache_entry import MAGIC, CacheEntryError, decode_entry, encode_entry
from scrapy_polite.httpcache import RedisCacheStorage
from scrapy_polite.testing import free_port
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Hit, Reply, Site, page_body
from tests.conftest import html_response as _html

ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}, "POLITE_DELAY": 0}
ROOT = Path(__file__).resolve().parent.parent
PAGES_SPIDER = "tests.spiders.PagesSpider"
FINGERPRINT_HEX = 40


def _only_key(redis_server: RedisServer) -> bytes:
    keys = redis_server.client().keys("*")
    assert len(keys) == 1, keys
    return keys[0]


def test_round_trip_keeps_status_url_repeated_headers_body_and_class(open_storage, redis_server):
    body = b"<html><title>caf\xc3\xa9</title>" + b"\x00\xff binary" * 100 + b"</html>"
    original = _html(
        "http://example.com/a?b=1",
        body,
        status=203,
        headers=[
            ("Content-Type", "text/html; charset=utf-8"),
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2"),
            (b"X-Raw", b"\xe9t\xe9 \xff"),  # not UTF-8: kept byte for byte
        ],
        protocol="HTTP/1.1",
    )
    writer = open_storage()
    writer.store(original)
    writer.close()  # written to Redis, not only waiting in the batch

    reader = open_storage()
    cached = reader.retrieve("http://example.com/a?b=1")
    assert cached is not None
    assert type(cached) is HtmlResponse
    assert (cached.status, cached.url, cached.body) == (203, original.url, body)
    assert cached.headers.getlist("Set-Cookie") == [b"a=1; Path=/", b"b=2"]
    assert cached.headers["X-Raw"] == b"\xe9t\xe9 \xff"
    assert cached.headers == original.headers
    assert cached.protocol == "HTTP/1.1"
    assert cached.text == original.text
    assert reader.stat("hit") == 1
    assert reader.retrieve("http://example.com/other") is None
    assert reader.stat("miss") == 1


def test_key_is_prefix_spider_name_and_fingerprint_and_namespaces_are_separate(
    open_storage, redis_server
):
    alpha = open_storage("alpha")
    beta = open_storage("beta")
    alpha.store(_html())
    alpha.close()
    key = _only_key(redis_server).decode()
    prefix, _, fingerprint = key.rpartition(":")
    assert prefix == "polite:httpcache:alpha"
    assert len(fingerprint) == FINGERPRINT_HEX
    expected = alpha.crawler.request_fingerprinter.fingerprint(Request("http://example.com/page"))
    assert fingerprint == expected.hex()  # Scrapy's own fingerprinter, not one of ours
    assert beta.retrieve("http://example.com/page") is None
    assert open_storage("alpha").retrieve("http://example.com/page") is not None


def test_shared_namespace_and_prefix_settings_let_spiders_share_entries(open_storage, redis_server):
    settings = {"POLITE_HTTPCACHE_NAMESPACE": "shared", "POLITE_HTTPCACHE_PREFIX": "team:cache"}
    alpha = open_storage("alpha", **settings)
    alpha.store(_html())
    alpha.close()
    assert _only_key(redis_server).startswith(b"team:cache:shared:")
    beta = open_storage("beta", **settings)
    assert beta.retrieve("http://example.com/page") is not None


def test_entry_is_a_magic_line_a_json_line_and_the_zlib_body(open_storage, redis_server):
    storage = open_storage()
    original = _html()
    storage.store(original)
    storage.close()
    data = redis_server.client().get(_only_key(redis_server))
    assert data.startswith(MAGIC)
    json_line, _, payload = data[len(MAGIC) :].partition(b"\n")
    header = json.loads(json_line)
    assert header["status"] == 200
    assert header["url"] == original.url
    assert header["body"] == "zlib"
    assert zlib.decompress(payload) == original.body
    assert not data.startswith(b"\x80")  # the pickle protocol opcode


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_payload_planted_in_redis_is_a_miss_and_is_never_run(
    open_storage, redis_server, tmp_path
):
    storage = open_storage()
    storage.store(_html())
    storage.close()
    key = _only_key(redis_server)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCodeWhenUnpickled(marker))
    redis_server.client().set(key, payload)
    with pytest.raises(CacheEntryError):
        decode_entry(payload)
    # Also behind our magic line, where a careless reader might unpickle "the rest".
    redis_server.client().set(key, MAGIC + payload)
    assert storage.retrieve("http://example.com/page") is None
    assert not marker.exists()
    assert storage.stat("decode_error") == 1
    assert storage.stat("hit") == 0


# -- what comes back: the semantics of Scrapy 2.19's own storages -----------------------


class ApiResponse(TextResponse):
    """A plugin's response class, with attributes of its own (as scrapy-zyte-api's)."""

    attributes = (*TextResponse.attributes, "raw_api_response", "api_flags")

    def __init__(self, *args, raw_api_response=None, api_flags=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.raw_api_response = raw_api_response
        self.api_flags = list(api_flags)


class Canary:
    """Not a response: building one from a cache entry would be running planted code."""

    calls = 0

    def __init__(self, *args, **kwargs) -> None:
        Canary.calls += 1


def test_a_plain_response_of_an_html_page_comes_back_as_html_response(open_storage):
    storage = open_storage()
    typed = Response(
        "http://example.com/typed", body=b"<p>x</p>", headers={"Content-Type": "text/html"}
    )
    sniffed = Response("http://example.com/sniffed", body=b"<!DOCTYPE html><html><p>x</p></html>")
    binary = Response(
        "http://example.com/blob",
        body=b"\x00\x01",
        headers={"Content-Type": "application/octet-stream"},
    )
    for response in (typed, sniffed, binary):
        storage.store(response)
    assert type(storage.retrieve(typed.url)) is HtmlResponse
    assert type(storage.retrieve(sniffed.url)) is HtmlResponse
    assert type(storage.retrieve(binary.url)) is Response


def test_the_declared_encoding_is_kept_over_the_bodys_meta_charset(open_storage):
    body = '<meta charset="iso-8859-1"><p>café</p>'.encode()
    original = HtmlResponse("http://example.com/e", body=body, encoding="utf-8")
    storage = open_storage()
    storage.store(original)
    cached = storage.retrieve(original.url)
    assert cached is not None
    assert cached.encoding == "utf-8"
    assert cached.text == original.text
    assert "café" in cached.text
    # Without a declared one, the encoding is found again from the same headers and body.
    inferred = HtmlResponse("http://example.com/i", body=body)
    storage.store(inferred)
    again = storage.retrieve(inferred.url)
    assert again is not None
    assert (again.encoding, again.text) == (inferred.encoding, inferred.text)


def test_a_response_subclass_comes_back_as_itself_with_its_own_attributes(open_storage):
    raw = {"statusCode": 200, "httpResponseBody": b"\xff\x00", "tags": ["a", "b"]}
    original = ApiResponse(
        "http://example.com/api",
        body=b'{"ok": true}',
        encoding="utf-8",
        flags=["from-api"],
        raw_api_response=raw,
        api_flags=("x",),
    )
    storage = open_storage()
    storage.store(original)
    cached = storage.retrieve(original.url)
    assert type(cached) is ApiResponse
    assert cached.raw_api_response == raw  # bytes included
    assert cached.api_flags == ["x"]
    assert cached.flags == ["from-api"]
    assert cached.text == original.text


def test_an_attribute_json_cannot_hold_makes_the_response_uncacheable_not_lost(open_storage):
    storage = open_storage()
    storage.store(ApiResponse("http://example.com/obj", body=b"{}", raw_api_response=object()))
    assert storage.retrieve("http://example.com/obj") is None
    assert storage.stat("store_error") == 1


@pytest.mark.parametrize(
    "planted",
    ["subprocess.Popen", "os.system", "no_such_module_here.Response", f"{__name__}.Canary"],
)
def test_an_entry_naming_a_class_that_is_not_a_loaded_response_class_is_a_miss_never_a_call(
    open_storage, redis_server, planted
):
    storage = open_storage()
    storage.store(_html())
    key = _only_key(redis_server)
    data = redis_server.client().get(key)
    json_line, _, payload = data[len(MAGIC) :].partition(b"\n")
    header = json.loads(json_line)
    header["class"] = planted
    redis_server.client().set(key, MAGIC + json.dumps(header).encode() + b"\n" + payload)
    calls = Canary.calls
    assert storage.retrieve("http://example.com/page") is None
    assert Canary.calls == calls
    assert storage.stat("decode_error") == 1
    assert storage.stat("hit") == 0


def test_a_hit_sets_request_meta_cache_timestamp_to_when_the_entry_was_stored(open_storage):
    storage = open_storage()
    before = time.time()
    storage.store(_html())
    after = time.time()
    request = Request("http://example.com/page")
    assert storage.storage.retrieve_response(storage.spider, request) is not None
    assert before <= request.meta["cache_timestamp"] <= after
    missed = Request("http://example.com/other")
    assert storage.storage.retrieve_response(storage.spider, missed) is None
    assert "cache_timestamp" not in missed.meta


def test_an_entry_is_in_redis_as_soon_as_store_response_returns(open_storage, redis_server):
    storage = open_storage()  # the defaults: no batch, no reactor timer
    storage.store(_html())
    assert redis_server.client().dbsize() == 1
    assert storage.stat("store") == 1


def test_corrupted_entries_are_misses_counted_with_one_warning(open_storage, redis_server, caplog):
    storage = open_storage()
    good = encode_entry(_html(), stored_at=time.time())
    json_line, _, payload = good[len(MAGIC) :].partition(b"\n")
    header = json.loads(json_line)
    bomb = zlib.compress(b"x" * 10_000_000)
    corrupt = {
        "garbage": b"\x00\x01 not an entry",
        "no json line end": MAGIC + json_line,
        "bad json": MAGIC + b"{not json}\n" + payload,
        "wrong type": MAGIC + json.dumps({**header, "status": "200"}).encode() + b"\n" + payload,
        "missing field": MAGIC + json.dumps({"status": 200}).encode() + b"\n" + payload,
        "truncated zlib": MAGIC + json_line + b"\n" + payload[: len(payload) // 2],
        "size mismatch": MAGIC + json.dumps({**header, "size": 5}).encode() + b"\n" + payload,
        "zlib bomb": MAGIC + json.dumps({**header, "size": 100}).encode() + b"\n" + bomb,
        "unknown encoding": MAGIC + json.dumps({**header, "body": "br"}).encode() + b"\n",
    }
    client = redis_server.client()
    for name, data in corrupt.items():
        client.set(storage.storage._key(Request(f"http://example.com/{name}")), data)
    client.hset(storage.storage._key(Request("http://example.com/hash")), "a", "b")
    with caplog.at_level(logging.DEBUG, logger="scrapy_polite.httpcache"):
        for name in [*corrupt, "hash"]:
            assert storage.retrieve(f"http://example.com/{name}") is None, name
    assert storage.stat("decode_error") == len(corrupt) + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # A good entry at a key that held garbage is read again.
    storage.store(_html(), "http://example.com/garbage")
    assert storage.retrieve("http://example.com/garbage") is not None


def test_expiration_sets_a_ttl_and_checks_the_stored_time(open_storage, redis_server):
    storage = open_storage(HTTPCACHE_EXPIRATION_SECS=30)
    storage.store(_html())
    storage.close()
    client = redis_server.client()
    assert 0 < client.ttl(_only_key(redis_server)) <= 30
    # An entry older than the expiration is a miss even if Redis still holds it.
    old = encode_entry(_html(), stored_at=time.time() - 31)
    client.set(_only_key(redis_server), old)
    assert storage.retrieve("http://example.com/page") is None
    assert storage.stat("expired") == 1


def test_zero_expiration_means_no_ttl_at_all(open_storage, redis_server):
    storage = open_storage(HTTPCACHE_EXPIRATION_SECS=0)
    storage.store(_html())
    storage.close()
    assert redis_server.client().ttl(_only_key(redis_server)) == -1


def test_batched_stores_are_read_back_before_they_reach_redis(open_storage, redis_server):
    storage = open_storage(POLITE_HTTPCACHE_WRITE_BATCH=3, POLITE_HTTPCACHE_WRITE_DELAY=60)
    storage.store(_html("http://example.com/1"))
    storage.store(_html("http://example.com/2"))
    assert redis_server.client().dbsize() == 0
    assert storage.retrieve("http://example.com/1") is not None
    storage.store(_html("http://example.com/3"))  # the third fills the batch
    assert redis_server.client().dbsize() == 3
    assert storage.stat("store") == 3


def test_bodies_over_the_size_limit_are_not_stored(open_storage):
    writer = open_storage(POLITE_HTTPCACHE_MAX_BODY_SIZE=1000)
    writer.store(_html("http://example.com/big", body=b"x" * 1001))
    writer.store(_html("http://example.com/small", body=b"x" * 1000))
    writer.close()
    assert writer.stat("too_large") == 1
    reader = open_storage()
    assert reader.retrieve("http://example.com/big") is None
    assert reader.retrieve("http://example.com/small") is not None


class _UnreadableBody(HtmlResponse):
    @property
    def body(self) -> bytes:
        raise RuntimeError("unreadable body")


def test_a_response_that_cannot_be_stored_is_counted_and_nothing_escapes(open_storage, caplog):
    storage = open_storage()
    broken = _UnreadableBody("http://example.com/broken", body=b"<html></html>")
    with caplog.at_level(logging.ERROR, logger="scrapy_polite.httpcache"):
        storage.store(broken)  # Scrapy would not catch an exception from here
        storage.store(broken)
    assert storage.stat("store_error") == 2
    assert len(caplog.records) == 1  # one error with its traceback, then only counted
    storage.store(_html())
    assert storage.retrieve("http://example.com/page") is not None


def test_no_redis_url_fails_at_start_up_naming_the_settings():
    settings = get_crawler(Spider, {}).settings
    with pytest.raises(PoliteSettingError, match=r"POLITE_HTTPCACHE_REDIS_URL.*REDIS_URL"):
        RedisCacheStorage(settings)


def test_bad_setting_fails_at_start_up(redis_server):
    settings = get_crawler(
        Spider,
        {"POLITE_HTTPCACHE_REDIS_URL": redis_server.url, "POLITE_HTTPCACHE_WRITE_BATCH": 0},
    ).settings
    with pytest.raises(PoliteSettingError, match="POLITE_HTTPCACHE_WRITE_BATCH"):
        RedisCacheStorage(settings)


def test_a_redis_restart_between_two_reads_is_not_an_outage(open_storage, redis_server, caplog):
    storage = open_storage()
    storage.store(_html())
    storage.close()
    assert storage.retrieve("http://example.com/page") is not None  # the connection is kept
    redis_server.stop()
    redis_server.start()  # empty again: the test server keeps nothing on disk
    with caplog.at_level(logging.WARNING, logger="scrapy_polite"):
        assert storage.retrieve("http://example.com/page") is None
    assert caplog.records == []
    assert storage.redis_stat("error") == 0
    assert storage.stat("miss") == 1


def test_redis_down_means_misses_skipped_stores_one_warning_and_no_password(open_storage, caplog):
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.INFO, logger="scrapy_polite"):
        storage = open_storage(url=url)
        for i in range(20):
            assert storage.retrieve(f"http://example.com/{i}") is None
            storage.store(_html(f"http://example.com/{i}"))
        storage.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1, messages
    assert "user:***@127.0.0.1" in messages[0]
    assert "s3cret" not in caplog.text
    assert storage.redis_stat("outage") == 1
    assert storage.redis_stat("error") == 1  # then left alone for the retry interval
    assert storage.redis_stat("skipped/httpcache") == 40  # 20 reads, 20 stores


# -- real crawls ---------------------------------------------------------------------------
def _cache_settings(redis_server: RedisServer, **extra) -> dict:
    return {
        **ADDON,
        "HTTPCACHE_ENABLED": True,
        "POLITE_HTTPCACHE_REDIS_URL": redis_server.url,
        **extra,
    }


def _by_url(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda item: item["url"])


def _cached_urls(redis_server: RedisServer) -> set[str]:
    client = redis_server.client()
    return {decode_entry(client.get(key)).url for key in client.scan_iter("polite:httpcache:*")}


@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_second_crawl_sends_no_request_and_yields_the_same_items(site, redis_server, reactor):
    hosts = site.hosts[:4]
    urls = [site.url(host, "/?n=8") for host in hosts] + [site.url(hosts[0], "/missing")]
    args = {"urls": json.dumps(urls), "follow": True}
    # 404s are not cached (HTTPCACHE_IGNORE_HTTP_CODES), and the second run asks
    # for nothing that is not in the cache (HTTPCACHE_IGNORE_MISSING).
    first = crawl(
        PAGES_SPIDER,
        _cache_settings(redis_server, HTTPCACHE_IGNORE_HTTP_CODES=[404]),
        args=args,
        reactor=reactor,
    )
    assert len(first.items) == 4 * 9
    assert len(site.hits()) == 4 * 9 + 1
    assert first.stat("polite/httpcache/store") == 4 * 9
    assert first.stat("polite/httpcache/miss") == 4 * 9 + 1
    assert redis_server.client().dbsize() == 4 * 9
    site.reset()

    second = crawl(
        PAGES_SPIDER,
        _cache_settings(redis_server, HTTPCACHE_IGNORE_MISSING=True),
        args=args,
        reactor=reactor,
    )
    assert site.hits() == []
    assert _by_url(second.items) == _by_url(first.items)
    assert second.stat("httpcache/hit") == 4 * 9
    assert second.stat("polite/httpcache/hit") == 4 * 9
    assert second.stat("httpcache/ignore") == 1
    assert second.stat("polite/httpcache/store") == 0
    # Through the add-on's middleware every read was awaited, several to a pipeline.
    assert 1 <= second.stat("polite/httpcache/round_trip") < 4 * 9 + 1


def test_through_the_addon_a_stored_page_is_in_redis_before_the_spider_gets_it(site, redis_server):
    urls = [site.url(host, f"/p/{i}") for host in site.hosts[:3] for i in range(10)]
    result = crawl(
        "tests.spiders.CacheWatchingSpider",
        _cache_settings(redis_server),
        args={"urls": json.dumps(urls)},
    )
    assert len(result.items) == len(urls)
    assert all(item["in_redis"] for item in result.items)
    assert result.stat("polite/httpcache/store") == len(urls)
    # Reads and writes were awaited: fewer pipelines than the 60 calls.
    assert 1 <= result.stat("polite/httpcache/round_trip") < 2 * len(urls)


def test_the_addons_middleware_with_another_storage_is_scrapys_middleware(site, tmp_path):
    urls = [site.url(host, "/?n=3") for host in site.hosts[:2]]
    settings = {
        "POLITE_DELAY": 0,
        "HTTPCACHE_ENABLED": True,
        "HTTPCACHE_DIR": str(tmp_path),
        "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.FilesystemCacheStorage",
        "DOWNLOADER_MIDDLEWARES": {
            "scrapy.downloadermiddlewares.httpcache.HttpCacheMiddleware": None,
            "scrapy_polite.httpcache.RedisHttpCacheMiddleware": 900,
        },
    }
    args = {"urls": json.dumps(urls), "follow": True}
    first = crawl(PAGES_SPIDER, settings, args=args)
    assert first.stat("httpcache/store") == len(first.items) == 2 * 4
    site.reset()
    second = crawl(PAGES_SPIDER, {**settings, "HTTPCACHE_IGNORE_MISSING": True}, args=args)
    assert site.hits() == []
    assert _by_url(second.items) == _by_url(first.items)
    assert second.stat("httpcache/hit") == 2 * 4


def _etag_page(site: Site, host: str, body: bytes):
    headers = [("Content-Type", "text/html"), ("Cache-Control", "max-age=1"), ("ETag", '"v1"')]

    def handler(hit: Hit) -> Reply:
        if hit.headers.get("if-none-match") == '"v1"':
            return Reply(304, b"", (*headers[1:], ("X-Revalidated", "2")))
        return Reply(200, body, headers)

    site.route(host, "/etag", handler)
    return site.url(host, "/etag")


def test_rfc2616_policy_revalidates_an_expired_entry_and_a_304_serves_the_cached_body(
    site, redis_server
):
    host = site.hosts[0]
    body = page_body(host, 7)
    url = _etag_page(site, host, body)
    settings = _cache_settings(
        redis_server, HTTPCACHE_POLICY="scrapy.extensions.httpcache.RFC2616Policy"
    )
    first = crawl(PAGES_SPIDER, settings, args={"urls": json.dumps([url])})
    assert [h.headers.get("if-none-match") for h in site.hits()] == [None]
    assert first.items[0]["length"] == len(body)
    time.sleep(1.1)  # max-age=1 is over

    second = crawl(PAGES_SPIDER, settings, args={"urls": json.dumps([url])})
    assert [h.headers.get("if-none-match") for h in site.hits()] == [None, '"v1"']
    assert second.stat("httpcache/revalidate") == 1
    assert second.items == first.items  # the full body, from the cache, after the 304
    assert second.items[0]["length"] == len(body)
    # Scrapy 2.19 stores the entry freshened by the 304 (2.18 does not): every store
    # the middleware asks for reaches Redis, with the headers the 304 brought.
    assert second.stat("polite/httpcache/store") == second.stat("httpcache/store")
    if scrapy.version_info >= (2, 19):
        assert second.stat("httpcache/store") == 1
        (key,) = redis_server.client().keys("polite:httpcache:*")
        entry = decode_entry(redis_server.client().get(key))
        assert ("X-Revalidated", "2") in entry.headers
        assert entry.body == body


def _crawl_one_by_one(redis_server: RedisServer, urls: list[str]):
    """A cached crawl of *urls*, one request at a time, that retries Redis every 0.3 s."""
    settings = _cache_settings(
        redis_server,
        POLITE_DELAY=0.08,
        CONCURRENT_REQUESTS_PER_DOMAIN=1,
        POLITE_REDIS_RETRY_INTERVAL=0.3,
    )
    return crawl(PAGES_SPIDER, settings, args={"urls": json.dumps(urls)})


def _restart_later(redis_server: RedisServer, after: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after), redis_server.start()))
    thread.start()
    return thread


def test_redis_stopped_mid_crawl_and_started_again_loses_no_page_and_cache_resumes(
    site, redis_server
):
    host = site.hosts[0]
    count = 50
    urls = [site.url(host, f"/p/{i}") for i in range(count)]
    restarts: list[threading.Thread] = []

    def stop_redis_once(hit: Hit) -> Reply:
        if not restarts:
            redis_server.stop()  # before the answer: this page's store fails
            restarts.append(_restart_later(redis_server, 1.0))
        return Reply(200, page_body(host, 10), [("Content-Type", "text/html")])

    site.route(host, "/p/10", stop_redis_once)
    result = _crawl_one_by_one(redis_server, urls)
    restarts[0].join()
    assert sorted(item["url"] for item in result.items) == sorted(urls)
    assert result.stat("polite/redis/outage") == 1
    assert result.stat("polite/redis/error") >= 1
    assert result.log.count("is unavailable") == 1
    assert "answers again" in result.log
    # The restarted Redis is empty (the test server keeps nothing on disk): what
    # it holds was stored after the restart, so the cache resumed.
    cached = _cached_urls(redis_server)
    assert urls[-1] in cached
    assert urls[10] not in cached  # its store failed
    assert result.stat("polite/httpcache/store") > len(cached)  # some went before the outage


def test_redis_down_at_start_the_crawl_runs_without_cache_and_uses_it_once_up(site, redis_server):
    host = site.hosts[0]
    count = 30
    urls = [site.url(host, f"/p/{i}") for i in range(count)]
    redis_server.stop()
    restarts: list[threading.Thread] = []

    def start_redis(hit: Hit) -> Reply:
        restarts.append(_restart_later(redis_server, 0))
        return Reply(200, page_body(host, 5), [("Content-Type", "text/html")])

    site.route(host, "/p/5", start_redis)
    result = _crawl_one_by_one(redis_server, urls)
    restarts[0].join()
    assert len(result.items) == count
    assert result.log.count("is unavailable") == 1
    assert result.stat("polite/redis/skipped/httpcache") >= 1
    cached = _cached_urls(redis_server)
    assert urls[0] not in cached
    assert urls[-1] in cached


def test_a_50_mb_page_reaches_the_spider_but_is_refused_by_the_cache_with_a_stat(
    site, redis_server
):
    host = site.hosts[0]
    huge = b"<html><title>huge</title>" + b"x" * (50 * 1024 * 1024) + b"</html>"
    site.route(host, "/huge", Reply(200, huge, [("Content-Type", "text/html")]))
    urls = [site.url(host, "/huge"), site.url(host, "/p/1")]
    result = crawl(PAGES_SPIDER, _cache_settings(redis_server), args={"urls": json.dumps(urls)})
    assert sorted(item["length"] for item in result.items)[-1] == len(huge)
    assert result.stat("polite/httpcache/too_large") == 1
    assert result.stat("polite/httpcache/store") == 1  # the small page only
    assert _cached_urls(redis_server) == {site.url(host, "/p/1")}
    assert max(redis_server.client().strlen(k) for k in redis_server.client().scan_iter()) < 10**5
