"""The one place that builds a Redis client from Scrapy settings.

scrapy-polite reads the connection settings that scrapy-redis users already
have (``REDIS_URL``, or ``REDIS_HOST``/``REDIS_PORT``, plus ``REDIS_PARAMS``),
so a cluster needs no second configuration. ``POLITE_REDIS_URL`` overrides them
for every scrapy-polite component, and each component may have its own
override (for example ``POLITE_HTTPCACHE_REDIS_URL``).

Every client gets short socket timeouts: Scrapy calls some components (the
HTTP cache storage) synchronously on the reactor thread, so a Redis call must
fail fast rather than freeze the crawl.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scrapy_polite._settings import PoliteSettingError, get_float

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

_SCHEMES = ("redis", "rediss", "unix")


def redis_url(settings: BaseSettings, override: str | None = None) -> str | None:
    """Return the Redis URL configured for a component, or ``None``.

    Looked up in order: the component's own *override* setting,
    ``POLITE_REDIS_URL``, scrapy-redis's ``REDIS_URL``, then scrapy-redis's
    ``REDIS_HOST``/``REDIS_PORT`` when either is set explicitly.
    """
    for name in (override, "POLITE_REDIS_URL", "REDIS_URL"):
        if name is None:
            continue
        value = settings.get(name)
        if value:
            _check_url(name, value)
            return str(value)
    if settings.get("REDIS_HOST") or settings.get("REDIS_PORT"):
        host = settings.get("REDIS_HOST") or "localhost"
        port = settings.get("REDIS_PORT") or 6379
        return f"redis://{host}:{port}"
    return None


def redis_from_settings(settings: BaseSettings, url: str) -> redis.Redis:
    """Build a client for *url* with the timeouts and parameters from *settings*.

    ``REDIS_PARAMS`` (scrapy-redis's setting) is passed through, except that
    the socket timeouts come from ``POLITE_REDIS_TIMEOUT`` and retries are off,
    so that no call can block the reactor for long.
    """
    timeout = get_float(settings, "POLITE_REDIS_TIMEOUT", 0.5, minimum=0.001, maximum=60)
    params: dict[str, Any] = {
        k: v for k, v in settings.getdict("REDIS_PARAMS").items() if k != "redis_cls"
    }
    params.update(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # No retries: redis-py's default retries back off with time.sleep, which
        # would freeze the reactor; each component decides when to try again.
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return redis.Redis.from_url(url, **params)


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


def _check_url(name: str, value: Any) -> None:
    if not isinstance(value, str) or urlsplit(value).scheme not in _SCHEMES:
        shown = redact(value) if isinstance(value, str) else value
        raise PoliteSettingError(name, shown, "a redis://, rediss:// or unix:// URL")
