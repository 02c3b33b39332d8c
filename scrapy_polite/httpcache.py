"""A Redis storage for Scrapy's HTTP cache, shared by every crawler that points at it.

Enable it with ``HTTPCACHE_ENABLED = True`` (the add-on then sets
``HTTPCACHE_STORAGE = "scrapy_polite.httpcache.RedisCacheStorage"``). Scrapy's
``HttpCacheMiddleware`` and its policies (``DummyPolicy``, ``RFC2616Policy``)
decide what to cache and when to revalidate; this module only stores entries.

Keys are ``<POLITE_HTTPCACHE_PREFIX>:<namespace>:<fingerprint hex>``, where the
namespace is the spider's name, or ``POLITE_HTTPCACHE_NAMESPACE`` to share one
cache between spiders, and the fingerprint is the crawler's
``request_fingerprinter``. Each key holds one Redis string in an explicit
format, never pickle (Redis is shared, and unpickling what another process
wrote would run its code)::

    SPHC/1\\n{"status": 200, "url": ..., "headers": [[name, value], ...], ...}\\n<body>

a magic line, one line of JSON (status, URL, every header value in order,
stored-at time, body encoding and size, response class), then the body, raw or
zlib-compressed. An entry that does not decode is a miss, counted in stats.

Scrapy calls a storage synchronously on the reactor thread, so each call is
one bounded Redis command (short socket timeouts from
:func:`~scrapy_polite.redis_client.redis_from_settings`). Stores are batched:
they are written in one pipeline when ``POLITE_HTTPCACHE_WRITE_BATCH`` entries
are waiting or ``POLITE_HTTPCACHE_WRITE_DELAY`` seconds have passed, and when
the spider closes; a read sees the entries still waiting. When Redis fails, the
crawl goes on without the cache: one warning, then Redis is left alone for
``POLITE_HTTPCACHE_RETRY_INTERVAL`` seconds at a time until it answers again.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from ipaddress import ip_address
from time import monotonic, time
from typing import TYPE_CHECKING, Any, cast

import redis
from scrapy.http import Headers, HtmlResponse, JsonResponse, Response, TextResponse, XmlResponse
from scrapy.responsetypes import responsetypes

from scrapy_polite._settings import PoliteSettingError, get_float, get_int, get_str
from scrapy_polite.redis_client import redact, redis_from_settings, redis_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy import Request, Spider
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from scrapy.utils.request import RequestFingerprinterProtocol
    from twisted.internet.base import DelayedCall, ReactorBase
    from typing_extensions import Self

logger = logging.getLogger(__name__)

URL_SETTING = "POLITE_HTTPCACHE_REDIS_URL"
DEFAULT_PREFIX = "polite:httpcache"

#: The first bytes of every entry: the format's name and version.
MAGIC = b"SPHC/1\n"

# Response classes an entry may name; anything else is guessed from the
# headers, URL and body, as Scrapy's downloader does. A class path read from
# Redis is never imported.
_CLASSES: dict[str, type[Response]] = {
    "response": Response,
    "text": TextResponse,
    "html": HtmlResponse,
    "xml": XmlResponse,
    "json": JsonResponse,
}
_CLASS_NAMES = {cls: name for name, cls in _CLASSES.items()}

# Bodies of these types are already compressed: zlib would spend time for nothing.
_COMPRESSED_TYPES = (b"image/", b"audio/", b"video/", b"font/woff")
_COMPRESSED_SUBTYPES = (b"zip", b"gzip", b"x-gzip", b"x-7z-compressed", b"x-bzip2", b"x-xz")
# No body announcing more than this is decompressed (Scrapy's DOWNLOAD_MAXSIZE default).
_MAX_BODY_SIZE = 1024 * 1024 * 1024
# A compressed body is kept only if it is at most this fraction of the raw one.
_WORTH_IT = 0.9


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
    retry_interval: float

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        url = redis_url(settings, URL_SETTING)
        if url is None:
            raise PoliteSettingError(
                URL_SETTING,
                None,
                "a redis://, rediss:// or unix:// URL for the HTTP cache "
                "(or set POLITE_REDIS_URL, or scrapy-redis's REDIS_URL)",
            )
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
                settings, "POLITE_HTTPCACHE_WRITE_BATCH", 64, minimum=1, maximum=10_000
            ),
            write_delay=get_float(
                settings, "POLITE_HTTPCACHE_WRITE_DELAY", 0.1, minimum=0, maximum=60
            ),
            retry_interval=get_float(
                settings, "POLITE_HTTPCACHE_RETRY_INTERVAL", 2.0, minimum=0, maximum=3600
            ),
        )


class RedisCacheStorage:
    """``HTTPCACHE_STORAGE`` for Scrapy's ``HttpCacheMiddleware``, in Redis.

    Built by Scrapy as ``RedisCacheStorage(settings)``; a missing Redis URL or
    a bad setting raises :class:`~scrapy_polite.PoliteSettingError` there, so
    the crawl stops at start-up. The client connects lazily and is closed in
    :meth:`close_spider`.
    """

    def __init__(self, settings: BaseSettings) -> None:
        self.config = HttpCacheConfig.from_settings(settings)
        self._client = redis_from_settings(settings, self.config.url)
        # Reads go through one connection of the storage's own (the reactor thread
        # is the only user), without the pool's bookkeeping on every GET.
        self._reader = self._client.connection_pool.make_connection()
        self._reader_used = False  # has it answered since it last (re)connected?
        self._ttl = self.config.expiration_secs or None  # never ``EX 0``
        self._url = redact(self.config.url)
        self._key_prefix = ""
        self._fingerprinter: RequestFingerprinterProtocol | None = None
        self._stats: StatsCollector | None = None
        self._pending: dict[str, bytes] = {}
        self._flush_call: DelayedCall | None = None
        self._skip_until = 0.0  # monotonic time before which Redis is not called
        self._outage_since: float | None = None
        self._warned_decode = False
        self._warned_store = False

    # -- Scrapy's storage interface ---------------------------------------------
    def open_spider(self, spider: Spider) -> None:
        crawler = spider.crawler
        self._fingerprinter = crawler.request_fingerprinter
        self._stats = crawler.stats
        namespace = self.config.namespace or spider.name
        self._key_prefix = f"{self.config.prefix}:{namespace}:"
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._failed(exc)
            return
        logger.info(
            "Redis HTTP cache at %s, keys %s* (%s)",
            self._url,
            self._key_prefix,
            f"expire after {self._ttl} s" if self._ttl else "no expiry",
        )

    def close_spider(self, spider: Spider) -> None:
        self._flush()
        self._reader.disconnect()  # type: ignore[no-untyped-call]
        self._client.close()

    def retrieve_response(self, spider: Spider, request: Request) -> Response | None:
        key = self._key(request)
        data = self._pending.get(key)
        if data is None:
            if not self._may_call("retrieve"):
                return None
            try:
                data = self._get(key)
            except redis.ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    self._undecodable(key, "not a string")
                else:
                    self._failed(exc)
                return None
            except redis.RedisError as exc:
                self._failed(exc)
                return None
            self._answered()
            if data is None:
                self._inc("miss")
                return None
        try:
            entry = decode_entry(data)
        except CacheEntryError as exc:
            self._undecodable(key, str(exc))
            return None
        if self._ttl and time() - entry.stored_at > self._ttl:
            self._inc("expired")
            return None
        self._inc("hit")
        request.meta["cache_timestamp"] = entry.stored_at
        return entry.response()

    def store_response(self, spider: Spider, request: Request, response: Response) -> None:
        # Scrapy does not catch what this raises, and the spider would lose the
        # response: no failure to cache may escape.
        try:
            self._store(request, response)
        except Exception:
            self._unexpected(f"Could not cache {response}")

    # -- writing --------------------------------------------------------------------
    def _store(self, request: Request, response: Response) -> None:
        if not self._may_call("store"):
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
        self._pending[self._key(request)] = data
        if len(self._pending) >= self.config.write_batch:
            self._flush()
        elif self._flush_call is None:
            from twisted.internet import reactor

            clock = cast("ReactorBase", reactor)
            self._flush_call = clock.callLater(self.config.write_delay, self._flush_later)

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
        if not batch or not self._may_call("store", len(batch)):
            return
        pipe = self._client.pipeline(transaction=False)
        for key, data in batch.items():
            pipe.set(key, data, ex=self._ttl)
        try:
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            self._inc("store_failed", len(batch))
            self._failed(exc)
            return
        errors = [r for r in results if isinstance(r, Exception)]
        stored = [data for data, r in zip(batch.values(), results, strict=True) if r is True]
        self._inc("store", len(stored))
        self._inc("stored_bytes", sum(len(data) for data in stored))
        if errors:
            self._inc("store_failed", len(errors))
            self._failed(errors[0])
        else:
            self._answered()

    def _get(self, key: str) -> bytes | None:
        """``GET key`` on the reader connection.

        A connection kept from earlier calls may have gone stale (Redis
        restarted): that one failure gets one more try, on a new connection.
        """
        while True:
            try:
                self._reader.send_command("GET", key)  # type: ignore[no-untyped-call]
                data = self._reader.read_response()
            except redis.ConnectionError:
                self._reader.disconnect()  # type: ignore[no-untyped-call]
                retry, self._reader_used = self._reader_used, False
                if retry:
                    continue
                raise
            self._reader_used = True
            return cast("bytes | None", data)

    # -- Redis health ---------------------------------------------------------------
    def _may_call(self, action: str, count: int = 1) -> bool:
        """False (and counted) while Redis is left alone after a failure."""
        if self._skip_until and monotonic() < self._skip_until:
            self._inc(f"skipped/{action}", count)
            return False
        return True

    def _failed(self, exc: Exception) -> None:
        self._inc("redis_error")
        self._skip_until = monotonic() + self.config.retry_interval
        if self._outage_since is not None:
            return
        self._outage_since = monotonic()
        self._inc("outage")
        logger.warning(
            "Redis HTTP cache at %s is unavailable (%s: %s): crawling on without the "
            "cache, trying Redis again every %.1f s",
            self._url,
            type(exc).__name__,
            exc,
            self.config.retry_interval,
        )

    def _answered(self) -> None:
        if self._outage_since is None:
            return
        logger.info(
            "Redis HTTP cache at %s answers again after %.1f s: cache resumed",
            self._url,
            monotonic() - self._outage_since,
        )
        self._outage_since = None
        self._skip_until = 0.0

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


# -- the entry format -----------------------------------------------------------------
class CacheEntryError(ValueError):
    """Bytes that are not a valid cache entry."""


@dataclass(frozen=True)
class CacheEntry:
    """One cached response, as decoded from Redis."""

    status: int
    url: str
    headers: list[tuple[str, str]]  # every value of every header, latin-1 text
    body: bytes
    stored_at: float  # Unix time
    response_class: str | None = None
    protocol: str | None = None
    ip_address: str | None = None

    def response(self) -> Response:
        headers: dict[bytes, list[bytes]] = {}
        for name, value in self.headers:
            headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
        cls = _CLASSES.get(self.response_class or "") or responsetypes.from_args(
            headers=Headers(headers), url=self.url, body=self.body
        )
        return cls(
            url=self.url,
            status=self.status,
            headers=headers,
            body=self.body,
            protocol=self.protocol,
            ip_address=ip_address(self.ip_address) if self.ip_address else None,
        )


def encode_entry(
    response: Response,
    *,
    stored_at: float,
    compression_level: int = 1,
    compress_min_size: int = 256,
) -> bytes:
    """*response* as cache entry bytes: magic line, JSON line, body.

    The body is zlib-compressed at *compression_level* unless that isn't worth
    it: a level of 0, a body under *compress_min_size* bytes, a body that is
    already compressed (a ``Content-Encoding``, an image, an archive), or one
    that zlib shrinks by less than 10 %.
    """
    body = response.body
    encoding = "raw"
    payload = body
    if (
        compression_level
        and len(body) >= compress_min_size
        and not _already_compressed(response.headers)
    ):
        compressed = zlib.compress(body, compression_level)
        if len(compressed) <= len(body) * _WORTH_IT:
            encoding, payload = "zlib", compressed
    header: dict[str, Any] = {
        "status": response.status,
        "url": response.url,
        "headers": [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.items()
            for value in values
        ],
        "stored_at": stored_at,
        "body": encoding,
        "size": len(body),
    }
    class_name = _CLASS_NAMES.get(type(response))
    if class_name:
        header["class"] = class_name
    if response.protocol:
        header["protocol"] = response.protocol
    if response.ip_address is not None:
        header["ip"] = str(response.ip_address)
    line = json.dumps(header, separators=(",", ":")).encode("ascii")
    return b"".join((MAGIC, line, b"\n", payload))


def decode_entry(data: bytes) -> CacheEntry:
    """Parse entry bytes written by :func:`encode_entry`; raise :class:`CacheEntryError`."""
    if not data.startswith(MAGIC):
        raise CacheEntryError("not a scrapy-polite cache entry")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CacheEntryError("truncated header")
    try:
        header = json.loads(data[len(MAGIC) : end])
        entry = CacheEntry(
            status=_typed(header["status"], int),
            url=_typed(header["url"], str),
            headers=_headers(header["headers"]),
            body=_body(header, data[end + 1 :]),
            stored_at=float(_typed(header["stored_at"], (int, float))),
            response_class=_typed(header.get("class"), (str, type(None))),
            protocol=_typed(header.get("protocol"), (str, type(None))),
            ip_address=_typed(header.get("ip"), (str, type(None))),
        )
    except CacheEntryError:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CacheEntryError(f"bad header: {exc}") from None
    if not 100 <= entry.status <= 999:
        raise CacheEntryError(f"bad status {entry.status}")
    return entry


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


# -- private helpers ----------------------------------------------------------------------
def _already_compressed(headers: Headers) -> bool:
    encoding = headers.get(b"Content-Encoding")
    if encoding and encoding.strip().lower() != b"identity":
        return True
    content_type = (headers.get(b"Content-Type") or b"").split(b";")[0].strip().lower()
    if content_type.startswith(_COMPRESSED_TYPES):
        return True
    return content_type.startswith(b"application/") and content_type[12:] in _COMPRESSED_SUBTYPES


def _body(header: dict[str, Any], payload: bytes) -> bytes:
    size = _typed(header["size"], int)
    if not 0 <= size <= _MAX_BODY_SIZE:
        raise CacheEntryError(f"bad body size {size}")
    encoding = header["body"]
    if encoding == "raw":
        body = payload
    elif encoding == "zlib":
        decompressor = zlib.decompressobj()
        body = decompressor.decompress(payload, size + 1)  # never more than announced
        if not decompressor.eof or decompressor.unused_data:
            raise CacheEntryError("compressed body is truncated or longer than announced")
    else:
        raise CacheEntryError(f"unknown body encoding {encoding!r}")
    if len(body) != size:
        raise CacheEntryError(f"body is {len(body)} bytes, {size} announced")
    return body


def _headers(value: Any) -> list[tuple[str, str]]:
    pairs = [(name, text) for name, text in _typed(value, list)]
    if not all(type(name) is str and type(text) is str for name, text in pairs):
        raise CacheEntryError("headers are not [name, value] text pairs")
    return pairs


def _typed(value: Any, types: type | tuple[type, ...]) -> Any:
    if not isinstance(value, types) or isinstance(value, bool):
        raise CacheEntryError(f"unexpected value {value!r}")
    return value


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
