"""The one Redis layer: which URL and timeouts, no password in logs, health, keys."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot
from scrapy import Spider
from scrapy.settings import Settings
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_polite import PoliteSettingError
from scrapy_polite._redis import (
    RedisLink,
    RedisUnavailable,
    domain_key,
    redact,
    redis_from_settings,
    redis_url,
)
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Site


def test_url_comes_from_the_component_then_polite_then_scrapy_redis_settings():
    settings = Settings(
        {
            "POLITE_HTTPCACHE_REDIS_URL": "redis://cache:1/0",
            "POLITE_REDIS_URL": "redis://polite:2/0",
            "REDIS_URL": "redis://cluster:3/0",
        }
    )
    assert redis_url(settings, "POLITE_HTTPCACHE_REDIS_URL") == "redis://cache:1/0"
    assert redis_url(settings, "POLITE_ROBOTS_REDIS_URL") == "redis://polite:2/0"
    del settings["POLITE_REDIS_URL"]
    assert redis_url(settings) == "redis://cluster:3/0"


def test_scrapy_redis_host_and_port_make_a_url_and_nothing_set_means_no_redis():
    assert redis_url(Settings({"REDIS_HOST": "10.0.0.5", "REDIS_PORT": 6380})) == (
        "redis://10.0.0.5:6380"
    )
    assert redis_url(Settings()) is None


def test_a_bad_url_names_the_setting_and_hides_the_password():
    with pytest.raises(PoliteSettingError, match="POLITE_REDIS_URL") as error:
        redis_url(Settings({"POLITE_REDIS_URL": "http://user:s3cret@host:6379"}))
    assert "s3cret" not in str(error.value)


def test_redact_hides_only_the_password():
    assert redact("redis://user:s3cret@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact("rediss://:s3cret@host/0") == "rediss://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_client_talks_to_a_real_redis_with_short_timeouts_and_scrapy_redis_params(
    redis_server: RedisServer,
):
    settings = Settings({"POLITE_REDIS_TIMEOUT": 0.25, "REDIS_PARAMS": {"client_name": "polite"}})
    client = redis_from_settings(settings, redis_server.url)
    assert client.ping()
    assert client.client_getname() == "polite"
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25


def test_tls_and_unix_socket_urls_choose_their_connection_kinds():
    tls = redis_from_settings(Settings(), "rediss://:pw@127.0.0.1:6390/0")
    unix = redis_from_settings(Settings(), "unix:///tmp/polite-test.sock?db=0")
    assert tls.connection_pool.connection_class is redis.SSLConnection
    assert unix.connection_pool.connection_class is redis.UnixDomainSocketConnection


def test_a_stopped_redis_is_a_connection_error_not_a_hang(redis_server: RedisServer):
    client = redis_from_settings(Settings(), redis_server.url)
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_an_invalid_timeout_is_rejected_with_its_name():
    with pytest.raises(PoliteSettingError, match="POLITE_REDIS_TIMEOUT"):
        redis_from_settings(Settings({"POLITE_REDIS_TIMEOUT": 0}), "redis://127.0.0.1:1/0")


def test_clients_never_retry_so_a_failing_call_cannot_sleep_on_the_reactor():
    # A server that accepts connections and hangs up at once: each try is one accept.
    # REDIS_PARAMS asks for retries on connection errors; redis-py would sleep between them.
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)

        def hang_up() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                accepted.append(connection)
                connection.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        settings = Settings({"REDIS_PARAMS": {"retry_on_error": [redis.ConnectionError]}})
        client = redis_from_settings(settings, f"redis://127.0.0.1:{server.getsockname()[1]}/0")
        with pytest.raises(redis.ConnectionError):
            client.ping()
        thread.join()
    assert len(accepted) == 1


# -- the link: health shared by the components of a crawler -------------------------------
def _link(url: str, interval: float = 0.2) -> tuple[RedisLink, MemoryStatsCollector]:
    crawler = get_crawler(Spider, {"POLITE_REDIS_RETRY_INTERVAL": interval})
    crawler.stats = MemoryStatsCollector(crawler)
    return RedisLink.open(crawler, url, "httpcache", "the HTTP cache is skipped"), crawler.stats


def test_an_outage_is_one_warning_skipped_calls_then_one_info_when_redis_is_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    link, stats = _link(redis_server.url)
    assert link.blocking("httpcache", ("SET", "k", "v"), ("GET", "k")) == [True, b"v"]
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="scrapy_polite._redis"):
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                link.blocking_get("httpcache", "k")
        redis_server.start()
        time.sleep(0.25)  # past the retry window
        assert link.blocking_get("httpcache", "k") is None  # a new, empty server
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == ["WARNING", "INFO"], messages
    assert "httpcache: the HTTP cache is skipped" in messages[0][1]
    assert "answers again after" in messages[1][1]
    assert stats.get_value("polite/redis/error") == 1
    assert stats.get_value("polite/redis/outage") == 1
    assert stats.get_value("polite/redis/skipped/httpcache") == 2


def test_components_of_one_crawler_share_one_link_per_server(redis_server: RedisServer):
    crawler = get_crawler(Spider, {})
    first = RedisLink.open(crawler, redis_server.url, "httpcache", "a")
    second = RedisLink.open(crawler, redis_server.url, "robots", "b")
    other = RedisLink.open(get_crawler(Spider, {}), redis_server.url, "robots", "b")
    assert first is second
    assert other is not first
    first.release()
    assert second.blocking("robots", ("PING",)) == [True]  # still open for its other user
    second.release()


def test_a_command_error_is_its_reply_not_an_outage(redis_server: RedisServer):
    link, stats = _link(redis_server.url)
    replies = link.blocking("httpcache", ("SET", "k", "v"), ("LPUSH", "k", "x"), ("GET", "k"))
    assert replies[0] is True
    assert isinstance(replies[1], redis.ResponseError)
    assert replies[2] == b"v"
    assert stats.get_value("polite/redis/error") is None


@deferred_f_from_coro_f
async def test_an_awaited_call_does_not_block_and_gives_the_same_replies(redis_server: RedisServer):
    link, _ = _link(redis_server.url)
    assert await link.call("robots", ("SET", "k", "v"), ("GET", "k")) == [True, b"v"]


@deferred_f_from_coro_f
async def test_calls_in_turn_give_raw_replies_and_a_restarted_redis_is_not_an_outage(
    redis_server: RedisServer,
):
    link, stats = _link(redis_server.url)
    replies = await link.call_in_turn(
        "httpcache", ("SET", "k", "v"), ("LPUSH", "k", "x"), ("GET", "k")
    )
    assert replies[0] == b"OK"  # the link's own connection: raw replies
    assert isinstance(replies[1], redis.ResponseError)
    assert replies[2] == b"v"
    redis_server.stop()
    redis_server.start()  # the connection kept from the first call is stale now
    assert await link.call_in_turn("httpcache", ("GET", "k")) == [None]
    assert stats.get_value("polite/redis/error") is None
    redis_server.stop()
    with pytest.raises(RedisUnavailable):
        await link.call_in_turn("httpcache", ("GET", "k"))
    assert stats.get_value("polite/redis/outage") == 1
    link.release()


def test_domain_keys_put_every_key_of_a_domain_in_one_cluster_hash_slot():
    keys = [
        domain_key("example.com", "robots", "https://example.com:443"),
        domain_key("example.com", "pace"),
    ]
    assert keys[0] == "polite:{example.com}:robots:https://example.com:443"
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"example.com")}


# -- a Redis with a password and TLS, end to end ----------------------------------------------
@pytest.fixture(scope="module")
def secure_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret-pass", tls=True)
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server cannot serve TLS")
    yield server
    server.__exit__()


def _secure_crawl_settings(url: str) -> dict[str, object]:
    return {
        "ADDONS": {"scrapy_polite.Addon": 100},
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_polite.cluster.DupeFilter",
        "REDIS_URL": url,  # the cache, robots.txt's store and the cluster all use it
        "ROBOTSTXT_OBEY": True,
        "HTTPCACHE_ENABLED": True,
        "POLITE_DELAY": 0.05,
    }


def test_a_crawl_with_cache_robots_and_cluster_works_through_tls_and_a_password(
    site: Site, secure_redis: RedisServer
):
    host = site.hosts[0]
    site.set_pages(host, 5)
    urls = json.dumps([site.url(host, "/")])
    result = crawl(
        "tests.spiders.SharedSpider", _secure_crawl_settings(secure_redis.url), args={"urls": urls}
    )
    assert len(result.items) == 6
    assert result.stat("polite/redis/error") == 0
    assert result.stat("polite/httpcache/store") == 6
    assert result.stat("polite/cluster/reserved") >= 6  # the shared pace, through TLS
    client = secure_redis.client()
    assert client.exists(f"polite:{{{host}}}:pace")
    assert any(b":robots:" in key for key in client.scan_iter(f"polite:{{{host}}}:*"))
    assert "s3cret-pass" not in result.log


@pytest.mark.parametrize("wrong", ["password", "certificate"])
def test_a_wrong_password_or_an_untrusted_certificate_stops_the_crawl_naming_the_setting(
    site: Site, secure_redis: RedisServer, wrong: str
):
    # A wrong password; or no CA, so that the self-signed certificate is not trusted.
    url = secure_redis.url
    url = url.replace("s3cret-pass", "not-it") if wrong == "password" else url.split("?")[0]
    urls = json.dumps([site.url(site.hosts[0], "/")])
    result = crawl(
        "tests.spiders.SharedSpider",
        _secure_crawl_settings(url),
        args={"urls": urls},
        check=False,
    )
    assert result.items == []
    assert site.hits() == []  # not one request went out without the shared pace
    assert "Invalid setting REDIS_URL='rediss://:***@127.0.0.1:" in result.log
    expected = "accepts the password" if wrong == "password" else "TLS certificate the client"
    assert expected in result.log
    assert "not-it" not in result.log
