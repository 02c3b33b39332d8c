"""robots.txt enforcement by RFC 9309, per origin, with a robots cache shared through Redis.

:class:`PoliteRobotsTxtMiddleware` replaces Scrapy's ``RobotsTxtMiddleware``
(the add-on swaps them when ``ROBOTSTXT_OBEY`` is on). For each origin
(scheme, host, port) it fetches ``/robots.txt`` once, through the engine, so the
fetch passes the domain's delay and the other downloader middlewares, and acts
on the answer as RFC 9309 says:

- 2xx: the file is parsed (its first 500 KiB) and obeyed;
- redirects: up to five hops are followed, to any host, and the file found
  applies to the original origin; a sixth hop makes the file unavailable;
- 4xx (but 429): unavailable, so everything may be crawled;
- 5xx, 429, timeouts, network errors: unreachable, so nothing on the origin is
  crawled. Its requests wait, robots.txt is tried again after a growing
  back-off, and only after ``POLITE_ROBOTS_UNREACHABLE_TIMEOUT`` seconds with no
  answer do they fail with ``IgnoreRequest``. An unreachable result is never
  cached as if it were a file.

Results expire after ``POLITE_ROBOTS_EXPIRY`` seconds. The next request then
starts a new fetch and goes on under the old copy meanwhile; if that fetch finds
robots.txt unreachable, the old copy stays in force (RFC 9309 section 2.4) and
the next request after the back-off tries again. With a Redis URL results
are shared: the first crawler process to need an origin takes a short lock and
fetches; the others poll Redis for the result, so N processes fetch each
robots.txt once per expiry period.

Waiting requests are kept out of the downloader: while an origin's first
robots.txt is being fetched (or is unreachable), its requests are held at
scheduling time (the engine's ``request_scheduled`` signal; one already in the
downloader is sent back to the scheduler) and scheduled again once the answer
is in, so none occupies one of ``CONCURRENT_REQUESTS`` while it waits. Only requests
that reach the downloader without passing the scheduler (``engine.download``
calls, requests read back from a disk or Redis queue) wait inside
``process_request``.

Groups are matched by product token, exactly (case-insensitively), as RFC 9309
asks: ``User-agent: bot`` is not a group for ``MyBot``. Every time an origin's
rules are loaded the middleware sends Scrapy's ``robots_parsed`` signal (the
delay middleware reads ``Crawl-delay`` from it) and, when the file lists
sitemaps, this module's :data:`sitemaps_found` signal.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from weakref import WeakSet

import redis
from protego import Protego
from scrapy import Request, signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest, NotConfigured
from scrapy.http.request import NO_CALLBACK
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached

from scrapy_polite._settings import PoliteSettingError, get_bool, get_float
from scrapy_polite.redis_client import redact, redis_from_settings, redis_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from scrapy.settings import BaseSettings
    from twisted.internet.base import DelayedCall
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Sent once per origin (and again if a later fetch lists other sitemaps) with
#: ``origin`` ("http://host:port"), ``sitemaps`` (a list of URLs, as written in
#: robots.txt) and ``request`` (the request that needed the origin's rules).
#: A spider can follow them from a handler with ``self.crawler.engine.crawl()``.
sitemaps_found = object()

MAX_SIZE = 500 * 1024  # RFC 9309: parse at least the first 500 KiB
MAX_REDIRECTS = 5  # RFC 9309: follow at least five consecutive redirects
REDIS_PREFIX = "polite:robots:"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_REDIS_POLL = 0.1  # seconds between two looks at Redis while another process fetches
_REDIS_RETRY = 30.0  # seconds before trying Redis again after it failed
_CACHE_FORMAT = 1

_TOKEN = re.compile(r"[A-Za-z_-]+")
_COMPATIBLE = re.compile(r"\(compatible;\s*([A-Za-z_-]+)", re.IGNORECASE)
# A superset of the user-agent lines Protego recognises ("User-agent: x",
# "useragent x", "User agent: x", ...), comments already removed.
_USER_AGENT_LINE = re.compile(r"^\s*user(?:-|\s*)agent\s*(?::|\s)\s*(?P<value>.*)$", re.IGNORECASE)
# Stands for every group that is not ours: "." and digits never occur in a
# product token, so Protego can never match it.
_OTHER_GROUP = "other.agent.0"


def product_token(user_agent: str | bytes) -> str | None:
    """The product token of a user agent string, as RFC 9309 matches it.

    ``"MyBot/1.0 (+https://example.com/bot)"`` gives ``"MyBot"``; a browser-like
    ``"Mozilla/5.0 (compatible; MyBot/1.0; ...)"`` gives ``"MyBot"``. ``None``
    when the string does not start with one (letters, ``-`` and ``_`` only).
    """
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    user_agent = user_agent.strip()
    if user_agent.lower().startswith("mozilla/"):
        compatible = _COMPATIBLE.search(user_agent)
        if compatible:
            return compatible.group(1)
    match = _TOKEN.match(user_agent)
    return match.group(0) if match else None


class RobotsRules:
    """One origin's robots.txt, parsed by Protego, groups matched by exact product token.

    Protego matches a group whose name occurs at a word start of the user agent
    (``User-agent: my`` would apply to ``MyBot``), so each token gets its own
    Protego parse of the text in which every group name but ``*`` and that
    token is replaced by one that matches nothing. The methods take a full user
    agent string and extract its product token, like the delay middleware
    expects of ``robots_parsed``'s ``robotparser``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._parsers: dict[str, Protego] = {}

    def can_fetch(self, url: str, user_agent: str | bytes) -> bool:
        name = self._agent(user_agent)
        return bool(self._parser(name).can_fetch(url, name))

    def allowed(self, url: str | bytes, user_agent: str | bytes) -> bool:
        """Scrapy's ``RobotParser.allowed``."""
        if isinstance(url, bytes):
            url = url.decode("utf-8")
        return self.can_fetch(url, user_agent)

    def crawl_delay(self, user_agent: str | bytes) -> float | None:
        """Seconds between two requests: the larger of ``Crawl-delay`` and
        ``Request-rate`` (seconds / requests) of the matching group, or ``None``."""
        name = self._agent(user_agent)
        parser = self._parser(name)
        delays = [parser.crawl_delay(name)]
        rate = parser.request_rate(name)
        if rate is not None and rate.requests:
            delays.append(rate.seconds / rate.requests)
        found = [float(d) for d in delays if d is not None]
        return max(found) if found else None

    @property
    def sitemaps(self) -> list[str]:
        """The ``Sitemap:`` URLs (site-wide: the same whatever the user agent)."""
        parser = next(iter(self._parsers.values()), None) or self._parser("*")
        return list(parser.sitemaps)

    def prepare(self, user_agent: str | bytes) -> Self:
        """Parse now for *user_agent* (meant to run in a thread for big files)."""
        self._parser(self._agent(user_agent))
        return self

    def _agent(self, user_agent: str | bytes) -> str:
        token = product_token(user_agent)
        return token.lower() if token else "*"

    def _parser(self, name: str) -> Protego:
        parser = self._parsers.get(name)
        if parser is None:
            parser = self._parsers[name] = _parse(_only_group(self.text, name))
        return parser


def _only_group(text: str, name: str) -> str:
    """*text* with every group name but ``*`` and *name* made unmatchable."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _USER_AGENT_LINE.match(line.split("#", 1)[0])
        if match is None:
            continue
        value = match.group("value").strip()
        if not value:
            continue
        if value == "*" or (value.startswith("*") and value[1].isspace()):
            lines[i] = "User-agent: *"
            continue
        token = _TOKEN.match(value)
        same = token is not None and token.group(0).lower() == name
        lines[i] = f"User-agent: {name if same else _OTHER_GROUP}"
    return "\n".join(lines)


def _parse(text: str) -> Protego:
    try:
        return Protego.parse(text)
    except Exception:  # Protego is lenient; whatever it cannot read allows everything
        logger.warning("Could not parse a robots.txt file; treating it as empty", exc_info=True)
        return Protego.parse("")


def decode_body(body: bytes) -> tuple[str, bool]:
    """The text of a robots.txt body cut to its first 500 KiB (whole lines), and
    whether it was cut. Undecodable bytes become U+FFFD: a garbage file is read,
    not rejected."""
    truncated = len(body) > MAX_SIZE
    if truncated:
        body = body[:MAX_SIZE]
        cut = max(body.rfind(b"\n"), body.rfind(b"\r"))
        if cut > 0:
            body = body[:cut]
    return body.decode("utf-8-sig", errors="replace"), truncated


@dataclass(frozen=True)
class RobotsConfig:
    """Every setting of the robots.txt component, read and validated once."""

    user_agent: str
    product_token: str
    expiry: float
    timeout: float
    retry_delay: float
    retry_max_delay: float
    unreachable_timeout: float
    redis_url: str | None

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        for name in ("POLITE_ROBOTS_USER_AGENT", "ROBOTSTXT_USER_AGENT", "USER_AGENT"):
            user_agent = settings.get(name)
            if user_agent:
                break
        else:
            name, user_agent = "USER_AGENT", settings.get("USER_AGENT")
        token = product_token(user_agent) if isinstance(user_agent, (str, bytes)) else None
        if token is None:
            raise PoliteSettingError(
                name, user_agent, "a user agent that starts with a product token, like 'MyBot/1.0'"
            )
        retry_delay = get_float(settings, "POLITE_ROBOTS_RETRY_DELAY", 10.0, minimum=0.01)
        retry_max_delay = get_float(settings, "POLITE_ROBOTS_RETRY_MAX_DELAY", 300.0, minimum=0.01)
        if retry_max_delay < retry_delay:
            raise PoliteSettingError(
                "POLITE_ROBOTS_RETRY_MAX_DELAY",
                retry_max_delay,
                f"at least POLITE_ROBOTS_RETRY_DELAY ({retry_delay})",
            )
        return cls(
            user_agent=str(user_agent),
            product_token=token,
            expiry=get_float(settings, "POLITE_ROBOTS_EXPIRY", 86400.0, minimum=0.001),
            timeout=get_float(settings, "POLITE_ROBOTS_TIMEOUT", 10.0, minimum=0.001),
            retry_delay=retry_delay,
            retry_max_delay=retry_max_delay,
            unreachable_timeout=get_float(
                settings, "POLITE_ROBOTS_UNREACHABLE_TIMEOUT", 900.0, minimum=0
            ),
            redis_url=redis_url(settings, "POLITE_ROBOTS_REDIS_URL"),
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after *attempts* failed ones in a row."""
        return float(min(self.retry_delay * 2 ** min(attempts - 1, 30), self.retry_max_delay))

    @property
    def lock_ttl(self) -> float:
        """How long one process may hold the shared fetch lock of an origin."""
        return 3 * self.timeout + 5


@dataclass(frozen=True)
class _Outcome:
    """What one load of an origin's robots.txt gave."""

    kind: Literal["rules", "unavailable", "unreachable"]
    detail: str  # the status code, exception name or reason, for logs
    text: str = ""
    ttl: float | None = None  # seconds left, when read from Redis
    retry_in: float | None = None  # when another process saw it unreachable


@dataclass(eq=False)
class _Origin:
    """What this process knows about one origin's robots.txt."""

    key: str
    rules: RobotsRules | None = None  # RobotsRules(""), i.e. allow all, when unavailable
    loaded_at: float = 0.0
    expires_at: float = 0.0
    fetching: bool = False
    unreachable_since: float | None = None
    attempts: int = 0
    gave_up_until: float = 0.0
    reason: str = ""
    trigger: Request | None = None  # a request to this origin, for signals
    held: list[Request] = field(default_factory=list)  # kept out of the scheduler
    waiters: list[Deferred[None]] = field(default_factory=list)  # parked in process_request
    timer: DelayedCall | None = None
    task: Deferred[None] | None = None
    sitemaps: tuple[str, ...] = ()

    @property
    def busy(self) -> bool:
        """Its robots.txt is being fetched, or tried again after a failure."""
        return self.fetching or self.unreachable_since is not None

    @property
    def waiting(self) -> bool:
        """Its requests must wait: it has no rules yet and a fetch is under way."""
        return self.rules is None and self.busy


class PoliteRobotsTxtMiddleware:
    """Downloader middleware that obeys each origin's robots.txt as RFC 9309 says."""

    DOWNLOAD_PRIORITY = 1000

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "ROBOTSTXT_OBEY", False):
            raise NotConfigured("ROBOTSTXT_OBEY is off")
        self.crawler = crawler
        self.config = RobotsConfig.from_settings(crawler.settings)
        assert crawler.stats is not None
        self._stats = crawler.stats
        self._origins: dict[str, _Origin] = {}
        self._scheduled: WeakSet[Request] = WeakSet()  # passed the gate in this process
        self._closing = False
        self._shared: _SharedCache | None = None
        self._redis_down_until = 0.0
        self._redis_warned = False
        if self.config.redis_url:
            self._shared = _SharedCache(
                redis_from_settings(crawler.settings, self.config.redis_url), self.config
            )
        crawler.signals.connect(self._gate, signal=signals.request_scheduled)
        crawler.signals.connect(self._keep_open, signal=signals.spider_idle)
        crawler.signals.connect(self._close, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- requests -----------------------------------------------------------------
    async def process_request(
        self, request: Request, spider: Spider | None = None
    ) -> Request | None:
        """Let *request* through, drop it (``IgnoreRequest``), or send it back to
        the scheduler to be held until its origin's robots.txt is known."""
        key = _origin_key(request)
        if key is None:
            return None
        origin = self._origin(key)
        while True:
            now = monotonic()
            if origin.rules is not None:
                if now >= origin.expires_at and not origin.busy:
                    self._start(origin, request)  # the last copy serves until the new one
                self._stats.inc_value("polite/robots/cache_hit/memory")
                self._check(origin, request)
                return None
            if now < origin.gave_up_until:
                raise self._fail(origin, request)
            if not origin.busy:
                self._start(origin, request)
            if request in self._scheduled:
                # Back to the scheduler, where the gate holds it: waiting here
                # would take one of CONCURRENT_REQUESTS from the other origins.
                self._scheduled.discard(request)
                return request.replace(dont_filter=True)  # it passed the dupefilter already
            waiter: Deferred[None] = _new_deferred()
            origin.waiters.append(waiter)
            self._stats.inc_value("polite/robots/waited_in_downloader")
            await maybe_deferred_to_future(waiter)
            if self._closing:
                raise IgnoreRequest(f"crawl closed while waiting for {key}/robots.txt")

    def _check(self, origin: _Origin, request: Request) -> None:
        assert origin.rules is not None
        if origin.rules.can_fetch(request.url, self.config.product_token):
            return
        logger.debug("Forbidden by robots.txt: %s", request)
        self._stats.inc_value("polite/robots/forbidden")
        raise IgnoreRequest("Forbidden by robots.txt")

    def _fail(self, origin: _Origin, request: Request) -> IgnoreRequest:
        self._stats.inc_value("polite/robots/unreachable/failed")
        logger.debug("%s: robots.txt of %s unreachable, request dropped", request, origin.key)
        return IgnoreRequest(
            f"robots.txt of {origin.key} unreachable for "
            f"{self.config.unreachable_timeout:.0f} s ({origin.reason})"
        )

    def _gate(self, request: Request, spider: Spider | None = None) -> None:
        """``request_scheduled``: hold requests of origins that are being fetched."""
        key = _origin_key(request)
        if key is None:
            return
        origin = self._origins.get(key)
        if origin is not None and origin.waiting and not self._closing:
            origin.held.append(request)
            self._stats.inc_value("polite/robots/held")
            raise IgnoreRequest(f"held until {key}/robots.txt is known")
        self._scheduled.add(request)

    def _origin(self, key: str) -> _Origin:
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(key)
        return origin

    # -- loading an origin's rules ---------------------------------------------------
    def _start(self, origin: _Origin, request: Request | None) -> None:
        origin.fetching = True
        if request is not None:
            origin.trigger = request
        origin.task = deferred_from_coro(self._load(origin))
        origin.task.addErrback(
            lambda failure: logger.error(
                "Loading robots.txt of %s failed", origin.key, exc_info=failure.value
            )
        )

    async def _load(self, origin: _Origin) -> None:
        rules = RobotsRules("")
        try:
            outcome = await self._shared_or_fetched(origin)
            if outcome.kind == "rules" and not self._closing:
                rules = await _in_thread(
                    RobotsRules(outcome.text).prepare, self.config.product_token
                )
        except Exception as exc:  # a bug here must not leave the origin's requests waiting
            logger.exception("Loading robots.txt of %s failed", origin.key)
            outcome = _Outcome("unreachable", type(exc).__name__)
        finally:
            origin.fetching = False
            origin.task = None
        if self._closing:
            return
        if outcome.kind == "unreachable":
            self._unreachable(origin, outcome)
        else:
            self._loaded(origin, outcome, rules)

    def _loaded(self, origin: _Origin, outcome: _Outcome, rules: RobotsRules) -> None:
        now = monotonic()
        if origin.unreachable_since is not None:
            logger.info(
                "robots.txt of %s answered (%s) after %.1f s unreachable; "
                "releasing %d waiting request(s)",
                origin.key,
                outcome.detail,
                now - origin.unreachable_since,
                len(origin.held) + len(origin.waiters),
            )
        origin.rules = rules
        origin.loaded_at = now
        origin.expires_at = now + (outcome.ttl if outcome.ttl is not None else self.config.expiry)
        origin.unreachable_since = None
        origin.attempts = 0
        origin.gave_up_until = 0.0
        if outcome.kind == "unavailable":
            self._stats.inc_value("polite/robots/unavailable")
        request = origin.trigger or Request(origin.key + "/robots.txt")
        if outcome.kind == "rules":
            self.crawler.signals.send_catch_log(
                signal=signals.robots_parsed, robotparser=rules, request=request
            )
            sitemaps = tuple(rules.sitemaps)
            if sitemaps and sitemaps != origin.sitemaps:
                origin.sitemaps = sitemaps
                self.crawler.signals.send_catch_log(
                    signal=sitemaps_found,
                    origin=origin.key,
                    sitemaps=list(sitemaps),
                    request=request,
                )
        self._release(origin)

    def _unreachable(self, origin: _Origin, outcome: _Outcome) -> None:
        now = monotonic()
        origin.reason = outcome.detail
        origin.attempts += 1
        if origin.rules is not None:
            self._refresh_failed(origin, outcome, now)
            return
        if origin.unreachable_since is None:
            origin.unreachable_since = now
            self._stats.inc_value("polite/robots/unreachable")
        waited = now - origin.unreachable_since
        if waited >= self.config.unreachable_timeout:
            self._give_up(origin, waited)
            return
        delay = (
            outcome.retry_in
            if outcome.retry_in is not None
            else self.config.backoff(origin.attempts)
        )
        delay = min(delay, self.config.unreachable_timeout - waited)
        log = logger.warning if origin.attempts == 1 else logger.info
        log(
            "robots.txt of %s is unreachable (%s): holding its requests, next try in %.1f s",
            origin.key,
            outcome.detail,
            delay,
        )
        origin.timer = _call_later(delay, self._retry, origin)

    def _refresh_failed(self, origin: _Origin, outcome: _Outcome, now: float) -> None:
        """RFC 9309 lets a crawler keep its copy while robots.txt is unreachable:
        the last rules stay, and the next request after a back-off tries again."""
        delay = (
            outcome.retry_in
            if outcome.retry_in is not None
            else self.config.backoff(origin.attempts)
        )
        origin.expires_at = now + delay
        if origin.attempts == 1:
            self._stats.inc_value("polite/robots/unreachable")
        (logger.warning if origin.attempts == 1 else logger.info)(
            "robots.txt of %s is unreachable (%s): obeying the copy from %.0f s ago; "
            "next try in %.1f s",
            origin.key,
            outcome.detail,
            now - origin.loaded_at,
            delay,
        )

    def _retry(self, origin: _Origin) -> None:
        origin.timer = None
        if self._closing or origin.fetching:
            return
        self._stats.inc_value("polite/robots/unreachable/retry")
        self._start(origin, None)

    def _give_up(self, origin: _Origin, waited: float) -> None:
        logger.warning(
            "robots.txt of %s unreachable for %.1f s (%s): giving up; its %d waiting "
            "requests and those that follow in the next %.0f s fail with IgnoreRequest",
            origin.key,
            waited,
            origin.reason,
            len(origin.held) + len(origin.waiters),
            self.config.retry_max_delay,
        )
        self._stats.inc_value("polite/robots/unreachable/gave_up")
        origin.unreachable_since = None
        origin.attempts = 0
        origin.gave_up_until = monotonic() + self.config.retry_max_delay
        self._release(origin)

    def _release(self, origin: _Origin) -> None:
        """Schedule the held requests again and wake those parked in the downloader."""
        held, origin.held = origin.held, []
        waiters, origin.waiters = origin.waiters, []
        engine = self.crawler.engine
        if held and engine is not None and engine.spider is not None:
            for request in held:
                engine.crawl(request)
        for waiter in waiters:
            waiter.callback(None)

    # -- fetching ---------------------------------------------------------------------
    async def _shared_or_fetched(self, origin: _Origin) -> _Outcome:
        shared = self._shared if monotonic() >= self._redis_down_until else None
        if shared is None:
            return await self._fetch(origin)
        try:
            lock = None
            while lock is None:
                claim = await _in_thread(shared.claim, origin.key)
                if claim.outcome is not None:
                    self._stats.inc_value(
                        "polite/robots/cache_hit/redis"
                        if claim.outcome.kind != "unreachable"
                        else "polite/robots/shared_unreachable"
                    )
                    self._redis_ok()
                    return claim.outcome
                lock = claim.lock
                if lock is None:
                    await _sleep(_REDIS_POLL)
            self._redis_ok()
        except (redis.RedisError, OSError, ValueError) as exc:
            self._redis_failed(exc)
            return await self._fetch(origin)
        outcome = await self._fetch(origin)
        retry_in = self.config.backoff(origin.attempts + 1)
        try:
            await _in_thread(shared.publish, origin.key, lock, outcome, retry_in)
        except (redis.RedisError, OSError, ValueError) as exc:
            self._redis_failed(exc)
        return outcome

    async def _fetch(self, origin: _Origin) -> _Outcome:
        """Download the origin's robots.txt (following up to five redirects)."""
        url = origin.key + "/robots.txt"
        for _ in range(MAX_REDIRECTS + 1):
            request = Request(
                url,
                priority=self.DOWNLOAD_PRIORITY,
                callback=NO_CALLBACK,
                dont_filter=True,
                meta={
                    "dont_obey_robotstxt": True,
                    "dont_cache": True,  # the HTTP cache must never serve an old robots.txt
                    "dont_redirect": True,  # followed here, up to five hops
                    "dont_retry": True,  # tried again here, after a back-off
                    "allow_offsite": True,
                    "download_timeout": self.config.timeout,
                },
            )
            try:
                response = await _download(self.crawler, request)
            except IgnoreRequest as exc:
                logger.info("robots.txt request %s was dropped (%s): allowing all", url, exc)
                return _Outcome("unavailable", f"dropped: {exc}")
            except Exception as exc:
                self._stats.inc_value("polite/robots/fetch/error")
                return _Outcome("unreachable", type(exc).__name__)
            status = response.status
            self._stats.inc_value(f"polite/robots/fetch/{status // 100}xx")
            location = response.headers.get(b"Location")
            if status in _REDIRECT_STATUSES and location:
                url = response.urljoin(location.decode("latin-1"))
                if not url.startswith(("http://", "https://")):
                    return _Outcome("unavailable", f"{status} to {url}")
                continue
            if 200 <= status < 300:
                text, truncated = decode_body(response.body)
                if truncated:
                    self._stats.inc_value("polite/robots/truncated")
                    logger.info(
                        "robots.txt of %s is %d bytes: only its first %d are read",
                        origin.key,
                        len(response.body),
                        MAX_SIZE,
                    )
                return _Outcome("rules", str(status), text)
            if status >= 500 or status == 429:
                return _Outcome("unreachable", str(status))
            return _Outcome("unavailable", str(status))
        self._stats.inc_value("polite/robots/fetch/too_many_redirects")
        return _Outcome("unavailable", f"more than {MAX_REDIRECTS} redirects")

    def _redis_failed(self, exc: Exception) -> None:
        self._stats.inc_value("polite/robots/redis_error")
        self._redis_down_until = monotonic() + _REDIS_RETRY
        assert self.config.redis_url is not None
        if not self._redis_warned:
            self._redis_warned = True
            logger.warning(
                "Redis at %s failed (%s: %s): robots.txt results stay in this process; "
                "Redis is tried again every %.0f s",
                redact(self.config.redis_url),
                type(exc).__name__,
                exc,
                _REDIS_RETRY,
            )
        else:
            logger.debug("Redis failed again: %r", exc)

    def _redis_ok(self) -> None:
        if self._redis_warned:
            self._redis_warned = False
            logger.info("Redis is back: robots.txt results are shared again")

    # -- life cycle ---------------------------------------------------------------------
    def _keep_open(self, spider: Spider | None = None) -> None:
        """``spider_idle``: the spider has requests held here, or fetches running."""
        if any(o.held or o.fetching for o in self._origins.values()):
            raise DontCloseSpider

    def _close(self, spider: Spider | None = None) -> None:
        self._closing = True
        dropped = 0
        for origin in self._origins.values():
            if origin.timer is not None and origin.timer.active():
                origin.timer.cancel()
            origin.timer = None
            dropped += len(origin.held)
            origin.held = []
            waiters, origin.waiters = origin.waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if dropped:
            self._stats.inc_value("polite/robots/dropped_at_close", dropped)
            logger.warning(
                "The crawl closed with %d requests still waiting for a robots.txt", dropped
            )
        if self._shared is not None:
            self._shared.close()


@dataclass(frozen=True)
class _Claim:
    outcome: _Outcome | None = None  # a result another process stored
    lock: str | None = None  # we fetch, holding this lock token


class _SharedCache:
    """robots.txt results in Redis: JSON under ``polite:robots:<origin>``, never pickle.

    Synchronous; the middleware calls it in a thread. A file (or an
    "unavailable" answer) is stored with a TTL equal to the expiry; an
    unreachable origin only gets a short ``:down`` marker that makes the other
    processes wait for the same back-off instead of fetching too.
    """

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"

    def __init__(self, client: redis.Redis, config: RobotsConfig) -> None:
        self.client = client
        self.config = config

    def claim(self, origin: str) -> _Claim:
        """A stored result, or the fetch lock, or neither (someone else fetches)."""
        found = self._stored(origin)
        if found is not None:
            return _Claim(outcome=found)
        token = secrets.token_hex(8)
        lock_ms = max(1, int(self.config.lock_ttl * 1000))
        if not self.client.set(REDIS_PREFIX + origin + ":lock", token, nx=True, px=lock_ms):
            return _Claim()
        found = self._stored(origin)  # stored between our look and our lock
        if found is not None:
            self.release(origin, token)
            return _Claim(outcome=found)
        return _Claim(lock=token)

    def publish(self, origin: str, token: str, outcome: _Outcome, retry_in: float) -> None:
        key = REDIS_PREFIX + origin
        pipe = self.client.pipeline(transaction=False)
        if outcome.kind == "unreachable":
            down = {"v": _CACHE_FORMAT, "reason": outcome.detail, "at": time.time()}
            pipe.set(key + ":down", json.dumps(down), px=max(1, int(retry_in * 1000)))
        else:
            entry = {
                "v": _CACHE_FORMAT,
                "kind": outcome.kind,
                "detail": outcome.detail,
                "body": outcome.text,
                "fetched_at": time.time(),
            }
            pipe.set(key, json.dumps(entry), px=max(1, int(self.config.expiry * 1000)))
        pipe.eval(self._RELEASE, 1, key + ":lock", token)
        pipe.execute()

    def release(self, origin: str, token: str) -> None:
        self.client.eval(self._RELEASE, 1, REDIS_PREFIX + origin + ":lock", token)

    def close(self) -> None:
        self.client.close()

    def _stored(self, origin: str) -> _Outcome | None:
        key = REDIS_PREFIX + origin
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        pipe.pttl(key + ":down")
        pipe.get(key + ":down")
        raw, ttl_ms, down_ms, down = pipe.execute()
        if raw is not None:
            entry = _read_entry(origin, raw)
            if entry is not None:
                ttl = ttl_ms / 1000 if ttl_ms > 0 else self.config.expiry
                kind, detail, body = entry
                return _Outcome(kind, f"{detail}, from Redis", body, ttl=ttl)
        if down is not None and down_ms > 0:
            reason = _read_down(down)
            return _Outcome(
                "unreachable", f"{reason}, seen by another crawler", retry_in=down_ms / 1000
            )
        return None


def _read_entry(origin: str, raw: bytes) -> tuple[Literal["rules", "unavailable"], str, str] | None:
    """The stored JSON entry, or ``None`` (read as a miss) if it is not ours."""
    try:
        entry = json.loads(raw)
        kind = entry["kind"]
        body = entry["body"]
        if entry["v"] != _CACHE_FORMAT or kind not in ("rules", "unavailable"):
            raise ValueError(f"unknown entry version or kind: {entry['v']!r}, {kind!r}")
        if not isinstance(body, str):
            raise TypeError("body is not a string")
        return kind, str(entry.get("detail", "")), body[:MAX_SIZE]
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("Ignoring an unreadable robots.txt entry for %s in Redis: %s", origin, exc)
        return None


def _read_down(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["reason"])
    except (ValueError, TypeError, KeyError):
        return "unreachable"


def _origin_key(request: Request) -> str | None:
    """``scheme://host:port`` of an http(s) request that robots.txt applies to."""
    if request.meta.get("dont_obey_robotstxt"):
        return None
    parts = urlparse_cached(request)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:  # a port that is not a number: Scrapy will fail the request
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def _download(crawler: Crawler, request: Request) -> Response:
    engine = crawler.engine
    assert engine is not None
    download_async: Callable[[Request], Any] | None = getattr(engine, "download_async", None)
    if download_async is not None:  # Scrapy 2.14+
        response: Response = await download_async(request)
        return response
    return await maybe_deferred_to_future(engine.download(request))


def _new_deferred() -> Deferred[None]:
    from twisted.internet.defer import Deferred

    return Deferred()


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """Run *func* in the reactor's thread pool (any reactor)."""
    from twisted.internet.threads import deferToThread

    return await maybe_deferred_to_future(deferToThread(func, *args))


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await maybe_deferred_to_future(deferLater(reactor, seconds))


def _call_later(seconds: float, func: Callable[..., object], *args: Any) -> DelayedCall:
    from twisted.internet import reactor
    from twisted.internet.base import ReactorBase

    return cast("ReactorBase", reactor).callLater(seconds, func, *args)
