"""``scrapy polite-queue``: the shared queue, leases and dead letters, by the entry point."""

from __future__ import annotations

import json
import time

from scrapy_polite.testing.redis_server import RedisServer
from tests.conftest import scrapy_command

KEY = "shop:requests"


def _letter(domain: str, member: bytes, reason: str) -> str:
    return json.dumps(
        {"reason": reason, "domain": domain, "worker": "w1", "at": 0, "member": member.decode()}
    )


def test_the_command_shows_queue_leases_and_dead_letters_and_requeues_or_drops_them(
    tmp_path, redis_server: RedisServer
):
    client = redis_server.client()
    client.zadd(f"polite:{{a.example}}:queue:{KEY}", {b"m1": 0, b"m2": 0})
    client.zadd(f"{KEY}:domains", {"a.example": 0})
    client.hset(f"{KEY}:leased:w1", "7", b"lease")
    client.zadd(f"{KEY}:workers", {"w1": (time.time() + 60) * 1e6, "w2": 0})
    client.set(f"{KEY}:size", 3)
    client.rpush(f"{KEY}:dead", _letter("b.example", b"not json", "ValueError: bad entry"))
    url = ["--redis-url", redis_server.url]

    shown = scrapy_command(tmp_path, "polite-queue", "shop", *url)
    assert shown.returncode == 0, shown.stderr
    assert "3 requests queued or leased, 2 queued" in shown.stdout
    assert "a.example: 2 queued" in shown.stdout
    assert "worker w1: 1 leased (beating)" in shown.stdout
    assert "worker w2: 0 leased (expired" in shown.stdout
    assert "dead letters (shop:requests:dead): 1" in shown.stdout
    assert "b.example: ValueError: bad entry" in shown.stdout

    requeued = scrapy_command(tmp_path, "polite-queue", "shop", "--requeue-dead", *url)
    assert "1 dead letters requeued" in requeued.stdout
    assert client.zrange(f"polite:{{b.example}}:queue:{KEY}", 0, -1) == [b"not json"]
    assert client.get(f"{KEY}:size") == b"4"
    assert client.llen(f"{KEY}:dead") == 0

    client.rpush(f"{KEY}:dead", _letter("b.example", b"x", "again"))
    dropped = scrapy_command(tmp_path, "polite-queue", "shop", "--drop-dead", *url)
    assert "1 dead letters dropped" in dropped.stdout
    assert client.llen(f"{KEY}:dead") == 0


def test_the_command_names_the_settings_when_no_redis_url_is_known(tmp_path):
    result = scrapy_command(tmp_path, "polite-queue", "shop")
    assert result.returncode != 0
    assert "POLITE_REDIS_URL" in result.stdout + result.stderr
