"""A Redis storage for Scrapy's HTTP cache, shared by every crawler that points at it.

Enable it with ``HTTPCACHE_ENABLED = True`` (the add-on then sets
``HTTPCACHE_STORAGE = "scrapy_polite.httpcache.RedisCacheStorage"``). Scrapy's
``HttpCacheMiddleware`` and its policies (``DummyPolicy``, ``RFC2616Policy``)
decide what to cache and when to revalidate; this module only stores entries.

Keys are ``<POLITE_HTTPCACHE_PREFIX>:<namespace>:<fingerprint hex>``, where the
namespace is the spider's name, or ``POLITE_HTTPCACHE_NAMESPACE`` to share one
cache between spiders, and the fingerprint is the crawler's
``request_fingerprinter``. Each key holds one Redis string in an explicit
format (:mod:`scrapy_polite._httpcache_entry`), never pickle: Redis is shared,
and unpickling what another process wrote would run its code. An entry that
does not decode is a miss, counted in stats.

Scrapy calls a storage synchronously on the reactor thread. Through Scrapy's
own ``HttpCacheMiddleware`` each call is then one blocking round trip, bounded
by ``POLITE_REDIS_TIMEOUT``, and once ``store_response`` returns the entry is
in Redis, as with Scrapy's own storages. The add-on puts
:class:`RedisHttpCacheMiddleware` in its place: Scrapy's middleware, policies
and stats, except that the round trips are awaited instead of blocking the
reactor: one pipeline out at a time, the next carrying every read and write
asked for meanwhile. Its writes are in Redis before the response moves on to the
spider. Both go through the crawler's one Redis layer
(:mod:`scrapy_polite._redis`).

Batched stores are an option (``POLITE_HTTPCACHE_WRITE_BATCH`` above 1):
entries are then written in one pipeline when that many are waiting or
``POLITE_HTTPCACHE_WRITE_DELAY`` seconds have passed, and when the spider
closes; a read sees the entries still waiting. When Redis fails, the crawl goes
on without the cache until the layer's retry window ends.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from time import time
from typing import TYPE_CHECKING, Any, cast

import redis
from scrapy.downloadermiddlewares.httpcache import HttpCacheMiddleware
from twisted.internet.defer import Deferred

from scrapy_polite._httpcache_entry import CacheEntryError, decode_entry, encode_entry
from scrapy_polite._redis import (
    Command,
    RedisLink,
    RedisUnavailable,
    required_redis_url,
    verify_redis,
)
from scrapy_polite._settings import get_float, get_int, get_str

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy import Request, Spider
    from scrapy.http import Response
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from scrapy.utils.request import RequestFingerprinterProtocol
    from twisted.internet.base import DelayedCall, ReactorBase
    from twisted.python.failure import Failure
    from typing_extensions import Self

__all__ = [
    "DEFAULT_PREFIX",
    "URL_SETTING",
    "HttpCacheConfig",
    "NamespaceUsage",
    "RedisCacheStorage",
    "RedisHttpCacheMiddleware",
    "cache_usage",
    "clear_namespace",
]

logger = logging.getLogger(__name__)

URL_SETTING = "POLITE_HTTPCACHE_REDIS_URL"
DEFAULT_PREFIX = "polite:httpcache"
COMPONENT = "httpcache"

# What a read ahead left for retrieve_response(): nothing yet, or "Redis is away".
_NOT_READ = object()
_UNAVAILABLE = object()


@dataclass(frozen=True)
class HttpCacheConfig:
    """Every setting of the Redis HTTP cache, read and validated once."""

    url: str
    prefix: str
    namespace: str | None  # None: the spider's name
    expiration_secs: int  # 0: never expire
    compression_level: int  # 0: never compress
    compress_min_size: int
    max_body_size: int
    write_batch: int
    write_delay: float

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        url = required_redis_url(settings, URL_SETTING, "the HTTP cache")
        prefix = get_str(settings, "POLITE_HTTPCACHE_PREFIX", DEFAULT_PREFIX)
        namespace = get_str(settings, "POLITE_HTTPCACHE_NAMESPACE", None, allow_none=True)
        assert prefix is not None
        return cls(
            url=url,
            prefix=prefix,
            namespace=namespace,
            expiration_secs=max(0, get_int(settings, "HTTPCACHE_EXPIRATION_SECS", 0)),
            compression_level=get_int(
                settings, "POLITE_HTTPCACHE_COMPRESSION_LEVEL", 1, minimum=0, maximum=9
            ),
            compress_min_size=get_int(
                settings, "POLITE_HTTPCACHE_COMPRESS_MIN_SIZE", 256, minimum=0
            ),
            max_body_size=get_int(
                settings, "POLITE_HTTPCACHE_MAX_BODY_SIZE", 8 * 1024 * 1024, minimum=0
            ),
            write_batch=get_int(
                settings, "POLITE_HTTPCACHE_WRITE_BATCH", 1, minimum=1, maximum=10_000
            ),
            write_delay=get_float(
                settings, "POLITE_HTTPCACHE_WRITE_DELAY", 0.1, minimum=0, maximum=60
            ),
        )


class RedisCacheStorage:
    """``HTTPCACHE_STORAGE`` for Scrapy's ``HttpCacheMiddleware``, in Redis.

    Built by Scrapy as ``RedisCacheStorage(settings)``; a missing Redis URL or
    a bad setting raises :class:`~scrapy_polite.PoliteSettingError` there, so
    the crawl stops at start-up. It takes the crawler's Redis link in
    :meth:`open_spider` and gives it back in :meth:`close_spider`.
    """

    def __init__(self, settings: BaseSettings) -> None:
        self.config = HttpCacheConfig.from_settings(settings)
        verify_redis(settings, URL_SETTING)  # a wrong password stops the crawl here
        self._ttl = self.config.expiration_secs or None  # never ``EX 0``
        self._link: RedisLink | None = None
        self._key_prefix = ""
        self._fingerprinter: RequestFingerprinterProtocol | None = None
        self._stats: StatsCollector | None = None
        self._pending: dict[str, bytes] = {}  # batched stores not yet written
        self._flush_call: DelayedCall | None = None
        self._read_ahead: dict[str, object] = {}  # key: reply of an awaited GET
        self._collected: list[tuple[str, bytes]] | None = None  # stores to await
        self._next_trip: list[Command] = []  # commands of this reactor turn
        self._trip_waiters: list[tuple[Deferred[list[Any]], int, int]] = []
        self._trip_out = False  # a pipeline is out, or about to go
        self._warned_decode = False
        self._warned_store = False

    # -- Scrapy's storage interface ---------------------------------------------
    def open_spider(self, spider: Spider) -> None:
        crawler = spider.crawler
        self._fingerprinter = crawler.request_fingerprinter
        self._stats = crawler.stats
        self._link = RedisLink.open(
            crawler, self.config.url, COMPONENT, "the HTTP cache is skipped"
        )
        namespace = self.config.namespace or spider.name
        self._key_prefix = f"{self.config.prefix}:{namespace}:"
        try:
            self._link.blocking(COMPONENT, ("PING",))
        except RedisUnavailable:
            return
        logger.info(
            "Redis HTTP cache at %s, keys %s* (%s)",
            self._link.shown_url,
            self._key_prefix,
            f"expire after {self._ttl} s" if self._ttl else "no expiry",
        )

    def close_spider(self, spider: Spider) -> None:
        self._flush()
        if self._link is not None:
            self._link.release()  # its clients reconnect if the storage is used again

    def retrieve_response(self, spider: Spider, request: Request) -> Response | None:
        key = self._key(request)
        data: object = self._pending.get(key)
        if data is None:
            data = self._read_ahead.pop(key, _NOT_READ)
            if data is _UNAVAILABLE:
                return None
            if data is _NOT_READ:
                assert self._link is not None, "open_spider() was not called"
                try:
                    data = self._link.blocking_get(COMPONENT, key)
                except RedisUnavailable:
                    return None
            if isinstance(data, redis.ResponseError):  # WRONGTYPE: a key that is not ours
                self._undecodable(key, str(data))
                return None
            if data is None:
                self._inc("miss")
                return None
        try:
            entry = decode_entry(cast("bytes", data))
            if self._ttl and time() - entry.stored_at > self._ttl:
                self._inc("expired")
                return None
            response = entry.response()
        except CacheEntryError as exc:
            self._undecodable(key, str(exc))
            return None
        self._inc("hit")
        request.meta["cache_timestamp"] = entry.stored_at
        return response

    def store_response(self, spider: Spider, request: Request, response: Response) -> None:
        # Scrapy does not catch what this raises, and the spider would lose the
        # response: no failure to cache may escape.
        try:
            self._store(request, response)
        except Exception:
            self._unexpected(f"Could not cache {response}")

    # -- awaited reads and writes (RedisHttpCacheMiddleware) -------------------------
    async def read_ahead(self, request: Request) -> str:
        """GET *request*'s entry, awaited, for the :meth:`retrieve_response` that
        follows; return its key, for :meth:`forget_read_ahead` after the lookup.

        The GET shares a pipeline with the other reads and writes (see
        :meth:`_round_trip`).
        """
        assert self._link is not None, "open_spider() was not called"
        key = self._key(request)
        if key in self._pending:
            return key
        try:
            (reply,) = await self._round_trip([("GET", key)])
        except RedisUnavailable:
            reply = _UNAVAILABLE
        except Exception:  # not Redis's failure: let the blocking lookup try, and report
            logger.debug("Could not read %s ahead", request, exc_info=True)
            return key
        self._read_ahead[key] = reply
        return key

    def forget_read_ahead(self, key: str) -> None:
        self._read_ahead.pop(key, None)

    @contextmanager
    def collecting_stores(self) -> Iterator[list[tuple[str, bytes]]]:
        """Inside, :meth:`store_response` encodes entries into the list it yields
        instead of writing them; :meth:`write` them, awaited, after."""
        collected: list[tuple[str, bytes]] = []
        # Batched stores keep their own schedule.
        self._collected = collected if self.config.write_batch == 1 else None
        try:
            yield collected
        finally:
            self._collected = None

    async def write(self, entries: list[tuple[str, bytes]]) -> None:
        """Write *entries* (from :meth:`collecting_stores`), awaited; never raises."""
        expiry = ("EX", self._ttl) if self._ttl else ()
        try:
            replies = await self._round_trip([("SET", key, data, *expiry) for key, data in entries])
        except RedisUnavailable:
            self._inc("store_failed", len(entries))
            return
        except Exception:  # the response still goes on to the spider
            self._unexpected("Could not write cache entries")
            return
        self._count_stores([data for _, data in entries], replies)

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        """The replies to *commands*, sent in one pipeline with the other commands
        asked for meanwhile.

        One pipeline is in flight at a time: what is asked for while it is out
        goes in the next one, sent as soon as it is answered. Commands asked for
        while none is out go at the end of this reactor turn. So a Redis far
        away gets fewer, fuller pipelines, and a near one answers at once.
        """
        from scrapy.utils.defer import maybe_deferred_to_future

        if not self._next_trip and not self._trip_out:
            from twisted.internet import reactor

            self._trip_out = True
            cast("ReactorBase", reactor).callLater(0, self._send_trip)
        waiter: Deferred[list[Any]] = Deferred()
        self._trip_waiters.append((waiter, len(self._next_trip), len(commands)))
        self._next_trip.extend(commands)
        return await maybe_deferred_to_future(waiter)

    def _send_trip(self) -> None:
        from scrapy.utils.defer import deferred_from_coro

        assert self._link is not None
        commands, self._next_trip = self._next_trip, []
        waiters, self._trip_waiters = self._trip_waiters, []
        if not commands:
            self._trip_out = False
            return
        self._inc("round_trip")

        def answer(replies: list[Any]) -> None:
            for waiter, start, count in waiters:
                waiter.callback(replies[start : start + count])

        def fail(failure: Failure) -> None:
            for waiter, _, _ in waiters:
                waiter.errback(failure)

        trip: Deferred[list[Any]] = deferred_from_coro(
            self._link.call_in_turn(COMPONENT, *commands)
        )
        trip.addCallbacks(answer, fail)
        trip.addBoth(lambda _: self._send_trip())  # what was asked for meanwhile

    # -- writing --------------------------------------------------------------------
    def _store(self, request: Request, response: Response) -> None:
        assert self._link is not None, "open_spider() was not called"
        if not self._link.available(COMPONENT):
            return
        if len(response.body) > self.config.max_body_size:
            self._inc("too_large")
            logger.debug(
                "Not caching %s: its body is over POLITE_HTTPCACHE_MAX_BODY_SIZE", response
            )
            return
        data = encode_entry(
            response,
            stored_at=time(),
            compression_level=self.config.compression_level,
            compress_min_size=self.config.compress_min_size,
        )
        if self._collected is not None:
            self._collected.append((self._key(request), data))
            return
        if self.config.write_batch == 1:
            self._write(self._key(request), data)
            return
        self._pending[self._key(request)] = data
        if len(self._pending) >= self.config.write_batch:
            self._flush()
        elif self._flush_call is None:
            from twisted.internet import reactor

            clock = cast("ReactorBase", reactor)
            self._flush_call = clock.callLater(self.config.write_delay, self._flush_later)

    def _write(self, key: str, data: bytes) -> None:
        """One entry, in Redis before this returns."""
        assert self._link is not None
        expiry = ("EX", self._ttl) if self._ttl else ()
        try:
            reply = self._link.blocking_one(COMPONENT, "SET", key, data, *expiry)
        except RedisUnavailable:
            self._inc("store_failed")
            return
        self._count_stores([data], [reply])

    def _flush_later(self) -> None:
        self._flush_call = None
        try:
            self._flush()
        except Exception:
            self._unexpected("Could not write cache entries")

    def _flush(self) -> None:
        """Write every waiting entry in one pipeline."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        batch, self._pending = self._pending, {}
        if not batch or self._link is None:
            return
        expiry = ("EX", self._ttl) if self._ttl else ()
        try:
            results = self._link.blocking(
                COMPONENT, *(("SET", key, data, *expiry) for key, data in batch.items())
            )
        except RedisUnavailable:
            self._inc("store_failed", len(batch))
            return
        self._count_stores(list(batch.values()), results)

    def _count_stores(self, entries: list[bytes], replies: list[Any]) -> None:
        """Stats for *entries* written with *replies* (``True`` or ``b"OK"``: stored)."""
        ok = [r is True or r == b"OK" for r in replies]
        stored = [data for data, stored in zip(entries, ok, strict=True) if stored]
        self._inc("store", len(stored))
        self._inc("stored_bytes", sum(len(data) for data in stored))
        errors = [r for r, stored in zip(replies, ok, strict=True) if not stored]
        if errors:
            self._inc("store_failed", len(errors))
            logger.warning("Redis refused %d cache entries: %s", len(errors), errors[0])

    # -- helpers --------------------------------------------------------------------
    def _key(self, request: Request) -> str:
        assert self._fingerprinter is not None, "open_spider() was not called"
        return self._key_prefix + self._fingerprinter.fingerprint(request).hex()

    def _undecodable(self, key: str, reason: str) -> None:
        self._inc("decode_error")
        log = logger.debug if self._warned_decode else logger.warning
        self._warned_decode = True
        log("Cache entry %s cannot be read (%s): treated as a miss", key, reason)

    def _unexpected(self, message: str) -> None:
        self._inc("store_error")
        log = logger.debug if self._warned_store else logger.error
        self._warned_store = True
        log("%s; the crawl goes on", message, exc_info=True)

    def _inc(self, event: str, count: int = 1) -> None:
        if self._stats is not None and count:
            self._stats.inc_value(f"polite/httpcache/{event}", count)


class RedisHttpCacheMiddleware(HttpCacheMiddleware):
    """Scrapy's ``HttpCacheMiddleware``, awaiting the Redis storage instead of blocking on it.

    The add-on puts it in the place of Scrapy's (900) when the storage is
    :class:`RedisCacheStorage`. Scrapy's code still decides everything (the
    policy, ``dont_cache``, ``HTTPCACHE_IGNORE_MISSING``, revalidation, stats);
    this class only moves the Redis round trips off the reactor thread. Before
    Scrapy's lookup it reads the entry, awaited; after Scrapy's
    ``process_response`` it writes what that asked to store, awaited, so the
    entry is in Redis before the response goes on to the spider. With any other
    storage it is Scrapy's middleware.
    """

    async def process_request(  # type: ignore[override]
        self, request: Request, spider: Spider | None = None
    ) -> Request | Response | None:
        storage = self.storage
        if (
            not isinstance(storage, RedisCacheStorage)
            or request.meta.get("dont_cache", False)
            or not self.policy.should_cache_request(request)
        ):
            return super().process_request(request)
        key = await storage.read_ahead(request)
        try:
            return super().process_request(request)
        finally:
            storage.forget_read_ahead(key)

    async def process_response(  # type: ignore[override]
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        storage = self.storage
        if not isinstance(storage, RedisCacheStorage):
            return super().process_response(request, response)
        with storage.collecting_stores() as entries:
            result = super().process_response(request, response)
        if entries:
            await storage.write(entries)
        return result


# -- inspecting and clearing ------------------------------------------------------------
@dataclass(frozen=True)
class NamespaceUsage:
    """What one namespace holds: entries and their bytes in Redis (values only)."""

    entries: int
    bytes: int


def cache_usage(client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> dict[str, NamespaceUsage]:
    """Entries and bytes per namespace under *prefix*, with ``SCAN`` (never ``KEYS``)."""
    totals: dict[str, list[int]] = {}
    for keys in _scan_batches(client, f"{_escape_glob(prefix)}:*"):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        for key, size in zip(keys, pipe.execute(), strict=True):
            namespace = _namespace_of(key.decode("utf-8", "replace"), prefix)
            if namespace is None:
                continue
            counts = totals.setdefault(namespace, [0, 0])
            counts[0] += 1
            counts[1] += int(size)
    return {ns: NamespaceUsage(*counts) for ns, counts in sorted(totals.items())}


def clear_namespace(client: redis.Redis, namespace: str, prefix: str = DEFAULT_PREFIX) -> int:
    """Delete every entry of *namespace*; return how many were deleted."""
    deleted = 0
    for keys in _scan_batches(client, f"{_escape_glob(prefix)}:{_escape_glob(namespace)}:*"):
        deleted += int(client.unlink(*keys))
    return deleted


# -- private helpers ------------------------------------------------------------------
def _scan_batches(client: redis.Redis, pattern: str, count: int = 1000) -> Iterator[list[bytes]]:
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=count)
        if keys:
            yield cast("list[bytes]", keys)
        if cursor == 0:
            return


def _namespace_of(key: str, prefix: str) -> str | None:
    if not key.startswith(prefix + ":"):
        return None
    rest = key[len(prefix) + 1 :]
    namespace, sep, _fingerprint = rest.rpartition(":")
    return namespace if sep else None


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
