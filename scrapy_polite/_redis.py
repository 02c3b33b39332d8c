"""The one Redis layer: URLs, clients, keys, and the health of each server.

Every scrapy-polite component that talks to Redis does it through a
:class:`RedisLink` (one per server and crawler, shared by the components that
use that server), never through a client of its own:

- **Which server.** :func:`redis_url` reads the component's own setting, then
  ``POLITE_REDIS_URL``, then scrapy-redis's ``REDIS_URL`` or
  ``REDIS_HOST``/``REDIS_PORT``, so a scrapy-redis cluster needs no second
  configuration. ``REDIS_PARAMS`` is passed through. Passwords never reach a log
  (:func:`redact`).
- **Never blocking for long.** Clients get ``POLITE_REDIS_TIMEOUT`` socket
  timeouts and no retries (redis-py's retries sleep, which would freeze the
  reactor). :meth:`RedisLink.call` runs commands without blocking the reactor:
  on the asyncio reactor through redis-py's asyncio client, on Twisted's other
  reactors in the reactor's thread pool (``bench/bench_redis.py`` measures
  both). :meth:`RedisLink.blocking` is for the one caller whose API is
  synchronous, Scrapy's cache storage interface.
- **Health.** When a call fails the server is left alone for
  ``POLITE_REDIS_RETRY_INTERVAL`` seconds (calls meanwhile raise
  :class:`RedisUnavailable` at once, counted as skipped); the first failure
  logs one warning that says what each component does without Redis, and the
  first answer after it one INFO line. Stats are the same for every component:
  ``polite/redis/error``, ``polite/redis/outage``,
  ``polite/redis/skipped/<component>``.
- **Keys.** :func:`domain_key` builds every key that belongs to one domain, with
  the domain as its Redis Cluster hash tag, so that all of a domain's keys land
  in one hash slot.
"""

from __future__ import annotations

import logging
import ssl
from time import monotonic
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from scrapy_polite._settings import PoliteSettingError, get_float

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector

__all__ = [
    "Command",
    "RedisLink",
    "RedisUnavailable",
    "command_redis_url",
    "domain_key",
    "redact",
    "redis_from_settings",
    "redis_url",
    "required_redis_url",
    "verify_redis",
]

logger = logging.getLogger(__name__)

KEY_PREFIX = "polite"
_SCHEMES = ("redis", "rediss", "unix")
_CRAWLER_ATTRIBUTE = "_scrapy_polite_redis_links"

#: One Redis command as its words: ``("GET", key)``, ``("SET", key, value, "PX", 100)``.
Command = tuple[Any, ...]


class RedisUnavailable(Exception):
    """Redis could not be used: the call failed, or came inside the retry window."""


def domain_key(domain: str, *parts: str) -> str:
    """The key of *parts* for *domain*: ``polite:{domain}:part:part``.

    The braces make the domain the key's Redis Cluster hash tag: every key of
    one domain lives in one hash slot, so scripts touching several of them run
    on a cluster too. Host names never contain braces.
    """
    return ":".join((KEY_PREFIX, "{" + domain + "}", *parts))


def redis_url(settings: BaseSettings, override: str | None = None) -> str | None:
    """Return the Redis URL configured for a component, or ``None``.

    Looked up in order: the component's own *override* setting,
    ``POLITE_REDIS_URL``, scrapy-redis's ``REDIS_URL``, then scrapy-redis's
    ``REDIS_HOST``/``REDIS_PORT`` when either is set explicitly.
    """
    found = _url_and_setting(settings, override)
    return found[0] if found else None


def _url_and_setting(settings: BaseSettings, override: str | None) -> tuple[str, str] | None:
    for name in (override, "POLITE_REDIS_URL", "REDIS_URL"):
        if name is None:
            continue
        value = settings.get(name)
        if value:
            _check_url(name, value)
            return str(value), name
    if settings.get("REDIS_HOST") or settings.get("REDIS_PORT"):
        host = settings.get("REDIS_HOST") or "localhost"
        port = settings.get("REDIS_PORT") or 6379
        return f"redis://{host}:{port}", "REDIS_HOST/REDIS_PORT"
    return None


def command_redis_url(settings: BaseSettings, override: str, given: str | None) -> str:
    """The Redis URL of a ``scrapy polite-*`` command: *given* (``--redis-url``), else
    what the settings say; a :class:`~scrapy.exceptions.UsageError` naming them if none."""
    from scrapy.exceptions import UsageError

    if given:
        settings.set(override, given, priority="cmdline")
    url = redis_url(settings, override)
    if url is None:
        raise UsageError(
            f"no Redis URL: pass --redis-url, or set {override}, POLITE_REDIS_URL or REDIS_URL",
            print_help=False,
        )
    return url


def verify_redis(settings: BaseSettings, override: str | None) -> None:
    """At start-up: a Redis that refuses this crawler's password, or whose TLS
    certificate the client does not trust, is a :class:`PoliteSettingError` naming
    the setting the URL came from, never a silent fallback. A Redis that is down
    or does not answer is not checked here: the components fall back, and retry.
    """
    found = _url_and_setting(settings, override)
    if found is None:
        return
    url, setting = found
    client = redis_from_settings(settings, url)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise PoliteSettingError(
            setting,
            redact(url),
            f"a Redis that accepts the password given (in the URL or REDIS_PARAMS): {exc}",
        ) from None
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise PoliteSettingError(
                setting, redact(url), f"the password this Redis requires: {exc}"
            ) from None
    except (redis.ConnectionError, OSError) as exc:
        if _untrusted_certificate(exc):
            raise PoliteSettingError(
                setting,
                redact(url),
                "a Redis whose TLS certificate the client trusts (pass the CA as "
                f"?ssl_ca_certs=/path/ca.pem in the URL, or in REDIS_PARAMS): {exc}",
            ) from None
    except redis.RedisError:
        pass  # down, or not answering: the components' fallbacks apply
    finally:
        client.close()


def _untrusted_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if "certificate verify failed" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def required_redis_url(settings: BaseSettings, override: str, needed_for: str) -> str:
    """:func:`redis_url`, or a start-up error naming *override* when there is none."""
    url = redis_url(settings, override)
    if url is None:
        raise PoliteSettingError(
            override,
            None,
            f"a redis://, rediss:// or unix:// URL for {needed_for} "
            "(or set POLITE_REDIS_URL, or scrapy-redis's REDIS_URL)",
        )
    return url


def redis_from_settings(settings: BaseSettings, url: str) -> redis.Redis:
    """A synchronous client for *url* with the timeouts and parameters from *settings*.

    ``REDIS_PARAMS`` (scrapy-redis's setting) is passed through, except that
    the socket timeouts come from ``POLITE_REDIS_TIMEOUT`` and retries are off,
    so that no call can block the reactor for long.
    """
    return redis.Redis.from_url(url, **_client_params(settings, Retry(NoBackoff(), 0)))


def redact(url: str) -> str:
    """Return *url* with any password replaced by ``***``, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisLink:
    """One Redis server as the components of one crawler use it.

    Get it with :meth:`open` (one link per crawler and URL, shared) and give it
    back with :meth:`release`; the last release closes its clients.
    """

    def __init__(self, settings: BaseSettings, url: str, stats: StatsCollector | None) -> None:
        self.url = url
        self.shown_url = redact(url)
        self.retry_interval = _retry_interval(settings)
        self.client = redis_from_settings(settings, url)
        self._settings = settings
        self._stats = stats
        self._aio: redis.asyncio.Redis | None = None  # awaited calls, asyncio reactor
        self._aio_own: redis.asyncio.Connection | None = None  # call_in_turn()'s
        self._aio_own_used = False  # has it answered since it last (re)connected?
        self._pools_used = False  # have the awaited clients' pools answered since emptied?
        self._threaded: redis.Redis | None = None  # awaited calls, in threads, other reactors
        # GETs on the reactor thread go through one connection of their own,
        # without the pool's bookkeeping on every call (the cache's hot path).
        self._reader = self.client.connection_pool.make_connection()
        self._reader_used = False  # has it answered since it last (re)connected?
        self._fallbacks: dict[str, str] = {}  # component: what it does without Redis
        self._skip_until = 0.0
        self._outage_since: float | None = None
        self._users = 0
        self._registry: dict[str, RedisLink] | None = None  # the crawler's links

    @classmethod
    def open(cls, crawler: Crawler, url: str, component: str, fallback: str) -> RedisLink:
        """The crawler's link to *url*, shared with its other components.

        *fallback* says what *component* does while Redis is away, for the
        outage warning ("results stay in this process").
        """
        links: dict[str, RedisLink] = crawler.__dict__.setdefault(_CRAWLER_ATTRIBUTE, {})
        link = links.get(url)
        if link is None:
            link = links[url] = cls(crawler.settings, url, crawler.stats)
            link._registry = links
        link._fallbacks[component] = fallback
        link._users += 1
        return link

    @classmethod
    def standalone(cls, settings: BaseSettings, url: str) -> RedisLink:
        """A link outside any crawl (a command, a benchmark): no stats."""
        link = cls(settings, url, None)
        link._users = 1
        return link

    def release(self) -> None:
        """This user is done; the last one closes the clients."""
        self._users -= 1
        if self._users > 0:
            return
        if self._registry is not None and self._registry.get(self.url) is self:
            del self._registry[self.url]
        self._reader.disconnect()  # type: ignore[no-untyped-call]
        self.client.close()
        if self._threaded is not None:
            self._threaded.close()
            self._threaded = None
        if self._aio is not None:
            from scrapy.utils.defer import deferred_from_coro

            if self._aio_own is not None:
                deferred_from_coro(self._aio_own.disconnect())
                self._aio_own = None
            deferred_from_coro(self._aio.aclose())
            self._aio = None

    # -- calls --------------------------------------------------------------------
    def available(self, component: str, count: int = 1) -> bool:
        """False (counted as skipped) inside the retry window after a failure."""
        if self._skip_until and monotonic() < self._skip_until:
            self._inc(f"skipped/{component}", count)
            return False
        return True

    def blocking(self, component: str, *commands: Command) -> list[Any]:
        """Run *commands* in one round trip on the calling thread; their replies.

        A command's own error (``WRONGTYPE``, a script error) comes back as
        its reply, a :class:`redis.ResponseError`; a failure of the server or
        the connection raises :class:`RedisUnavailable`.
        """
        self._check(component, len(commands))
        try:
            replies = _run_pipeline(self.client, commands)
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        return self._answered(replies)  # type: ignore[no-any-return]

    def blocking_get(self, component: str, key: str) -> Any:
        """``GET key`` on the reactor thread (see :meth:`blocking_one`)."""
        return self.blocking_one(component, "GET", key)

    def blocking_one(self, component: str, *command: Any) -> Any:
        """One idempotent command on the reactor thread, on the link's own connection,
        without the pool's and the pipeline's bookkeeping (the cache's hot path); the raw
        reply (``b"OK"``, not ``True``), or the ``ResponseError`` Redis answered.

        A connection kept from earlier calls may have gone stale (Redis
        restarted): that one failure gets one more try, on a new connection.
        """
        self._check(component)
        while True:
            try:
                self._reader.send_command(*command)  # type: ignore[no-untyped-call]
                reply = self._reader.read_response()
            except redis.ResponseError as exc:
                reply = exc
            except (redis.RedisError, OSError) as exc:
                self._reader.disconnect()  # type: ignore[no-untyped-call]
                retry, self._reader_used = self._reader_used, False
                if retry and isinstance(exc, redis.ConnectionError):
                    continue
                raise self._failed(exc) from exc
            self._reader_used = True
            return self._answered(reply)

    async def call(self, component: str, *commands: Command) -> list[Any]:
        """:meth:`blocking`, awaited without blocking the reactor.

        After Redis restarted, the pooled connections of the awaited clients are
        all stale: the first one to fail empties the pools and the call is tried
        once more, instead of counting each stale connection as a new outage.
        """
        self._check(component, len(commands))
        from scrapy.utils.reactor import is_asyncio_reactor_installed

        asyncio_reactor = is_asyncio_reactor_installed()
        while True:
            try:
                if asyncio_reactor:
                    replies = await self._call_asyncio(commands)
                else:
                    replies = await self._call_in_thread(commands)
            except (redis.RedisError, OSError) as exc:
                retry, self._pools_used = self._pools_used, False
                if retry and isinstance(exc, redis.ConnectionError):
                    await self._empty_pools()
                    continue
                raise self._failed(exc) from exc
            self._pools_used = True
            return self._answered(replies)  # type: ignore[no-any-return]

    async def _empty_pools(self) -> None:
        if self._aio is not None:
            await self._aio.connection_pool.disconnect()
        if self._threaded is not None:
            self._threaded.connection_pool.disconnect()

    async def call_in_turn(self, component: str, *commands: Command) -> list[Any]:
        """:meth:`call`, for a caller that never has two of these out at once (the
        cache's pipelines): on the asyncio reactor it runs on the link's own
        connection, without the client's pool and pipeline bookkeeping, and the
        replies are raw (``b"OK"``, not ``True``). Like :meth:`blocking_one`, a
        connection gone stale (Redis restarted) gets one more try.
        """
        from scrapy.utils.reactor import is_asyncio_reactor_installed

        if not is_asyncio_reactor_installed():
            return await self.call(component, *commands)
        self._check(component, len(commands))
        while True:
            connection = self._own_connection()
            try:
                await connection.send_packed_command(connection.pack_commands(commands))
                replies = [await _raw_reply(connection) for _ in commands]
            except (redis.RedisError, OSError) as exc:
                await connection.disconnect()
                retry, self._aio_own_used = self._aio_own_used, False
                if retry and isinstance(exc, redis.ConnectionError):
                    continue
                raise self._failed(exc) from exc
            self._aio_own_used = True
            return self._answered(replies)  # type: ignore[no-any-return]

    def _own_connection(self) -> redis.asyncio.Connection:
        if self._aio_own is None:
            pool = self._asyncio_client().connection_pool
            self._aio_own = pool.make_connection()  # type: ignore[no-untyped-call]
            self._aio_own_used = False
        return self._aio_own

    def _asyncio_client(self) -> redis.asyncio.Redis:
        if self._aio is None:
            self._aio = redis.asyncio.Redis.from_url(
                self.url,
                **_client_params(self._settings, AsyncRetry(NoBackoff(), 0), awaited=True),
            )
        return self._aio

    async def _call_asyncio(self, commands: Sequence[Command]) -> list[Any]:
        pipe = self._asyncio_client().pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _call_in_thread(self, commands: Sequence[Command]) -> list[Any]:
        from scrapy.utils.defer import maybe_deferred_to_future
        from twisted.internet.threads import deferToThread

        if self._threaded is None:
            self._threaded = redis.Redis.from_url(
                self.url, **_client_params(self._settings, Retry(NoBackoff(), 0), awaited=True)
            )
        replies: list[Any] = await maybe_deferred_to_future(
            deferToThread(_run_pipeline, self._threaded, commands)
        )
        return replies

    # -- health -------------------------------------------------------------------
    def _check(self, component: str, count: int = 1) -> None:
        if not self.available(component, count):
            raise RedisUnavailable(f"Redis at {self.shown_url} is in its retry window")

    def _failed(self, exc: Exception) -> RedisUnavailable:
        self._inc("error")
        self._skip_until = monotonic() + self.retry_interval
        if self._outage_since is None:
            self._outage_since = monotonic()
            self._inc("outage")
            fallbacks = "; ".join(f"{c}: {f}" for c, f in sorted(self._fallbacks.items()))
            logger.warning(
                "Redis at %s is unavailable (%s: %s); trying again every %.1f s. Meanwhile %s",
                self.shown_url,
                type(exc).__name__,
                exc,
                self.retry_interval,
                fallbacks or "it is not used",
            )
        else:
            logger.debug("Redis at %s failed again: %r", self.shown_url, exc)
        return RedisUnavailable(f"Redis at {self.shown_url}: {type(exc).__name__}: {exc}")

    def _answered(self, reply: Any) -> Any:
        if self._outage_since is not None:
            logger.info(
                "Redis at %s answers again after %.1f s",
                self.shown_url,
                monotonic() - self._outage_since,
            )
            self._outage_since = None
            self._skip_until = 0.0
        return reply

    def _inc(self, event: str, count: int = 1) -> None:
        if self._stats is not None:
            self._stats.inc_value(f"polite/redis/{event}", count)


async def _raw_reply(connection: redis.asyncio.Connection) -> Any:
    """The next reply; a command's own error (``WRONGTYPE``) as its reply."""
    try:
        return await connection.read_response()
    except redis.ResponseError as exc:
        return exc


# Awaited calls wait this many times POLITE_REDIS_TIMEOUT.
_AWAITED_TIMEOUT_FACTOR = 4


def _run_pipeline(client: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    return list(pipe.execute(raise_on_error=False))


def _client_params(settings: BaseSettings, retry: Any, *, awaited: bool = False) -> dict[str, Any]:
    timeout = get_float(settings, "POLITE_REDIS_TIMEOUT", 0.5, minimum=0.001, maximum=60)
    if awaited:
        # An awaited call holds no reactor, only its own caller: a loaded Redis (or
        # worker) gets longer to answer before the component falls back.
        timeout *= _AWAITED_TIMEOUT_FACTOR
    params: dict[str, Any] = {
        k: v for k, v in settings.getdict("REDIS_PARAMS").items() if k != "redis_cls"
    }
    params.update(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # No retries: redis-py's default retries back off with time.sleep, which
        # would freeze the reactor; the link's retry window decides when to try again.
        retry=retry,
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return params


def _retry_interval(settings: BaseSettings) -> float:
    # POLITE_HTTPCACHE_RETRY_INTERVAL was the cache's own window before 0.2.
    name = "POLITE_REDIS_RETRY_INTERVAL"
    if settings.get(name) is None and settings.get("POLITE_HTTPCACHE_RETRY_INTERVAL") is not None:
        name = "POLITE_HTTPCACHE_RETRY_INTERVAL"
    return get_float(settings, name, 2.0, minimum=0, maximum=3600)


def _check_url(name: str, value: Any) -> None:
    if not isinstance(value, str) or urlsplit(value).scheme not in _SCHEMES:
        shown = redact(value) if isinstance(value, str) else value
        raise PoliteSettingError(name, shown, "a redis://, rediss:// or unix:// URL")
