"""Jittered per-domain delays, back-off on 429/503, and robots.txt ``Crawl-delay``.

The waiting itself is done by Scrapy's downloader slots, never by sleeping:
:class:`PoliteDelayMiddleware` gives every download slot (one per host) a paced
slot (:mod:`scrapy_polite._scrapy_internals`) whose waits come from the domain's
:class:`_DomainPace`. It draws each gap from the domain's own range and
distribution, once per departure; on top of the draw it adds the domain's
back-off, honours a ``Retry-After`` hold, and never goes under the domain's
floor (its range's low end, or robots.txt's ``Crawl-delay`` if higher) nor over
``POLITE_DELAY_MAX``.

A domain's range is, from the most specific: its ``POLITE_DELAY_DOMAINS`` entry,
its ``DOWNLOAD_SLOTS`` entry's ``delay`` and ``jitter`` (as in stock Scrapy),
then ``POLITE_DELAY`` (or ``DOWNLOAD_DELAY`` with ``DOWNLOAD_DELAY_JITTER``).
A ``DOWNLOAD_SLOTS`` ``concurrency`` applies as in stock Scrapy.

A domain's pace (back-off, hold, Crawl-delay) lives in the middleware, keyed by
slot, so it survives Scrapy dropping an idle slot after 60 s: the next request
to that domain gets a new slot bound to the same pace.

The add-on places the middleware after Scrapy's HTTP cache (950 against 900):
a cached response is served before the domain's turn and never waits, and a
429/503 becomes a retry before the cache could store it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import monotonic
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import NotConfigured
from scrapy.utils.asyncio import call_later
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.httpobj import urlparse_cached

from scrapy_polite._redis import RedisUnavailable, verify_redis
from scrapy_polite._scrapy_internals import PacedSlot, has_slot, install_slot
from scrapy_polite._settings import (
    PoliteSettingError,
    as_list,
    get_bool,
    get_choice,
    get_dict,
    get_float,
    get_int,
    robots_user_agent,
)
from scrapy_polite.cluster import Busy, ClusterConfig, Grant, SharedPace, cluster_enabled
from scrapy_polite.report import ledger, report_enabled

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from scrapy.utils.asyncio import CallLaterResult
    from typing_extensions import Self

    from scrapy_polite.report import Ledger

__all__ = ["DISTRIBUTIONS", "DelayConfig", "DelayRange", "PoliteDelayMiddleware"]

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "lognormal", "exponential")

# An extra delay below this is dropped when it fades away (seconds).
_NEGLIGIBLE = 0.001
# Domains looked at, least recently used first, for one to forget.
_EVICTION_SCAN = 64

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
    slots: dict[str, DelayRange]  # DOWNLOAD_SLOTS entries with a delay
    slot_concurrency: dict[str, int]  # DOWNLOAD_SLOTS entries with a concurrency
    cap: float
    backoff_codes: frozenset[int]
    backoff_delay: float
    backoff_factor: float
    backoff_recovery: float
    backoff_retries: int
    obey_crawl_delay: bool
    robots_token: str  # the product token Crawl-delay is read for ("*" without robots.txt)
    autothrottle: bool
    autothrottle_start_delay: float
    max_domains: int  # paces kept in memory; idle ones forgotten, least recently used first

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        distribution = get_choice(settings, "POLITE_DELAY_DISTRIBUTION", "uniform", DISTRIBUTIONS)
        cap = get_float(settings, "POLITE_DELAY_MAX", 60.0, minimum=0)
        jitter = _default_jitter(settings)
        if settings.get("POLITE_DELAY") is None:
            # Scrapy's own delay, with its ±DOWNLOAD_DELAY_JITTER, is the default range.
            delay = get_float(settings, "DOWNLOAD_DELAY", 0.0, minimum=0)
            default = DelayRange(delay * (1 - jitter), delay * (1 + jitter), distribution)
        else:
            default = _parse_range("POLITE_DELAY", settings.get("POLITE_DELAY"), distribution)
        domains = []
        for domain, value in get_dict(settings, "POLITE_DELAY_DOMAINS").items():
            name = f"POLITE_DELAY_DOMAINS[{domain!r}]"
            domains.append(
                (str(domain).lower().lstrip("."), _parse_range(name, value, distribution))
            )
        slots, slot_concurrency = _download_slots(settings, jitter, distribution)
        named = [("POLITE_DELAY", default)]
        named += [(f"POLITE_DELAY_DOMAINS[{d!r}]", r) for d, r in domains]
        named += [(f"DOWNLOAD_SLOTS[{k!r}]", r) for k, r in slots.items()]
        for name, delay_range in named:
            if delay_range.high > cap:
                raise PoliteSettingError(
                    "POLITE_DELAY_MAX", cap, f"at least the {name} upper bound ({delay_range.high})"
                )
        obey_crawl_delay = get_bool(settings, "POLITE_OBEY_CRAWL_DELAY", True)
        robots = obey_crawl_delay and get_bool(settings, "ROBOTSTXT_OBEY", False)
        return cls(
            default=default,
            domains=tuple(sorted(domains, key=lambda d: -len(d[0]))),
            slots=slots,
            slot_concurrency=slot_concurrency,
            cap=cap,
            backoff_codes=_status_codes(settings, "POLITE_BACKOFF_HTTP_CODES", [429, 503]),
            backoff_delay=get_float(settings, "POLITE_BACKOFF_DELAY", 1.0, minimum=0),
            backoff_factor=get_float(settings, "POLITE_BACKOFF_FACTOR", 2.0, minimum=1),
            backoff_recovery=get_float(
                settings, "POLITE_BACKOFF_RECOVERY", 0.75, minimum=0, maximum=1
            ),
            backoff_retries=get_int(settings, "POLITE_BACKOFF_RETRIES", 5, minimum=0),
            obey_crawl_delay=obey_crawl_delay,
            robots_token=robots_user_agent(settings)[1] if robots else "*",
            autothrottle=get_bool(settings, "AUTOTHROTTLE_ENABLED", False),
            autothrottle_start_delay=get_float(
                settings, "AUTOTHROTTLE_START_DELAY", 5.0, minimum=0
            ),
            max_domains=get_int(settings, "POLITE_DELAY_MAX_DOMAINS", 10_000, minimum=10),
        )

    def range_for(self, key: str, host: str) -> DelayRange:
        """The range of slot *key* (for *host*): its ``POLITE_DELAY_DOMAINS`` entry
        (or its parent domain's), its ``DOWNLOAD_SLOTS`` delay, or the default."""
        return self.range_and_source(key, host)[0]

    def range_and_source(self, key: str, host: str) -> tuple[DelayRange, str]:
        """:meth:`range_for`, and the name of the setting it comes from."""
        host = host.lower()
        for domain, delay_range in self.domains:
            if host == domain or host.endswith("." + domain):
                return delay_range, "POLITE_DELAY_DOMAINS"
        if key in self.slots:
            return self.slots[key], "DOWNLOAD_SLOTS"
        return self.default, "POLITE_DELAY"


def _default_jitter(settings: BaseSettings) -> float:
    if settings.get("DOWNLOAD_DELAY_JITTER") is not None:
        return get_float(settings, "DOWNLOAD_DELAY_JITTER", 0.5, minimum=0, maximum=1)
    # Scrapy 2.18 has only RANDOMIZE_DOWNLOAD_DELAY (±50 % when on).
    return 0.5 if get_bool(settings, "RANDOMIZE_DOWNLOAD_DELAY", True) else 0.0


def _download_slots(
    settings: BaseSettings, jitter: float, distribution: str
) -> tuple[dict[str, DelayRange], dict[str, int]]:
    """``DOWNLOAD_SLOTS``' delays as ranges (``delay`` ± ``jitter``), and concurrencies."""
    ranges: dict[str, DelayRange] = {}
    concurrency: dict[str, int] = {}
    for key, entry in get_dict(settings, "DOWNLOAD_SLOTS").items():
        name = f"DOWNLOAD_SLOTS[{key!r}]"
        if not isinstance(entry, dict):
            raise PoliteSettingError(name, entry, "a dict of delay, jitter and concurrency")
        if "concurrency" in entry:
            concurrency[key] = int(_number(f"{name}['concurrency']", entry["concurrency"], 1))
        if "delay" not in entry:
            continue
        delay = _number(f"{name}['delay']", entry["delay"], 0)
        if "jitter" in entry:
            slot_jitter = _number(f"{name}['jitter']", entry["jitter"], 0, 1)
        elif "randomize_delay" in entry:
            slot_jitter = 0.5 if entry["randomize_delay"] else 0.0
        else:
            slot_jitter = jitter
        low, high = delay * (1 - slot_jitter), delay * (1 + slot_jitter)
        ranges[key] = DelayRange(low, high, distribution)
    return ranges, concurrency


def _number(name: str, value: Any, minimum: float, maximum: float | None = None) -> float:
    expected = f"a number from {minimum} to {maximum}" if maximum else f"a number >= {minimum}"
    if isinstance(value, bool):
        raise PoliteSettingError(name, value, expected)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PoliteSettingError(name, value, expected) from None
    if not minimum <= number <= (maximum if maximum is not None else math.inf):
        raise PoliteSettingError(name, value, expected)
    return number


def _status_codes(settings: BaseSettings, name: str, default: list[int]) -> frozenset[int]:
    raw = settings.get(name, default)
    expected = "a list of HTTP status codes"
    try:
        codes = frozenset(int(c) for c in as_list(name, raw, expected))
    except (TypeError, ValueError):
        raise PoliteSettingError(name, raw, expected) from None
    if not all(100 <= c <= 999 for c in codes):
        raise PoliteSettingError(name, raw, expected)
    return codes


def _parse_range(name: str, value: Any, distribution: str) -> DelayRange:
    """``2``, ``[2, 5]``, ``"2,5"``, ``"[2, 5]"``, ``"2-5"``, or
    ``{"delay": [2, 5], "distribution": "lognormal"}`` (also as JSON)."""
    expected = "a delay in seconds, a [low, high] pair, or {'delay': ..., 'distribution': ...}"
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise PoliteSettingError(name, value, expected) from None
    if isinstance(value, dict):
        distribution = value.get("distribution", distribution)
        if distribution not in DISTRIBUTIONS:
            raise PoliteSettingError(
                name, value, "a distribution among " + ", ".join(DISTRIBUTIONS)
            )
        value = value.get("delay")
    parts = as_list(name, value, expected)
    if len(parts) == 1:
        parts = parts * 2
    try:
        low, high = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise PoliteSettingError(name, value, expected) from None
    if not 0 <= low <= high or math.isinf(high):
        raise PoliteSettingError(name, value, "0 <= low <= high, in seconds")
    return DelayRange(low, high, distribution)


class _DomainPace:
    """What the crawl has learnt about one domain, and the gaps it draws from it.

    It outlives its download slot. The slot asks :meth:`wait` each time Scrapy
    looks at its queue; the gap is drawn once per departure (when ``lastseen``
    moves), so a queue looked at twice does not re-roll its wait and the gaps
    the site sees follow the configured distribution. A back-off or a new
    Crawl-delay (:meth:`slow_down`) draws the pending gap again at once.
    """

    __slots__ = (
        "_drawn_for",
        "_gap",
        "_opened",
        "_reported",
        "_rng",
        "_stats",
        "backoff",
        "cap",
        "crawl_delay",
        "hold_until",
        "key",
        "last_departure",
        "last_start",
        "ledger",
        "opening",
        "range",
        "range_source",
        "revision",
        "wake",
        "widen",
    )

    def __init__(
        self,
        key: str,
        delay_range: DelayRange,
        cap: float,
        rng: random.Random,
        stats: StatsCollector,
    ) -> None:
        self.key = key
        self.range = delay_range
        self.cap = cap
        self.backoff = 0.0  # extra seconds added to every gap, after 429/503
        self.hold_until = 0.0  # monotonic time (Slot.lastseen's clock) before which nothing leaves
        self.crawl_delay = 0.0  # from robots.txt
        self.last_departure = 0.0  # when the last request left the slot's queue
        self.last_start = 0.0  # when the last download started (closer to the wire)
        self.revision = 0  # bumped when the domain must slow down at once
        self.opening = 0.0  # when the domain's first download started, until it is answered
        self._opened = False
        self._rng = rng
        self._stats = stats
        self._drawn_for = (-1.0, -1)
        self._gap = 0.0
        self._reported: float | None = None
        self.widen = 1.0  # gaps times this: the live workers, while a cluster paces alone
        self.wake: Callable[[], None] = _nothing  # wakes the domain's slot (set with it)
        self.ledger: Ledger | None = None  # the politeness report's, when it runs
        self.range_source = "POLITE_DELAY"  # the setting the range comes from

    def floor(self) -> float:
        return max(self.range.low, self.crawl_delay)

    def idle(self, now: float) -> bool:
        """Whether forgetting this domain now loses nothing: no back-off, hold nor
        Crawl-delay learnt, no first download out, and its last download longer ago
        than the longest gap (``POLITE_DELAY_MAX``), so a new pace cannot come sooner."""
        return (
            not self.backoff
            and not self.crawl_delay
            and not self.opening
            and self.hold_until <= now
            and now - max(self.last_start, self.last_departure) > self.cap
        )

    def slow_down(self) -> None:
        """Make the next gap be drawn again, with what was just learnt."""
        self.revision += 1

    def wait(self, lastseen: float, slot_delay: float, ready: bool = True) -> float:
        opening = self._opening_wait(lastseen)
        if opening is not None:
            return opening
        if self._drawn_for != (lastseen, self.revision):
            self._drawn_for = (lastseen, self.revision)
            self.last_departure = lastseen
            self._gap = self._draw(slot_delay)
        hold = self.hold_until - lastseen
        if self._gap <= 0:
            return hold if hold > 0 else 0.0
        # Count the gap from when the last download really started, not from when
        # it left the queue: on a busy machine the two can be far apart, and the
        # site sees the former.
        started_late = max(0.0, self.last_start - lastseen)
        return max(self._gap + started_late, hold)

    def started(self, now: float) -> None:
        self.last_start = now
        if not self._opened and not self.opening:
            self.opening = now
        if self.ledger is not None:
            account = self.ledger.account(self.key)
            if account.configured_gap is None:  # a new account (or one folded away)
                account.configured_gap = (self.range.low + self.range.high) / 2
                account.delay_source = account.delay_source or self.range_source
            account.departed(time.time())

    def opened(self, now: float) -> None:
        """A download of the domain ended (answered or failed).

        The first one opened a connection, so it may have reached the site long
        after it started; the gap after it counts from its answer, which came
        after the site saw it. Later requests reuse the connection.
        """
        if self.opening:
            self.opening = 0.0
            self._opened = True
            self.last_start = max(self.last_start, now)
            self.wake()

    def _opening_wait(self, lastseen: float) -> float | None:
        """While the first download is out: the wait until it is answered (or given up on)."""
        if not self.opening:
            return None
        if monotonic() - self.opening >= _OPENING_MAX:
            self.opening, self._opened = 0.0, True  # a slow site: pace from the start
            return None
        return self.opening + _OPENING_MAX - lastseen

    def _draw(self, slot_delay: float) -> float:
        floor = self.floor()
        if floor >= self.range.high and not self.backoff and not slot_delay:
            gap = min(floor * self.widen, self.cap)  # a fixed gap (0 included): nothing to draw
        else:
            # AutoThrottle's slot delay can raise a gap, never lower it.
            gap = max(self.range.raised_to(floor).draw(self._rng), slot_delay) + self.backoff
            gap = min(max(gap, floor) * self.widen, self.cap)
        if gap != self._reported:  # a stat write per departure would cost the crawl
            self._reported = gap
            self._stats.set_value(f"polite/delay/current/{self.key}", round(gap, 3))
            if self.ledger is not None:
                self.ledger.account(self.key).delay_source = self._source(slot_delay)
        return gap

    def _source(self, slot_delay: float) -> str:
        """Where the current gap comes from, for the politeness report."""
        if self.backoff:
            return "back-off"
        if self.crawl_delay > self.range.low:
            return "Crawl-delay"
        if slot_delay > self.range.high:
            return "AutoThrottle"
        return self.range_source


class _SharedDomainPace(_DomainPace):
    """A domain's pace in cluster mode: each departure is a turn given by Redis.

    When its slot has a request ready, :meth:`wait` parks the slot and asks
    :class:`~scrapy_polite.cluster.SharedPace` for the domain's turn (one
    atomic script on the Redis server's clock). Redis gives a domain one turn
    at a time, and counts the next turn's gap from when the worker holding the
    turn reports its departure: a worker that left late, or heard late, cannot
    bring the next request closer. While another worker holds the turn, this
    one asks again just after that departure is due. A turn more than
    ``_CONFIRM_AHEAD`` seconds ahead is confirmed just before it is used, so a
    ``Retry-After`` another worker learnt meanwhile still holds it back. While
    Redis is unreachable the domain is paced here alone, gaps times the live
    workers last seen.
    """

    __slots__ = (
        "_alone_until",
        "_asking",
        "_busy",
        "_confirm",
        "_due",
        "_grant",
        "_grant_at",
        "_grant_for",
        "_learnt",
        "_poll",
        "_retry_interval",
        "_shared",
        "_turn",
        "_unreported",
    )

    def __init__(
        self,
        key: str,
        delay_range: DelayRange,
        cap: float,
        rng: random.Random,
        stats: StatsCollector,
        shared: SharedPace,
        learnt: Callable[[_DomainPace], None],
        retry_interval: float,
    ) -> None:
        super().__init__(key, delay_range, cap, rng, stats)
        self._shared = shared
        self._learnt = learnt  # tells the middleware the domain backs off
        self._retry_interval = retry_interval
        self._asking = False  # a turn is being asked for (or will be, after a busy reply)
        self._busy = 0  # busy replies in a row whose departure was already due
        self._grant_for: float | None = None  # the slot's lastseen the turn is for
        self._grant_at = 0.0  # when the turn's request leaves
        self._due = 0.0  # when the turn was due, at the earliest (see Grant.due)
        self._grant: Grant | None = None  # the last turn
        self._unreported = False  # its departure has not been reported yet
        self._alone_until = 0.0
        self._confirm: CallLaterResult | None = None
        self._poll: CallLaterResult | None = None
        # This worker's turns of the domain, numbered: a turn not yet used (voided)
        # is asked for again under its number, so Redis replaces it.
        self._turn = 0

    def wait(self, lastseen: float, slot_delay: float, ready: bool = True) -> float:
        opening = self._opening_wait(lastseen)
        if opening is not None:
            return opening
        if monotonic() < self._alone_until:
            self.widen = float(self._shared.workers)
            return super().wait(lastseen, slot_delay, ready)
        hold = self.hold_until - lastseen
        if self._grant_for == lastseen:
            return max(self._grant_at - lastseen, hold, _TINY)
        if not ready:
            return 0.0  # nothing can leave: no turn for nothing
        if not self._asking:
            self._asking = True
            floor = self.floor()
            gap = max(self.range.raised_to(floor).draw(self._rng), slot_delay, floor)
            # A little more than drawn: a request can take a few ms more to reach
            # the site from one worker than the next one does from another.
            gap += min(_MARGIN_MAX, max(_MARGIN_MIN, _MARGIN_SHARE * gap)) if gap else 0.0
            self._ask(lastseen, gap)
        return monotonic() - lastseen + _PARKED  # counted from lastseen, like every wait

    def idle(self, now: float) -> bool:
        # A turn asked for, held or not yet reported belongs to Redis's account of the domain.
        return (
            super().idle(now)
            and not self._asking
            and not self._unreported
            and self._poll is None
            and self._confirm is None
        )

    def void(self) -> None:
        """Forget the turn (the domain must slow down): ask again, for a new one."""
        self._grant_for = None
        self._cancel(self._confirm)
        self._confirm = None
        self.wake()

    def _ask(self, lastseen: float, gap: float) -> None:
        self._poll = None
        _spawn(self._reserve(lastseen, gap), f"reserving a departure to {self.key}")

    async def _reserve(self, lastseen: float, gap: float) -> None:
        try:
            reply = await self._shared.reserve(self.key, gap, self.cap, self._turn)
        except RedisUnavailable:
            self._asking = False
            self._alone(lastseen)
            return
        self._learn(reply.backoff, reply.crawl_delay)
        if isinstance(reply, Busy):
            # Another worker's turn: ask again just after its departure is due, then
            # more and more slowly while its report does not come.
            self._stats.inc_value("polite/cluster/busy")
            if reply.due_in > 0:
                self._busy, after = 0, reply.due_in + _POLL
            else:
                self._busy += 1
                after = min(_POLL * 2**self._busy, _POLL_MAX)
            self._poll = call_later(after, self._ask, lastseen, gap)
            return
        self._asking = False
        self._busy = 0
        now = monotonic()
        # Never closer than the floor to this worker's own last departure either
        # (it paced alone a moment ago, or Redis lost its state).
        last = max(lastseen, self.last_start)  # when this worker's last request left
        own = last + self.floor() if last else 0.0
        self._grant_at = max(now + reply.wait, own)
        self._due = reply.due
        self._grant_for = lastseen
        self._grant = reply
        self._unreported = True  # a new turn is asked for once this one is reported
        self._stats.inc_value("polite/cluster/reserved")
        if self._grant_at - now > _CONFIRM_AHEAD:
            self._cancel(self._confirm)
            self._confirm = call_later(
                self._grant_at - now - _CONFIRM_AHEAD, self._confirm_later, lastseen
            )
        self.wake()

    def _learn(self, backoff: float, crawl_delay: float) -> None:
        if crawl_delay > self.crawl_delay:
            self.crawl_delay = crawl_delay
        if backoff != self.backoff:
            self.backoff = backoff
            self._learnt(self)

    def _confirm_later(self, lastseen: float) -> None:
        self._confirm = None
        _spawn(self._confirm_grant(lastseen), f"confirming a departure to {self.key}")

    async def _confirm_grant(self, lastseen: float) -> None:
        grant = self._grant
        if grant is None:
            return
        try:
            shift = await self._shared.confirm(self.key, grant)
        except RedisUnavailable:
            return  # keep the turn: Redis can hold nothing back now
        if shift > 0 and self._grant_for == lastseen:
            self._stats.inc_value("polite/cluster/shifted")
            self._grant_at += shift
            self._due += shift
            self.wake()

    def started(self, now: float) -> None:
        super().started(now)
        grant = self._grant
        if not self._unreported or grant is None:
            return
        self._unreported = False
        self._turn += 1
        if now - self._due > _LATE:
            self._stats.inc_value("polite/cluster/late")
        if self.opening == now:
            return  # the first request: its departure is reported when it is answered
        self._report(grant)

    def opened(self, now: float) -> None:
        first = bool(self.opening)
        super().opened(now)
        if first and self._grant is not None and not self._unreported:
            self._report(self._grant)

    def _report(self, grant: Grant) -> None:
        # The next turn, this worker's or another's, counts its gap from this report.
        report = self._shared.departed(self.key, grant)
        _spawn(_shared_call(report), f"reporting a departure to {self.key}")

    async def close(self) -> None:
        """The worker stops: ask for nothing more, and give back a turn it did not use."""
        for call in (self._poll, self._confirm):
            self._cancel(call)
        self._poll = self._confirm = None
        self._grant_for = None
        if self._unreported and self._grant is not None:
            self._unreported = False
            await self._shared.give_back(self.key, self._grant)

    def _alone(self, lastseen: float) -> None:
        if monotonic() >= self._alone_until:
            self._stats.inc_value("polite/cluster/alone")
        self._alone_until = monotonic() + self._retry_interval
        self._drawn_for = (-1.0, -1)  # draw this departure's gap again, widened
        self.wake()

    @staticmethod
    def _cancel(call: CallLaterResult | None) -> None:
        if call is not None:
            call.cancel()


# A domain's first download holds the next one until it is answered, at most this long.
_OPENING_MAX = 5.0
# A slot waiting for Redis's answer parks this long; the answer wakes it sooner.
_PARKED = 60.0
# A positive wait: Scrapy starts one request per wake-up only while the wait is non-zero.
_TINY = 1e-6
# A turn further ahead than this is confirmed this long before it is used.
_CONFIRM_AHEAD = 0.015
# The margin added to each gap reserved in cluster mode: 1 % of it, 3 to 10 ms.
_MARGIN_SHARE, _MARGIN_MIN, _MARGIN_MAX = 0.01, 0.003, 0.01
# A departure this much later than due is counted late (stats only: it is reported anyway).
_LATE = 0.002
# While another worker holds the turn: ask again this long after its departure is due,
# then twice as long each time its report is still missing, up to _POLL_MAX.
_POLL, _POLL_MAX = 0.005, 0.1


def _nothing() -> None:
    pass


def _spawn(coro: Coroutine[Any, Any, None], what: str) -> None:
    deferred_from_coro(coro).addErrback(
        lambda failure: logger.error("Failed %s", what, exc_info=failure.value)
    )


class PoliteDelayMiddleware:
    """Downloader middleware that spaces the requests to each domain politely.

    - ``process_request`` makes sure the request's download slot is paced by
      its domain's :class:`_DomainPace`; the slot does the waiting.
    - ``process_response`` backs off on ``POLITE_BACKOFF_HTTP_CODES`` (429 and
      503): it holds the domain for ``Retry-After``, raises the domain's extra
      delay, and retries the request; later successes shrink the extra delay.
    - On ``robots_parsed`` (sent by Scrapy's robots.txt middleware and by
      scrapy-polite's), a ``Crawl-delay`` raises the domain's floor.
    """

    def __init__(self, crawler: Crawler) -> None:
        if not get_bool(crawler.settings, "POLITE_DELAY_ENABLED", True):
            raise NotConfigured("POLITE_DELAY_ENABLED is off")
        assert crawler.stats is not None
        self.crawler = crawler
        self.config = DelayConfig.from_settings(crawler.settings)
        self._stats = crawler.stats
        self._rng = random.Random()
        self._domains: OrderedDict[str, _DomainPace] = OrderedDict()  # least recently used first
        self._backed_off: dict[str, _DomainPace] = {}  # domains with an extra delay
        self._shared: SharedPace | None = None
        # The politeness report's ledger, when the report runs.
        self._ledger = ledger(crawler) if report_enabled(crawler.settings) else None
        if cluster_enabled(crawler.settings):
            verify_redis(crawler.settings, "POLITE_CLUSTER_REDIS_URL")
            self._shared = SharedPace(crawler, ClusterConfig.from_settings(crawler.settings))
            crawler.signals.connect(self._joined, signal=signals.spider_opened)
            crawler.signals.connect(self._leave, signal=signals.spider_closed)
        crawler.signals.connect(self._robots_parsed, signal=signals.robots_parsed)
        crawler.signals.connect(self._left_downloader, signal=signals.request_left_downloader)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- requests -----------------------------------------------------------------
    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        assert self.crawler.engine is not None
        downloader = self.crawler.engine.downloader
        key = downloader.get_slot_key(request)
        if not key or has_slot(downloader, key):  # host-less URLs have no site to spare
            return
        concurrency = self.config.slot_concurrency.get(
            key, downloader.ip_concurrency or downloader.domain_concurrency
        )
        start = self.config.autothrottle_start_delay if self.config.autothrottle else 0.0
        pace = self._pace(key, request)
        pace.wake = install_slot(downloader, key, PacedSlot(concurrency, pace, start))

    def _pace(self, key: str, request: Request) -> _DomainPace:
        pace = self._domains.get(key)
        if pace is not None:
            self._domains.move_to_end(key)
        else:
            host = urlparse_cached(request).hostname or key
            delay_range, source = self.config.range_and_source(key, host)
            if self._shared is None:
                pace = _DomainPace(key, delay_range, self.config.cap, self._rng, self._stats)
            else:
                pace = _SharedDomainPace(
                    key,
                    delay_range,
                    self.config.cap,
                    self._rng,
                    self._stats,
                    self._shared,
                    self._backing_off,
                    self._shared.retry_interval,
                )
            pace.range_source = source
            if self._ledger is not None:
                pace.ledger = self._ledger
            self._domains[key] = pace
            if len(self._domains) > self.config.max_domains:
                self._evict()
        return pace

    def _evict(self) -> None:
        """Forget the least recently used domain whose slot is gone and whose pace is idle."""
        assert self.crawler.engine is not None
        downloader = self.crawler.engine.downloader
        now = monotonic()
        for key in itertools.islice(self._domains, _EVICTION_SCAN):
            pace = self._domains[key]
            if has_slot(downloader, key) or not pace.idle(now):
                continue
            del self._domains[key]
            self._stats.inc_value("polite/delay/evicted")
            return

    def _backing_off(self, pace: _DomainPace) -> None:
        if pace.backoff:
            self._backed_off[pace.key] = pace
        else:
            self._backed_off.pop(pace.key, None)

    # -- responses ----------------------------------------------------------------
    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        if self._ledger is not None:
            self._count(request, response)
        if response.status not in self.config.backoff_codes:
            if self._backed_off and "cached" not in response.flags:
                self._recover(request)
            return response
        if "cached" in response.flags or not urlparse_cached(request).hostname:
            return response
        assert self.crawler.engine is not None
        pace = self._pace(self.crawler.engine.downloader.get_slot_key(request), request)
        self._back_off(pace, response)
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

    def _count(self, request: Request, response: Response) -> None:
        """For the politeness report: every answer, before a retry can hide it."""
        if not urlparse_cached(request).hostname:
            return
        assert self._ledger is not None
        assert self.crawler.engine is not None
        account = self._ledger.account(self.crawler.engine.downloader.get_slot_key(request))
        if "cached" in response.flags:
            account.cache_hits += 1
        else:
            account.responses[f"{response.status // 100}xx"] += 1

    def _left_downloader(self, request: Request, spider: Spider | None = None) -> None:
        assert self.crawler.engine is not None
        pace = self._domains.get(self.crawler.engine.downloader.get_slot_key(request))
        if pace is not None and pace.opening:
            pace.opened(monotonic())

    def _recover(self, request: Request) -> None:
        """A success shrinks the domain's extra delay."""
        assert self.crawler.engine is not None
        pace = self._backed_off.get(self.crawler.engine.downloader.get_slot_key(request))
        if pace is None:
            return
        pace.backoff *= self.config.backoff_recovery
        if pace.backoff < _NEGLIGIBLE:
            pace.backoff = 0.0
            del self._backed_off[pace.key]
        if self._shared is not None:
            recover = self._shared.recover(pace.key, self.config.backoff_recovery)
            _spawn(_shared_call(recover), f"sharing a recovery of {pace.key}")

    def _back_off(self, pace: _DomainPace, response: Response) -> None:
        retry_after = _retry_after(response.headers.get(b"Retry-After"))
        cap = self.config.cap
        if retry_after is not None and retry_after > cap:
            logger.warning(
                "%s asked for Retry-After %.0f s; waiting POLITE_DELAY_MAX (%.0f s) instead",
                pace.key,
                retry_after,
                cap,
            )
            retry_after = cap
        pace.backoff = min(
            cap,
            max(pace.backoff * self.config.backoff_factor, self.config.backoff_delay),
        )
        if pace.backoff:
            self._backed_off[pace.key] = pace
        if retry_after:
            pace.hold_until = max(pace.hold_until, monotonic() + retry_after)
        pace.slow_down()
        if self._shared is not None and isinstance(pace, _SharedDomainPace):
            c = self.config
            back_off = self._shared.back_off(
                pace.key, c.backoff_delay, c.backoff_factor, cap, retry_after or 0.0
            )
            _spawn(_shared_call(back_off), f"sharing a back-off of {pace.key}")
            pace.void()
        if pace.ledger is not None:
            account = pace.ledger.account(pace.key)
            account.backoff_answers += 1
            if retry_after:
                account.waits.append(retry_after)
        self._stats.inc_value("polite/delay/backoff")
        self._stats.inc_value(f"polite/delay/backoff/{pace.key}")
        self._stats.set_value(f"polite/delay/extra/{pace.key}", round(pace.backoff, 3))
        logger.info(
            "%s answered %d: backing off (extra delay %.2f s%s)",
            pace.key,
            response.status,
            pace.backoff,
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
            seconds = crawl_delay(self.config.robots_token)
        except Exception:  # a third-party parser without Crawl-delay support
            logger.debug("%r cannot report Crawl-delay", robotparser, exc_info=True)
            return
        if not seconds:
            return
        seconds = float(seconds)
        assert self.crawler.engine is not None
        pace = self._pace(self.crawler.engine.downloader.get_slot_key(request), request)
        if seconds > self.config.cap:
            logger.warning(
                "%s asks for Crawl-delay %.1f s; using POLITE_DELAY_MAX (%.1f s) instead",
                pace.key,
                seconds,
                self.config.cap,
            )
            seconds = self.config.cap
        pace.crawl_delay = seconds
        pace.slow_down()
        if self._shared is not None:
            share = self._shared.set_crawl_delay(pace.key, seconds)
            _spawn(_shared_call(share), f"sharing the Crawl-delay of {pace.key}")
        # The gap after the robots.txt request was drawn when it left, under the old
        # floor: hold the domain for the new floor from the moment it is known.
        pace.hold_until = max(pace.hold_until, monotonic() + seconds)
        self._stats.set_value(f"polite/delay/crawl_delay/{pace.key}", seconds)
        logger.info("%s: Crawl-delay %.2f s is now its delay floor", pace.key, seconds)

    # -- cluster ---------------------------------------------------------------------
    def _joined(self, spider: Spider | None = None) -> None:
        shared = self._shared
        assert shared is not None
        logger.info(
            "Cluster mode: pacing every domain with the other workers through Redis at %s "
            "(worker %s)",
            shared.shown_url,
            shared.worker,
        )

    async def _leave(self, spider: Spider | None = None) -> None:
        shared = self._shared
        assert shared is not None
        paces = [p for p in self._domains.values() if isinstance(p, _SharedDomainPace)]
        with contextlib.suppress(RedisUnavailable):
            for pace in paces:
                await pace.close()
        await shared.leave()
        shared.release()


async def _shared_call(call: Coroutine[Any, Any, Any]) -> None:
    """Run a call to the shared pace whose failure the Redis layer already reported."""
    with contextlib.suppress(RedisUnavailable):
        await call


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
