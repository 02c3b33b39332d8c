"""The shared robots.txt store against a real Redis: one claim script, JSON entries, the lock."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
from redis.crc import key_slot
from scrapy.settings import Settings
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_polite._redis import RedisLink, RedisUnavailable
from scrapy_polite._robots_rules import Outcome
from scrapy_polite._robots_store import RobotsStore
from scrapy_polite.testing.redis_server import RedisServer

HOST = "127.0.0.2"
ORIGIN = f"http://{HOST}:8000"
KEY = f"polite:{{{HOST}}}:robots:{ORIGIN}"


def _store(url: str, expiry: float = 60.0) -> tuple[RobotsStore, MemoryStatsCollector]:
    stats = MemoryStatsCollector(get_crawler())
    link = RedisLink(Settings({"POLITE_REDIS_RETRY_INTERVAL": 30}), url, stats)
    return RobotsStore(link, expiry=expiry, lock_ttl=5.0), stats


@deferred_f_from_coro_f
async def test_the_first_claim_gets_the_lock_the_next_waits_then_both_read_the_result(
    redis_server: RedisServer,
):
    first, _ = _store(redis_server.url)
    second, _ = _store(redis_server.url)
    claim = await first.claim(HOST, ORIGIN)
    assert claim.lock is not None
    assert claim.outcome is None
    waiting = await second.claim(HOST, ORIGIN)
    assert waiting.lock is None
    assert waiting.outcome is None
    rules = Outcome("rules", "200", "User-agent: *\nDisallow: /x\n")
    await first.publish(HOST, ORIGIN, claim.lock, rules, retry_in=10)
    found = await second.claim(HOST, ORIGIN)
    assert found.outcome is not None
    assert (found.outcome.kind, found.outcome.text) == ("rules", rules.text)
    assert found.outcome.detail == "200, from Redis"
    assert found.outcome.ttl is not None
    assert 59 < found.outcome.ttl <= 60
    client = redis_server.client()
    assert json.loads(client.get(KEY))["body"] == rules.text
    assert not client.exists(KEY + ":lock")  # given back with the result


@deferred_f_from_coro_f
async def test_an_unreachable_result_is_a_short_down_marker_never_a_file(
    redis_server: RedisServer,
):
    store, _ = _store(redis_server.url)
    claim = await store.claim(HOST, ORIGIN)
    assert claim.lock is not None
    await store.publish(HOST, ORIGIN, claim.lock, Outcome("unreachable", "503"), retry_in=4)
    client = redis_server.client()
    assert client.get(KEY) is None
    assert 3000 < client.pttl(KEY + ":down") <= 4000
    seen = await store.claim(HOST, ORIGIN)
    assert seen.outcome is not None
    assert seen.outcome.kind == "unreachable"
    assert seen.outcome.retry_in is not None
    assert 3 < seen.outcome.retry_in <= 4
    assert seen.outcome.detail == "503, seen by another crawler"


@pytest.mark.parametrize(
    "planted",
    [
        pickle.dumps({"kind": "rules"}),
        b"not json",
        json.dumps({"v": 99, "kind": "rules", "body": ""}).encode(),
        json.dumps({"v": 1, "kind": "exec", "body": ""}).encode(),
        json.dumps({"v": 1, "kind": "rules", "body": 5}).encode(),
    ],
)
@deferred_f_from_coro_f
async def test_an_entry_that_is_not_ours_is_fetched_again_never_trusted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, planted: bytes
):
    redis_server.client().set(KEY, planted)
    store, _ = _store(redis_server.url)
    with caplog.at_level(logging.WARNING, logger="scrapy_polite._robots_store"):
        claim = await store.claim(HOST, ORIGIN)
    assert claim.outcome is None
    assert claim.lock is not None
    assert "Ignoring an unreadable robots.txt entry" in caplog.text


def test_every_key_of_an_origin_is_in_its_hosts_hash_slot():
    slots = {key_slot(k.encode()) for k in (KEY, KEY + ":down", KEY + ":lock")}
    assert slots == {key_slot(HOST.encode())}


@deferred_f_from_coro_f
async def test_a_stopped_redis_is_unavailable_and_then_skipped_until_the_retry_window_ends(
    redis_server: RedisServer,
):
    store, stats = _store(redis_server.url)
    redis_server.stop()
    with pytest.raises(RedisUnavailable):
        await store.claim(HOST, ORIGIN)
    with pytest.raises(RedisUnavailable, match="retry window"):
        await store.claim(HOST, ORIGIN)
    assert stats.get_value("polite/redis/error") == 1
    assert stats.get_value("polite/redis/outage") == 1
    assert stats.get_value("polite/redis/skipped/robots") == 1
