"""robots.txt enforcement by RFC 9309, per origin, with results shared through Redis.

:class:`PoliteRobotsTxtMiddleware` replaces Scrapy's ``RobotsTxtMiddleware``
(the add-on swaps them when ``ROBOTSTXT_OBEY`` is on). For each origin
(scheme, host, port) it fetches ``/robots.txt`` once, through the engine, so the
fetch passes the domain's delay and the other downloader middlewares, and acts
on the answer as RFC 9309 says (:mod:`scrapy_polite._robots_rules`):

- 2xx: the file is parsed (its first 500 KiB) and obeyed;
- redirects: up to five hops are followed, to any host, and the file found
  applies to the original origin; a sixth hop makes the file unavailable;
- 4xx (but 429): unavailable, so everything may be crawled;
- 5xx, 429, timeouts, network errors: unreachable, so nothing on the origin is
  crawled. Its requests wait, robots.txt is tried again after a growing
  back-off, and only after ``POLITE_ROBOTS_UNREACHABLE_TIMEOUT`` seconds with no
  answer do they fail with ``IgnoreRequest``.

Each origin is in one of five states (:class:`_State`):

- ``unknown``: never loaded; the next request starts a load (``fetching``);
- ``fetching``: the first load runs; requests wait;
- ``known``: rules in force. Past ``POLITE_ROBOTS_EXPIRY`` the next request
  starts a refresh and goes on under the old copy; a refresh that finds
  robots.txt unreachable keeps the old copy (section 2.4) until a back-off ends;
- ``unreachable``: no rules and the last load failed; requests wait for the
  next try;
- ``given up``: unreachable for ``POLITE_ROBOTS_UNREACHABLE_TIMEOUT``: its
  requests fail until ``POLITE_ROBOTS_RETRY_MAX_DELAY`` has passed, then it is
  ``unknown`` again.

Waiting requests are kept out of the downloader: while an origin is
``fetching`` or ``unreachable``, its requests are held at scheduling time (the
engine's ``request_scheduled`` signal; one already in the downloader is sent
back to the scheduler) and scheduled again once the answer is in, so none
occupies one of ``CONCURRENT_REQUESTS`` while it waits. Only requests that reach
the downloader without passing the scheduler (``engine.download`` calls,
requests read back from a disk or Redis queue) wait inside ``process_request``.
In cluster mode every request waits there: the scheduler is the shared queue,
and a request held in one worker's memory would be lost with that worker; one
waiting in the downloader stays leased to its worker in Redis, and goes back to
the queue if the worker dies. When the worker is stopped, those requests go back
to the shared queue within a second (Scrapy's graceful stop waits for every
request in the downloader: they would otherwise hold the stop until the origin
answers).

With a Redis URL results are shared (:mod:`scrapy_polite._robots_store`): the
first crawler process to need an origin takes a short lock and fetches; the
others poll Redis for the result, so N processes fetch each robots.txt once per
expiry period. While Redis is away, results stay in this process.

Every time an origin's rules are loaded the middleware sends Scrapy's
``robots_parsed`` signal (the delay middleware reads ``Crawl-delay`` from it)
and, when the file lists sitemaps, this module's :data:`sitemaps_found` signal.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from time import monotonic
from typing import TYPE_CHECKING, Any, cast
from weakref import WeakSet

from scrapy import Request, signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest, NotConfigured
from scrapy.http.request import NO_CALLBACK
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached

from scrapy_polite._redis import RedisLink, RedisUnavailable, redis_url, verify_redis
from scrapy_polite._robots_rules import (
    MAX_REDIRECTS,
    MAX_SIZE,
    Outcome,
    RobotsRules,
    outcome_of_status,
)
from scrapy_polite._robots_store import COMPONENT, RobotsStore
from scrapy_polite._settings import (
    PoliteSettingError,
    get_bool,
    get_float,
    get_int,
    robots_user_agent,
)
from scrapy_polite.cluster import cluster_enabled
from scrapy_polite.report import ledger, report_enabled

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from twisted.internet.base import DelayedCall
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

__all__ = ["PoliteRobotsTxtMiddleware", "RobotsConfig", "requests_held_at_close", "sitemaps_found"]

logger = logging.getLogger(__name__)

#: Sent once per origin (and again if a later fetch lists other sitemaps) with
#: ``origin`` ("http://host:port"), ``sitemaps`` (a list of URLs, as written in
#: robots.txt) and ``request`` (the request that needed the origin's rules).
#: A spider can follow them from a handler with ``self.crawler.engine.crawl()``.
sitemaps_found = object()

#: Sent when the spider closes while requests are still held back here waiting for
#: a robots.txt, with ``requests`` (a list). A receiver that keeps them for later
#: (the cluster's shared queue hands them to the other workers) returns how many it
#: took; the rest are dropped (``polite/robots/dropped_at_close``).
requests_held_at_close = object()

_REDIS_POLL = 0.1  # seconds between two looks at Redis while another process fetches
_STOP_LOOK = 1.0  # cluster mode: seconds between two looks for a stop, while waiting
_DOWNLOAD_PRIORITY = 1000  # robots.txt requests go before the pages that wait for them
_EVICTION_SCAN = 64  # origins looked at, oldest first, for one to forget
_MIN_IDLE = 5.0  # seconds an origin must have gone unused before it may be forgotten


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
    max_origins: int  # origins kept in memory, least recently used evicted first

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        user_agent, token = robots_user_agent(settings)
        retry_delay = get_float(settings, "POLITE_ROBOTS_RETRY_DELAY", 10.0, minimum=0.01)
        retry_max_delay = get_float(settings, "POLITE_ROBOTS_RETRY_MAX_DELAY", 300.0, minimum=0.01)
        if retry_max_delay < retry_delay:
            raise PoliteSettingError(
                "POLITE_ROBOTS_RETRY_MAX_DELAY",
                retry_max_delay,
                f"at least POLITE_ROBOTS_RETRY_DELAY ({retry_delay})",
            )
        return cls(
            user_agent=user_agent,
            product_token=token,
            expiry=get_float(settings, "POLITE_ROBOTS_EXPIRY", 86400.0, minimum=0.001),
            timeout=get_float(settings, "POLITE_ROBOTS_TIMEOUT", 10.0, minimum=0.001),
            retry_delay=retry_delay,
            retry_max_delay=retry_max_delay,
            unreachable_timeout=get_float(
                settings, "POLITE_ROBOTS_UNREACHABLE_TIMEOUT", 900.0, minimum=0
            ),
            redis_url=redis_url(settings, "POLITE_ROBOTS_REDIS_URL"),
            max_origins=get_int(settings, "POLITE_ROBOTS_MAX_ORIGINS", 10_000, minimum=10),
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after *attempts* failed ones in a row."""
        return float(min(self.retry_delay * 2 ** min(attempts - 1, 30), self.retry_max_delay))

    @property
    def lock_ttl(self) -> float:
        """How long one process may hold the shared fetch lock of an origin."""
        return 3 * self.timeout + 5


class _State(Enum):
    UNKNOWN = "unknown"
    FETCHING = "fetching"
    KNOWN = "known"
    UNREACHABLE = "unreachable"
    GIVEN_UP = "given up"


@dataclass(eq=False)
class _Origin:
    """What this process knows about one origin's robots.txt."""

    key: str  # scheme://host:port
    host: str
    state: _State = _State.UNKNOWN
    rules: RobotsRules | None = None  # in force while KNOWN (RobotsRules(""): allow all)
    loading: bool = False  # a load (first fetch, retry or refresh) is running
    loaded_at: float = 0.0
    expires_at: float = 0.0  # KNOWN: when the next request starts a refresh
    unreachable_since: float = 0.0  # UNREACHABLE: since when
    attempts: int = 0  # failed loads in a row
    retry_at: float = 0.0  # GIVEN_UP: until when requests fail
    reason: str = ""  # why the last load failed
    trigger: Request | None = None  # a request to this origin, for signals
    held: list[Request] = field(default_factory=list)  # kept out of the scheduler
    waiters: list[Deferred[None]] = field(default_factory=list)  # parked in process_request
    timer: DelayedCall | None = None  # UNREACHABLE: the next try
    used_at: float = 0.0  # when a request last asked for it (monotonic)
    sitemaps: tuple[str, ...] = ()

    @property
    def waiting(self) -> bool:
        """Its requests must wait for a load."""
        return self.state in (_State.FETCHING, _State.UNREACHABLE)


class PoliteRobotsTxtMiddleware:
    """Downloader middleware that obeys each origin's robots.txt as RFC 9309 says."""

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "ROBOTSTXT_OBEY", False):
            raise NotConfigured("ROBOTSTXT_OBEY is off")
        self.crawler = crawler
        self.config = RobotsConfig.from_settings(crawler.settings)
        assert crawler.stats is not None
        self._stats = crawler.stats
        self._origins: OrderedDict[str, _Origin] = OrderedDict()  # least recently used first
        self._scheduled: WeakSet[Request] = WeakSet()  # passed the gate in this process
        self._closing = False
        self._store: RobotsStore | None = None
        # The politeness report's ledger, when the report runs.
        self._ledger = ledger(crawler) if report_enabled(crawler.settings) else None
        if self.config.redis_url:
            verify_redis(crawler.settings, "POLITE_ROBOTS_REDIS_URL")
            link = RedisLink.open(
                crawler,
                self.config.redis_url,
                COMPONENT,
                "robots.txt results stay in this process",
            )
            self._store = RobotsStore(link, self.config.expiry, self.config.lock_ttl)
        # In cluster mode requests wait leased in the downloader (see the module's docstring).
        self._shared_queue = cluster_enabled(crawler.settings)
        if not self._shared_queue:
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
        origin = self._origin(request)
        if origin is None:
            return None
        waited = False
        while True:
            now = monotonic()
            if origin.state is _State.KNOWN:
                if now >= origin.expires_at and not origin.loading:
                    self._start(origin, request)  # the last copy serves until the new one
                self._stats.inc_value("polite/robots/cache_hit/memory")
                self._check(origin, request)
                return None
            if origin.state is _State.GIVEN_UP:
                if now < origin.retry_at:
                    raise self._fail(origin, request)
                origin.state = _State.UNKNOWN
            if origin.state is _State.UNKNOWN:
                origin.state = _State.FETCHING
                self._start(origin, request)
            if request in self._scheduled:
                # Back to the scheduler, where the gate holds it: waiting here
                # would take one of CONCURRENT_REQUESTS from the other origins.
                self._scheduled.discard(request)
                return request.replace(dont_filter=True)  # it passed the dupefilter already
            waiter: Deferred[None] = _new_deferred()
            origin.waiters.append(waiter)
            if not waited:
                waited = True
                self._stats.inc_value("polite/robots/waited_in_downloader")
            if self._shared_queue:
                # A stop waits for the requests in the downloader: look every second.
                look = _call_later(_STOP_LOOK, _fire, waiter)
                await maybe_deferred_to_future(waiter)
                if look.active():
                    look.cancel()
                elif waiter in origin.waiters:
                    origin.waiters.remove(waiter)
                engine = self.crawler.engine
                if engine is not None and not engine.running:
                    # The worker stops: back to the shared queue, never lost with it.
                    self._stats.inc_value("polite/robots/requeued_at_stop")
                    return request.replace(dont_filter=True)
            else:
                await maybe_deferred_to_future(waiter)
            if self._closing:
                raise IgnoreRequest(f"crawl closed while waiting for {origin.key}/robots.txt")

    def _check(self, origin: _Origin, request: Request) -> None:
        assert origin.rules is not None
        if origin.rules.allowed(request.url, self.config.product_token):
            return
        logger.debug("Forbidden by robots.txt: %s", request)
        self._stats.inc_value("polite/robots/forbidden")
        if self._ledger is not None:
            self._ledger.account(origin.host).forbidden += 1
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
        origin = self._origin(request, create=False)
        if origin is None:
            self._scheduled.add(request)
            return
        if origin.waiting and not self._closing:
            origin.held.append(request)
            self._stats.inc_value("polite/robots/held")
            raise IgnoreRequest(f"held until {origin.key}/robots.txt is known")
        self._scheduled.add(request)

    def _origin(self, request: Request, *, create: bool = True) -> _Origin | None:
        """The origin whose robots.txt applies to *request*; ``None`` if none does
        (``dont_obey_robotstxt``, not http(s)), or if it is new and not *create*."""
        if request.meta.get("dont_obey_robotstxt"):
            return None
        parts = urlparse_cached(request)
        scheme = parts.scheme.lower()
        host = parts.hostname
        if scheme not in ("http", "https") or not host:
            return None
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number: Scrapy will fail the request
            return None
        key = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        origin = self._origins.get(key)
        if origin is not None:
            self._origins.move_to_end(key)
        elif create:
            origin = self._origins[key] = _Origin(key, host)
            if len(self._origins) > self.config.max_origins:
                self._evict()
        if origin is not None:
            origin.used_at = monotonic()
        return origin

    def _evict(self) -> None:
        """Forget the least recently used origin that is not being loaded nor waited
        for: its next request reads its robots.txt again, from Redis or the site.

        One used in the last ``_MIN_IDLE`` seconds is kept even past the limit: its
        released requests may still be on their way through the scheduler, and
        forgetting it would fetch its robots.txt again for each of them.
        """
        now = monotonic()
        for key in itertools.islice(self._origins, _EVICTION_SCAN):
            origin = self._origins[key]
            if now - origin.used_at < _MIN_IDLE:
                return  # least recently used first: the others are more recent still
            if origin.loading or origin.waiting or origin.held or origin.waiters:
                continue
            del self._origins[key]
            self._stats.inc_value("polite/robots/evicted")
            return

    # -- loading an origin's rules ---------------------------------------------------
    def _start(self, origin: _Origin, request: Request | None) -> None:
        origin.loading = True
        if request is not None:
            origin.trigger = request
        deferred_from_coro(self._load(origin)).addErrback(
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
            outcome = Outcome("unreachable", type(exc).__name__)
        finally:
            origin.loading = False
        if self._closing:
            return
        if outcome.kind == "unreachable":
            self._unreachable(origin, outcome)
        else:
            self._loaded(origin, outcome, rules)

    def _loaded(self, origin: _Origin, outcome: Outcome, rules: RobotsRules) -> None:
        now = monotonic()
        if origin.state is _State.UNREACHABLE:
            logger.info(
                "robots.txt of %s answered (%s) after %.1f s unreachable; "
                "releasing %d waiting request(s)",
                origin.key,
                outcome.detail,
                now - origin.unreachable_since,
                len(origin.held) + len(origin.waiters),
            )
        origin.state = _State.KNOWN
        origin.rules = rules
        origin.loaded_at = now
        origin.expires_at = now + (outcome.ttl if outcome.ttl is not None else self.config.expiry)
        origin.attempts = 0
        if outcome.kind == "unavailable":
            self._stats.inc_value("polite/robots/unavailable")
        self._robots_status(origin, "file" if outcome.kind == "rules" else "unavailable")
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

    def _unreachable(self, origin: _Origin, outcome: Outcome) -> None:
        now = monotonic()
        origin.reason = outcome.detail
        origin.attempts += 1
        delay = outcome.retry_in if outcome.retry_in is not None else None
        if delay is None:
            delay = self.config.backoff(origin.attempts)
        if origin.state is _State.KNOWN:
            self._refresh_failed(origin, outcome, now, delay)
            return
        if origin.state is not _State.UNREACHABLE:
            origin.state = _State.UNREACHABLE
            origin.unreachable_since = now
            self._stats.inc_value("polite/robots/unreachable")
            self._robots_status(origin, "unreachable")
        waited = now - origin.unreachable_since
        if waited >= self.config.unreachable_timeout:
            self._give_up(origin, waited)
            return
        delay = min(delay, self.config.unreachable_timeout - waited)
        log = logger.warning if origin.attempts == 1 else logger.info
        log(
            "robots.txt of %s is unreachable (%s): holding its requests, next try in %.1f s",
            origin.key,
            outcome.detail,
            delay,
        )
        origin.timer = _call_later(delay, self._retry, origin)

    def _refresh_failed(self, origin: _Origin, outcome: Outcome, now: float, delay: float) -> None:
        """RFC 9309 lets a crawler keep its copy while robots.txt is unreachable:
        the last rules stay, and the next request after a back-off tries again."""
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
        if self._closing or origin.loading:
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
        self._robots_status(origin, "given up")
        origin.state = _State.GIVEN_UP
        origin.attempts = 0
        origin.retry_at = monotonic() + self.config.retry_max_delay
        self._release(origin)

    def _robots_status(self, origin: _Origin, status: str) -> None:
        """For the politeness report: "file", "unavailable", "unreachable", "given up"."""
        if self._ledger is not None:
            self._ledger.account(origin.host).robots = status

    def _release(self, origin: _Origin) -> None:
        """Schedule the held requests again and wake those parked in the downloader."""
        held, origin.held = origin.held, []
        waiters, origin.waiters = origin.waiters, []
        engine = self.crawler.engine
        if held and engine is not None and engine.spider is not None:
            for request in held:
                engine.crawl(request)
        for waiter in waiters:
            _fire(waiter)

    # -- fetching ---------------------------------------------------------------------
    async def _shared_or_fetched(self, origin: _Origin) -> Outcome:
        """The result another crawler stored, or our own fetch (then stored)."""
        store = self._store
        if store is None:
            return await _fetch(self.crawler, origin.key, self.config.timeout)
        try:
            while True:
                claim = await store.claim(origin.host, origin.key)
                if claim.outcome is not None:
                    self._stats.inc_value(
                        "polite/robots/cache_hit/redis"
                        if claim.outcome.kind != "unreachable"
                        else "polite/robots/shared_unreachable"
                    )
                    return claim.outcome
                if claim.lock is not None:
                    break
                await _sleep(_REDIS_POLL)
        except RedisUnavailable:
            return await _fetch(self.crawler, origin.key, self.config.timeout)
        outcome = await _fetch(self.crawler, origin.key, self.config.timeout)
        retry_in = self.config.backoff(origin.attempts + 1)
        with contextlib.suppress(RedisUnavailable):  # our result stays in this process
            await store.publish(origin.host, origin.key, claim.lock, outcome, retry_in)
        return outcome

    # -- life cycle ---------------------------------------------------------------------
    def _keep_open(self, spider: Spider | None = None) -> None:
        """``spider_idle``: the spider has requests held here, or loads running."""
        if any(o.held or o.loading for o in self._origins.values()):
            raise DontCloseSpider

    def _close(self, spider: Spider | None = None) -> None:
        self._closing = True
        held: list[Request] = []
        for origin in self._origins.values():
            if origin.timer is not None and origin.timer.active():
                origin.timer.cancel()
            origin.timer = None
            held += origin.held
            origin.held = []
            waiters, origin.waiters = origin.waiters, []
            for waiter in waiters:
                _fire(waiter)
        dropped = len(held)
        if held:
            replies = self.crawler.signals.send_catch_log(
                signal=requests_held_at_close, requests=held
            )
            dropped -= sum(r for _, r in replies if isinstance(r, int))
        if dropped > 0:
            self._stats.inc_value("polite/robots/dropped_at_close", dropped)
            logger.warning(
                "The crawl closed with %d requests still waiting for a robots.txt", dropped
            )
        if self._store is not None:
            self._store.link.release()


async def _fetch(crawler: Crawler, origin: str, timeout: float) -> Outcome:
    """Download the robots.txt of *origin* through the engine, following up to five redirects."""
    stats, engine = crawler.stats, crawler.engine
    assert stats is not None
    assert engine is not None
    url = origin + "/robots.txt"
    for _ in range(MAX_REDIRECTS + 1):
        request = Request(
            url,
            priority=_DOWNLOAD_PRIORITY,
            callback=NO_CALLBACK,
            dont_filter=True,
            meta={
                "dont_obey_robotstxt": True,
                "dont_cache": True,  # the HTTP cache must never serve an old robots.txt
                "dont_redirect": True,  # followed here, up to five hops
                "dont_retry": True,  # tried again here, after a back-off
                "allow_offsite": True,
                "download_timeout": timeout,
            },
        )
        try:
            response = await engine.download_async(request)
        except IgnoreRequest as exc:
            logger.info("robots.txt request %s was dropped (%s): allowing all", url, exc)
            return Outcome("unavailable", f"dropped: {exc}")
        except Exception as exc:
            stats.inc_value("polite/robots/fetch/error")
            return Outcome("unreachable", type(exc).__name__)
        stats.inc_value(f"polite/robots/fetch/{response.status // 100}xx")
        outcome = outcome_of_status(response.status, response.body)
        if outcome is not None:
            if outcome.truncated:
                stats.inc_value("polite/robots/truncated")
                logger.info(
                    "robots.txt of %s is %d bytes: only its first %d are read",
                    origin,
                    len(response.body),
                    MAX_SIZE,
                )
            return outcome
        location = response.headers.get(b"Location")
        if not location:
            return Outcome("unavailable", f"{response.status} without Location")
        url = response.urljoin(location.decode("latin-1"))
        if not url.startswith(("http://", "https://")):
            return Outcome("unavailable", f"{response.status} to {url}")
    stats.inc_value("polite/robots/fetch/too_many_redirects")
    return Outcome("unavailable", f"more than {MAX_REDIRECTS} redirects")


# -- Twisted helpers, importing the reactor only once it is installed ------------------
def _fire(waiter: Deferred[None]) -> None:
    """Wake *waiter*, unless it woke already (a waiter in cluster mode wakes each second)."""
    if not waiter.called:
        waiter.callback(None)


def _new_deferred() -> Deferred[None]:
    from twisted.internet.defer import Deferred

    return Deferred()


async def _in_thread(func: Callable[..., Any], *args: Any) -> Any:
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
