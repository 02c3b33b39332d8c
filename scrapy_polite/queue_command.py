"""``scrapy polite-queue``: the cluster's shared queue, its leases and its dead letters.

::

    scrapy polite-queue myspider                  # queued per domain, leases per worker
    scrapy polite-queue myspider --requeue-dead   # put the quarantined entries back
    scrapy polite-queue myspider --drop-dead      # forget them

A queue entry that cannot be trusted (it does not decode, names a class that is
not an imported ``Request`` subclass, or a callback that is not the spider's
method) is never run: a worker moves it to the dead-letter list
``<queue key>:dead`` with the reason. Requeue them once the spider can read
them (a new release of it), or drop them. The Redis URL comes from the
project's settings (``POLITE_CLUSTER_REDIS_URL``, ``POLITE_REDIS_URL``,
``REDIS_URL``), ``-s``, or ``--redis-url``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from scrapy_polite._redis import RedisLink, command_redis_url, domain_key, redact
from scrapy_polite.cluster import URL_SETTING, dead_letter_key, queue_key, workers_key

if TYPE_CHECKING:
    import argparse

__all__ = ["PoliteQueueCommand"]

_SHOWN = 20  # domains, and dead letters, listed


class PoliteQueueCommand(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings: ClassVar[dict[str, Any]] = {"LOG_ENABLED": False}

    def syntax(self) -> str:
        return "SPIDER [--requeue-dead | --drop-dead] [--redis-url URL]"

    def short_desc(self) -> str:
        return "Show a cluster's shared queue, its leases and its dead letters"

    def long_desc(self) -> str:
        return (
            "Shows SPIDER's shared queue: requests queued per domain, leased per worker "
            "(and whether the worker still beats), and the quarantined entries. "
            "--requeue-dead puts the dead letters back in their domains' queues; "
            "--drop-dead deletes them. The Redis URL comes from POLITE_CLUSTER_REDIS_URL, "
            "POLITE_REDIS_URL, REDIS_URL, -s, or --redis-url."
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--requeue-dead", action="store_true", help="requeue dead letters")
        group.add_argument("--drop-dead", action="store_true", help="delete dead letters")
        parser.add_argument("--redis-url", metavar="URL", help="the cluster's Redis")

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        assert self.settings is not None
        if len(args) != 1:
            raise UsageError("name the spider whose queue to show", print_help=False)
        spider = args[0]
        url = command_redis_url(self.settings, URL_SETTING, opts.redis_url)
        link = RedisLink.standalone(self.settings, url)
        key = queue_key(self.settings, spider)
        try:
            if opts.requeue_dead:
                print(f"{spider}: {_requeue_dead(link.client, key)} dead letters requeued")
            elif opts.drop_dead:
                dropped = len(link.client.lrange(dead_letter_key(key), 0, -1))
                link.client.delete(dead_letter_key(key))
                print(f"{spider}: {dropped} dead letters dropped")
            else:
                print(_overview(link.client, key, workers_key(self.settings, spider)))
        except redis.RedisError as exc:
            print(f"Redis at {redact(url)}: {type(exc).__name__}: {exc}")
            self.exitcode = 1
        finally:
            link.release()


def _overview(redis_client: redis.Redis, key: str, workers: str) -> str:
    client: Any = redis_client  # redis-py's reply types are unions of every decoding
    size = int(client.get(f"{key}:size") or 0)
    domains = [d.decode() for d in client.zrange(f"{key}:domains", 0, -1)]
    queued = {d: client.zcard(domain_key(d, "queue", key)) for d in domains}
    now = time.time() * 1_000_000
    lines = [f"queue {key}: {size} requests queued or leased, {sum(queued.values())} queued"]
    for domain, count in sorted(queued.items(), key=lambda kv: -kv[1])[:_SHOWN]:
        lines.append(f"  {domain}: {count} queued")
    if len(queued) > _SHOWN:
        lines.append(f"  ... and {len(queued) - _SHOWN} more domains")
    for worker, expiry in client.zrange(workers, 0, -1, withscores=True):
        name = worker.decode()
        state = "beating" if expiry > now else "expired: its leases go back to the queue"
        leased = client.hlen(f"{key}:leased:{name}")
        lines.append(f"worker {name}: {leased} leased ({state})")
    dead = client.lrange(dead_letter_key(key), 0, -1)
    lines.append(f"dead letters ({dead_letter_key(key)}): {len(dead)}")
    for raw in dead[:_SHOWN]:
        letter = _letter(raw)
        reason = letter.get("reason", repr(raw[:120]))
        lines.append(f"  {letter.get('domain', '?')}: {reason}")
    return "\n".join(lines)


def _letter(raw: bytes) -> dict[str, Any]:
    try:
        letter = json.loads(raw)
    except ValueError:
        return {}
    return letter if isinstance(letter, dict) else {}


def _requeue_dead(redis_client: redis.Redis, key: str) -> int:
    """Move every dead letter back to its domain's queue, first in line; how many."""
    client: Any = redis_client
    dead = dead_letter_key(key)
    moved = 0
    while (raw := client.lpop(dead)) is not None:
        letter = _letter(raw)
        if not isinstance(letter.get("member"), str) or not isinstance(letter.get("domain"), str):
            continue  # not a letter a worker wrote: nothing to requeue
        domain = letter["domain"]
        pipe = client.pipeline(transaction=True)
        pipe.zadd(domain_key(domain, "queue", key), {letter["member"].encode("latin-1"): 0})
        pipe.zadd(f"{key}:domains", {domain: 0}, nx=True)
        pipe.incr(f"{key}:size")
        pipe.execute()
        moved += 1
    return moved
