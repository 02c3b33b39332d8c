"""Jittered per-domain delays, back-off on 429/503, and robots.txt ``Crawl-delay``.

The waiting itself is done by Scrapy's downloader slots, never by sleeping:
:class:`PoliteDelayMiddleware` gives every download slot (one per host) a
:class:`PoliteSlot`, whose ``download_delay()`` draws each gap from the
domain's own range and distribution, once per departure. On top of the draw it
adds the domain's back-off, honours a ``Retry-After`` hold, and never goes
under the domain's floor (its range's low end, or robots.txt's
``Crawl-delay`` if higher) nor over ``POLITE_DELAY_MAX``.

A domain's state (back-off, hold, Crawl-delay) lives in the middleware, keyed
by slot, so it survives Scrapy dropping an idle slot after 60 s: the next
request to that domain gets a new :class:`PoliteSlot` bound to the same state.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import monotonic
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals
from scrapy.core.downloader import Slot
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import NotConfigured
from scrapy.http import Response
from scrapy.utils.httpobj import urlparse_cached

from scrapy_polite._settings import (
    PoliteSettingError,
    get_bool,
    get_choice,
    get_float,
    get_int,
)

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.core.downloader import Downloader
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "lognormal", "exponential")

# An extra delay below this is dropped when it fades away (seconds).
_NEGLIGIBLE = 0.001

# The log-normal's shape: sigma of the underlying normal (heavier tail as it grows).
_LOGNORMAL_SIGMA = 1.0


@dataclass(frozen=True)
class DelayRange:
    """Gaps between two requests to one domain: at least *low*, mean (low + high) / 2.

    ``uniform`` spreads gaps evenly over [low, high]. ``exponential`` and
    ``lognormal`` add a random excess to *low* with the same mean, so gaps are
    usually short with an occasional long pause (a heavier tail; only
    ``POLITE_DELAY_MAX`` bounds them).
    """

    low: float
    high: float
    distribution: str = "uniform"

    def draw(self, rng: random.Random) -> float:
        if self.high <= self.low:
            return self.low
        if self.distribution == "uniform":
            return rng.uniform(self.low, self.high)
        mean_excess = (self.high - self.low) / 2
        if self.distribution == "exponential":
            return self.low + rng.expovariate(1 / mean_excess)
        mu = math.log(mean_excess) - _LOGNORMAL_SIGMA**2 / 2
        return self.low + rng.lognormvariate(mu, _LOGNORMAL_SIGMA)

    def raised_to(self, floor: float) -> DelayRange:
        """This range moved up so that it starts at *floor* (keeping its spread)."""
        if floor <= self.low:
            return self
        return DelayRange(floor, floor + (self.high - self.low), self.distribution)


@dataclass(frozen=True)
class DelayConfig:
    """Every setting of the delay component, read and validated once."""

    default: DelayRange
    domains: tuple[tuple[str, DelayRange], ...]  # longest domain first
    cap: float
    backoff_codes: frozenset[int]
    backoff_delay: float
    backoff_factor: float
    backoff_recovery: float
    backoff_retries: int
    obey_crawl_delay: bool
    robots_user_agent: str

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        distribution = get_choice(settings, "POLITE_DELAY_DISTRIBUTION", "uniform", DISTRIBUTIONS)
        cap = get_float(settings, "POLITE_DELAY_MAX", 60.0, minimum=0)
        if settings.get("POLITE_DELAY") is None:
            # Scrapy's own delay, with its ±DOWNLOAD_DELAY_JITTER, is the default range.
            delay = get_float(settings, "DOWNLOAD_DELAY", 0.0, minimum=0)
            jitter = get_float(settings, "DOWNLOAD_DELAY_JITTER", 0.5, minimum=0, maximum=1)
            default = DelayRange(delay * (1 - jitter), delay * (1 + jitter), distribution)
        else:
            default = _parse_range("POLITE_DELAY", settings.get("POLITE_DELAY"), distribution)
        domains = []
        raw_domains = settings.getdict("POLITE_DELAY_DOMAINS")
        for domain, value in raw_domains.items():
            name = f"POLITE_DELAY_DOMAINS[{domain!r}]"
            domains.append(
                (str(domain).lower().lstrip("."), _parse_range(name, value, distribution))
            )
        for name, delay_range in [("POLITE_DELAY", default)] + [
            (f"POLITE_DELAY_DOMAINS[{d!r}]", r) for d, r in domains
        ]:
            if delay_range.high > cap:
                raise PoliteSettingError(
                    "POLITE_DELAY_MAX", cap, f"at least the {name} upper bound ({delay_range.high})"
                )
        codes = settings.getlist("POLITE_BACKOFF_HTTP_CODES", [429, 503])
        try:
            backoff_codes = frozenset(int(c) for c in codes)
        except (TypeError, ValueError):
            raise PoliteSettingError(
                "POLITE_BACKOFF_HTTP_CODES", codes, "a list of HTTP status codes"
            ) from None
        return cls(
            default=default,
            domains=tuple(sorted(domains, key=lambda d: -len(d[0]))),
            cap=cap,
            backoff_codes=backoff_codes,
            backoff_delay=get_float(settings, "POLITE_BACKOFF_DELAY", 1.0, minimum=0),
            backoff_factor=get_float(settings, "POLITE_BACKOFF_FACTOR", 2.0, minimum=1),
            backoff_recovery=get_float(
                settings, "POLITE_BACKOFF_RECOVERY", 0.75, minimum=0, maximum=1
            ),
            backoff_retries=get_int(settings, "POLITE_BACKOFF_RETRIES", 5, minimum=0),
            obey_crawl_delay=get_bool(settings, "POLITE_OBEY_CRAWL_DELAY", True),
            robots_user_agent=str(
                settings.get("POLITE_ROBOTS_USER_AGENT")
                or settings.get("ROBOTSTXT_USER_AGENT")
                or settings.get("USER_AGENT")
                or "*"
            ),
        )

    def range_for(self, host: str) -> DelayRange:
        """The range of *host*: its own, its parent domain's, or the default."""
        host = host.lower()
        for domain, delay_range in self.domains:
            if host == domain or host.endswith("." + domain):
                return delay_range
        return self.default


def _parse_range(name: str, value: Any, distribution: str) -> DelayRange:
    """``2`` or ``[2, 5]`` or ``{"delay": [2, 5], "distribution": "lognormal"}``."""
    expected = "a delay in seconds, a [low, high] pair, or {'delay': ..., 'distribution': ...}"
    if isinstance(value, dict):
        distribution = value.get("distribution", distribution)
        if distribution not in DISTRIBUTIONS:
            raise PoliteSettingError(
                name, value, "a distribution among " + ", ".join(DISTRIBUTIONS)
            )
        value = value.get("delay")
    if isinstance(value, str):
        value = value.replace("-", " ").split()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise PoliteSettingError(name, value, expected) from None
    if not 0 <= low <= high or math.isinf(high):
        raise PoliteSettingError(name, value, "0 <= low <= high, in seconds")
    return DelayRange(low, high, distribution)


@dataclass
class _DomainState:
    """What the crawl has learnt about one domain; outlives its download slot."""

    key: str
    range: DelayRange
    backoff: float = 0.0  # extra seconds added to every gap, after 429/503
    hold_until: float = 0.0  # time.monotonic() (Slot.lastseen's clock) before which nothing is sent
    crawl_delay: float = 0.0  # from robots.txt
    last_departure: float = 0.0  # when the last request left the slot's queue
    last_start: float = 0.0  # when the last download started (closer to the wire)
    revision: int = 0  # bumped when the domain must slow down at once

    def slow_down(self) -> None:
        """Make the next gap be drawn again, with what was just learnt."""
        self.revision += 1

    def floor(self) -> float:
        return max(self.range.low, self.crawl_delay)


class PoliteSlot(Slot):
    """A download slot whose gaps come from its domain's :class:`_DomainState`.

    Scrapy calls ``download_delay()`` each time it looks at the slot's queue;
    the gap is drawn once per departure (when ``lastseen`` moves), so a queue
    looked at twice does not re-roll its wait, and the gaps the site sees follow
    the configured distribution. A back-off or a new Crawl-delay draws the
    pending gap again at once.
    """

    __slots__ = ("_config", "_drawn_for", "_gap", "_on_draw", "_rng", "_starting", "_state")

    def __init__(
        self,
        concurrency: int,
        state: _DomainState,
        config: DelayConfig,
        rng: random.Random,
        on_draw: Callable[[_DomainState, float], None],
        start_delay: float = 0.0,
    ) -> None:
        # ``delay`` is left for AutoThrottle to write; it can raise a gap, never lower it.
        super().__init__(concurrency, start_delay, 0.0)
        # A slot made again after Scrapy dropped the idle one keeps the domain's pace.
        self.lastseen = state.last_departure
        self._state = state
        self._config = config
        self._rng = rng
        self._on_draw = on_draw
        self._drawn_for = (-1.0, -1)
        self._gap = 0.0
        self._starting: set[Request] = set()
        self.transferring = _Transferring(self._starting, state)

    def free_transfer_slots(self) -> int:
        # Scrapy's queue loop pops the head of the queue each time this is
        # positive, but on the asyncio reactor that download only joins
        # ``transferring`` once its task first runs, after the loop is over.
        # Counting it from the pop on keeps CONCURRENT_REQUESTS_PER_DOMAIN at
        # the site; requests that left without starting are forgotten.
        self._starting &= self.active
        free = self.concurrency - len(self.transferring) - len(self._starting)
        if free > 0 and self.queue:
            self._starting.add(self.queue[0][0])
        return free

    def download_delay(self) -> float:
        if self._drawn_for != (self.lastseen, self._state.revision):
            self._drawn_for = (self.lastseen, self._state.revision)
            self._state.last_departure = self.lastseen
            self._gap = self._draw()
            self._on_draw(self._state, self._gap)
        hold = self._state.hold_until - self.lastseen
        if self._gap <= 0:
            return max(0.0, hold)
        # Count the gap from when the last download really started, not from when
        # it left the queue: on a busy machine the two can be far apart, and the
        # site sees the former.
        started_late = max(0.0, self._state.last_start - self.lastseen)
        return max(self._gap + started_late, hold)

    def _draw(self) -> float:
        state = self._state
        floor = state.floor()
        gap = max(state.range.raised_to(floor).draw(self._rng), self.delay) + state.backoff
        return min(max(gap, floor), self._config.cap)


class _Transferring(set[Request]):
    """A slot's downloads in progress; a download that starts is no longer starting."""

    def __init__(self, starting: set[Request], state: _DomainState) -> None:
        super().__init__()
        self._starting = starting
        self._state = state

    def add(self, request: Request) -> None:
        self._starting.discard(request)
        self._state.last_start = monotonic()
        super().add(request)


class PoliteDelayMiddleware:
    """Downloader middleware that spaces the requests to each domain politely.

    - ``process_request`` makes sure the request's download slot is a
      :class:`PoliteSlot`; the slot does the waiting.
    - ``process_response`` backs off on ``POLITE_BACKOFF_HTTP_CODES`` (429 and
      503): it holds the domain for ``Retry-After``, raises the domain's extra
      delay, and retries the request; later successes shrink the extra delay.
    - On ``robots_parsed`` (sent by Scrapy's robots.txt middleware and by
      scrapy-polite's), a ``Crawl-delay`` raises the domain's floor.
    """

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "POLITE_DELAY_ENABLED", True):
            raise NotConfigured("POLITE_DELAY_ENABLED is off")
        self.crawler = crawler
        self.config = DelayConfig.from_settings(crawler.settings)
        self._autothrottle = crawler.settings.getbool("AUTOTHROTTLE_ENABLED")
        self._autothrottle_start = crawler.settings.getfloat("AUTOTHROTTLE_START_DELAY")
        self._rng = random.Random()
        self._domains: dict[str, _DomainState] = {}
        crawler.signals.connect(self._robots_parsed, signal=signals.robots_parsed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- requests -----------------------------------------------------------------
    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        assert self.crawler.engine is not None
        downloader = self.crawler.engine.downloader
        key = downloader.get_slot_key(request)
        if not key:  # data:, file: and other host-less URLs are not downloaded from a site
            return
        if key not in downloader.slots:
            downloader.slots[key] = self._new_slot(downloader, key, request)
            # Scrapy starts its idle-slot collector when it creates a slot itself.
            start_gc = getattr(downloader, "_start_slot_gc", None)
            if start_gc is not None:
                start_gc()

    def _new_slot(self, downloader: Downloader, key: str, request: Request) -> PoliteSlot:
        concurrency = downloader.per_slot_settings.get(key, {}).get(
            "concurrency", downloader.ip_concurrency or downloader.domain_concurrency
        )
        start = self._autothrottle_start if self._autothrottle else 0.0
        return PoliteSlot(
            concurrency, self._state(key, request), self.config, self._rng, self._record_gap, start
        )

    def _state(self, key: str, request: Request) -> _DomainState:
        state = self._domains.get(key)
        if state is None:
            host = urlparse_cached(request).hostname or key
            state = self._domains[key] = _DomainState(key, self.config.range_for(host))
        return state

    def _record_gap(self, state: _DomainState, gap: float) -> None:
        assert self.crawler.stats is not None
        self.crawler.stats.set_value(f"polite/delay/current/{state.key}", round(gap, 3))

    # -- responses ----------------------------------------------------------------
    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        if "cached" in response.flags or not urlparse_cached(request).hostname:
            return response
        assert self.crawler.engine is not None
        state = self._state(self.crawler.engine.downloader.get_slot_key(request), request)
        if response.status not in self.config.backoff_codes:
            if state.backoff:
                state.backoff *= self.config.backoff_recovery
                if state.backoff < _NEGLIGIBLE:
                    state.backoff = 0.0
            return response
        self._back_off(state, response)
        if request.meta.get("dont_retry"):
            return response
        retry = get_retry_request(
            request,
            spider=self.crawler.spider,  # type: ignore[arg-type]
            reason=f"polite backoff {response.status}",
            max_retry_times=self.config.backoff_retries,
            stats_base_key="polite/delay/retry",
        )
        return retry or response

    def _back_off(self, state: _DomainState, response: Response) -> None:
        retry_after = _retry_after(response.headers.get(b"Retry-After"))
        cap = self.config.cap
        if retry_after is not None and retry_after > cap:
            logger.warning(
                "%s asked for Retry-After %.0f s; waiting POLITE_DELAY_MAX (%.0f s) instead",
                state.key,
                retry_after,
                cap,
            )
            retry_after = cap
        state.backoff = min(
            cap,
            max(state.backoff * self.config.backoff_factor, self.config.backoff_delay),
        )
        if retry_after:
            state.hold_until = max(state.hold_until, monotonic() + retry_after)
        state.slow_down()
        stats = self.crawler.stats
        assert stats is not None
        stats.inc_value("polite/delay/backoff")
        stats.inc_value(f"polite/delay/backoff/{state.key}")
        stats.set_value(f"polite/delay/extra/{state.key}", round(state.backoff, 3))
        logger.info(
            "%s answered %d: backing off (extra delay %.2f s%s)",
            state.key,
            response.status,
            state.backoff,
            f", Retry-After {retry_after:.1f} s" if retry_after else "",
        )

    # -- robots.txt -----------------------------------------------------------------
    def _robots_parsed(self, robotparser: Any, request: Request) -> None:
        if not self.config.obey_crawl_delay:
            return
        crawl_delay = getattr(robotparser, "crawl_delay", None)
        if crawl_delay is None:
            return
        try:
            seconds = crawl_delay(self.config.robots_user_agent)
        except Exception:  # a third-party parser without Crawl-delay support
            logger.debug("%r cannot report Crawl-delay", robotparser, exc_info=True)
            return
        if not seconds:
            return
        seconds = float(seconds)
        assert self.crawler.engine is not None
        state = self._state(self.crawler.engine.downloader.get_slot_key(request), request)
        if seconds > self.config.cap:
            logger.warning(
                "%s asks for Crawl-delay %.1f s; using POLITE_DELAY_MAX (%.1f s) instead",
                state.key,
                seconds,
                self.config.cap,
            )
            seconds = self.config.cap
        state.crawl_delay = seconds
        state.slow_down()
        # The gap after the robots.txt request was drawn when it left, under the old
        # floor: hold the domain for the new floor from the moment it is known.
        state.hold_until = max(state.hold_until, monotonic() + seconds)
        assert self.crawler.stats is not None
        self.crawler.stats.set_value(f"polite/delay/crawl_delay/{state.key}", seconds)
        logger.info("%s: Crawl-delay %.2f s is now its delay floor", state.key, seconds)


def _retry_after(value: bytes | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())
