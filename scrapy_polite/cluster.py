"""A scrapy-redis cluster that looks, from each site, like one polite client.

Cluster mode is on when scrapy-redis's scheduler is configured and a Redis URL
is known (``POLITE_CLUSTER = "auto"``, the default), or when
``POLITE_CLUSTER = True``. Then, on the Redis that scrapy-polite uses:

- **Shared pace** (:class:`SharedPace`). Each domain has one hash,
  ``polite:{domain}:pace``: its floor (the earliest next departure), the turn
  in progress, the hold of a ``Retry-After``, the back-off's extra delay and
  the ``Crawl-delay``, all in microseconds of the Redis server's clock (workers
  on different machines disagree on the time; one server's clock does not). A
  domain has one turn at a time: before a request leaves its download slot, the
  worker takes the domain's turn with one atomic script (the departure is the
  later of now, the floor and the hold), and reports the departure once the
  request has left; the floor then moves one gap (drawn by that worker, from
  the domain's range and distribution) past the report. So the gaps between two
  requests to a domain hold across every worker, whatever their number, and
  a late answer or a late departure never brings the next request closer.
- **Shared signals.** A ``Crawl-delay``, a 429/503 and its ``Retry-After``
  are written to the domain's hash by the worker that learns them, and count
  in every worker's next reservation; successes shrink the back-off for all.
- **Workers.** Each worker renews its entry in ``polite:cluster:<spider>:workers``
  (a sorted set of expiry times). While Redis is unreachable a worker paces each
  domain alone, its gaps widened by the number of live workers it last saw, so
  the site still sees about the configured rate; it rejoins the shared pace when
  Redis answers.
- **A domain-aware queue** (:class:`DomainQueue`, scrapy-redis's
  ``SCHEDULER_QUEUE_CLASS``). One queue per domain, and a sorted set of domains
  by when each may next be handed out, so a worker is handed the requests of
  domains that are ready, not a backlog parked behind a slow one. Every request
  handed out is leased to its worker until the engine is done with it (its
  callback finished and what it produced pushed, or dropped on the way); a
  worker that stops hands back what it did not finish, and the leases of a
  worker that died return to the queue once it has missed
  ``POLITE_CLUSTER_LEASE`` seconds of heartbeats (:class:`Heartbeat`, a timer
  of its own). Entries that cannot be trusted are quarantined, never run.
- **No pickle.** :mod:`scrapy_polite.serializer` stores requests as JSON.

The add-on places the queue and the serializer unless you chose your own, and
sets ``SCHEDULER_PERSIST = True`` (with ``False`` the first worker to finish
would flush the others' queue).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from scrapy import signals
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.misc import load_object
from scrapy.utils.request import request_from_dict

from scrapy_polite._redis import (
    Command,
    RedisLink,
    RedisUnavailable,
    domain_key,
    redis_url,
    required_redis_url,
)
from scrapy_polite._scrapy_internals import requests_in_progress
from scrapy_polite._settings import PoliteSettingError, get_float

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

__all__ = [
    "SCRAPY_REDIS_SCHEDULER",
    "Busy",
    "ClusterConfig",
    "DomainQueue",
    "DupeFilter",
    "Grant",
    "Heartbeat",
    "SharedPace",
    "cluster_enabled",
    "dead_letter_key",
    "encode_request",
    "queue_key",
    "trusted_request",
    "worker_id",
    "workers_key",
]

logger = logging.getLogger(__name__)

COMPONENT = "cluster"
QUEUE = "queue"
_LEASE = "_polite_lease"  # meta key: the lease of a request handed out by the queue
SCRAPY_REDIS_SCHEDULER = "scrapy_redis.scheduler.Scheduler"
URL_SETTING = "POLITE_CLUSTER_REDIS_URL"
_US = 1_000_000
# A turn not reported as departed within this many seconds of its start was lost (its
# worker died, or dropped the request): the next worker may take the domain's turn.
_TURN_LEASE = 5.0

# -- settings ---------------------------------------------------------------------------


def cluster_enabled(settings: BaseSettings) -> bool:
    """Whether cluster mode is on (``POLITE_CLUSTER``: ``"auto"``, true or false)."""
    raw = settings.get("POLITE_CLUSTER", "auto")
    if raw == "auto" or raw is None:
        scheduler = settings.get("SCHEDULER")
        path = scheduler if isinstance(scheduler, str) else _path(scheduler)
        return path == SCRAPY_REDIS_SCHEDULER and redis_url(settings, URL_SETTING) is not None
    try:
        return settings.getbool("POLITE_CLUSTER")
    except ValueError:
        raise PoliteSettingError("POLITE_CLUSTER", raw, '"auto", true or false') from None


@dataclass(frozen=True)
class ClusterConfig:
    """Every setting of cluster mode, read and validated once."""

    url: str
    lease: float  # seconds a worker's heartbeat (and its leases) lasts
    heartbeat: float  # seconds between two heartbeats

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        url = required_redis_url(settings, URL_SETTING, "cluster mode")
        lease = get_float(settings, "POLITE_CLUSTER_LEASE", 30.0, minimum=1, maximum=86400)
        # Heartbeats at least every second: a worker alone during an outage widens its gaps
        # by the live workers it last counted, so the count must be fresh.
        return cls(url=url, lease=lease, heartbeat=min(lease / 3, 1.0))


# -- the shared pace --------------------------------------------------------------------

# Times are microseconds of the Redis server's clock; gaps and delays microseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""
# A domain has one turn at a time: the reservation of its next departure, held by the
# worker it was given to until that worker reports the departure (or the turn's lease
# ends: a lost worker). The next turn counts its gap from the reported departure, so
# a worker that left late, or whose reply came late, never brings the next one closer.
# KEYS: the pace hash; ARGV: gap (us), cap (us), ttl (ms), worker, turn lease (us).
# Returns {wait, backoff, crawl_delay, start, gap}, or {-1, backoff, crawl_delay,
# due in (us), 0} while another worker holds the turn.
_RESERVE = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'floor', 'hold', 'backoff', 'crawl_delay',
  'turn', 'turn_start', 'turn_until', 'turn_gap')
local floor, hold = tonumber(f[1]) or 0, tonumber(f[2]) or 0
local backoff, cd = tonumber(f[3]) or 0, tonumber(f[4]) or 0
local turn_start = tonumber(f[6]) or 0
if f[5] and f[5] ~= ARGV[4] then
  if now < (tonumber(f[7]) or 0) then return {-1, backoff, cd, turn_start - now, 0} end
  floor = math.max(floor, turn_start + (tonumber(f[8]) or 0))  -- a lost turn: say it left
end
local gap = math.min(math.max(tonumber(ARGV[1]), cd) + backoff, tonumber(ARGV[2]))
local start = math.max(now, floor, hold)
redis.call('HSET', KEYS[1], 'floor', floor, 'turn', ARGV[4], 'turn_start', start,
  'turn_until', start + tonumber(ARGV[5]), 'turn_gap', gap, 'next', start + gap, 'gap', gap)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {start - now, backoff, cd, start, gap}
"""
)
_BACK_OFF = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'backoff', 'hold')
local backoff = math.max((tonumber(f[1]) or 0) * tonumber(ARGV[2]), tonumber(ARGV[1]))
backoff = math.min(backoff, tonumber(ARGV[3]))
local hold = math.max(tonumber(f[2]) or 0, now + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'backoff', backoff, 'hold', hold)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return backoff
"""
)
# Just before a reserved departure: the later of any hold (Retry-After) and the floor;
# if that is past the reserved start, the turn moves there. ARGV: start (us), worker.
_CONFIRM = """
local f = redis.call('HMGET', KEYS[1], 'hold', 'floor', 'turn', 'turn_gap', 'turn_until')
local start = tonumber(ARGV[1])
local shift = math.max(0, math.max(tonumber(f[1]) or 0, tonumber(f[2]) or 0) - start)
if shift > 0 and f[3] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'turn_start', start + shift, 'next',
    start + shift + (tonumber(f[4]) or 0), 'turn_until', (tonumber(f[5]) or 0) + shift)
end
return shift
"""
# The turn's request left: the next turn starts one gap after now (the report comes
# after the departure, never before). ARGV: gap (us), worker.
_DEPARTED = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'floor', 'next', 'turn')
local after = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'floor', math.max(tonumber(f[1]) or 0, after),
  'next', math.max(tonumber(f[2]) or 0, after))
if f[3] == ARGV[2] then redis.call('HDEL', KEYS[1], 'turn', 'turn_start', 'turn_until') end
return 1
"""
)
# The worker stops with a turn it did not use: the next worker need not wait for it.
_GIVE_BACK = """
if redis.call('HGET', KEYS[1], 'turn') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'turn', 'turn_start', 'turn_until')
  redis.call('HSET', KEYS[1], 'next', redis.call('HGET', KEYS[1], 'floor') or 0)
end
return 1
"""
_RECOVER = """
local backoff = (tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0) * tonumber(ARGV[1])
if backoff < 1000 then backoff = 0 end
redis.call('HSET', KEYS[1], 'backoff', backoff)
return backoff
"""
_CRAWL_DELAY = (
    _NOW
    + """
local cd = tonumber(ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'next', 'floor')
redis.call('HSET', KEYS[1], 'crawl_delay', cd, 'next', math.max(tonumber(f[1]) or 0, now + cd),
  'floor', math.max(tonumber(f[2]) or 0, now + cd))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return cd
"""
)
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
-- Expired workers stay listed until the queue has put their leases back.
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
"""
)


@dataclass(frozen=True)
class Grant:
    """A domain's turn: leave in ``wait`` seconds; what the domain's hash said.

    ``due`` is when the departure was due on this worker's clock: the script ran
    no sooner than half the fastest round trip after the request.
    """

    wait: float
    due: float  # time.monotonic() of the reserved departure, at the earliest
    backoff: float
    crawl_delay: float
    start_us: int  # the departure on the Redis server's clock
    gap_us: int  # the gap it holds before the next one
    turn: int  # this worker's number for the turn


@dataclass(frozen=True)
class Busy:
    """Another worker holds the domain's turn; its departure is due in ``due_in`` s."""

    due_in: float
    backoff: float
    crawl_delay: float


class SharedPace:
    """The cluster's pace of every domain, in Redis; one per crawler.

    Every method may raise :class:`~scrapy_polite._redis.RedisUnavailable`:
    the caller then paces the domain alone (:attr:`workers` wide).
    """

    def __init__(self, crawler: Crawler, config: ClusterConfig) -> None:
        self.config = config
        self.worker = worker_id(crawler)
        self._link = RedisLink.open(
            crawler,
            config.url,
            COMPONENT,
            "each worker paces its domains alone, its gaps widened by the live workers",
        )
        self._heartbeat = Heartbeat.join(crawler, config)
        self._ttl_ms = int(max(3600.0, 10 * config.lease) * 1000)  # idle domains expire
        self._stats = crawler.stats
        self._latencies: deque[float] = deque(maxlen=100_000)  # of reservations, seconds
        self._fastest = 0.0  # the fastest reservation's round trip, once there is one
        self.retry_interval = self._link.retry_interval
        self.shown_url = self._link.shown_url

    async def reserve(self, domain: str, gap: float, cap: float, turn: int) -> Grant | Busy:
        """Take the domain's turn, *gap* (seconds) before the next one; or learn it is taken.

        *turn* numbers this worker's turns of the domain: asking again with the
        number of a turn not yet used replaces it (the domain had to slow down).
        """
        asked = monotonic()
        wait, backoff, crawl_delay, start, gap_us = await self._script(
            _RESERVE,
            domain,
            int(gap * _US),
            int(cap * _US),
            self._ttl_ms,
            f"{self.worker}#{turn}",
            int(_TURN_LEASE * _US),
        )
        took = monotonic() - asked
        self._latencies.append(took)
        self._fastest = min(self._fastest, took) if self._fastest else took
        if int(wait) < 0:
            return Busy(int(start) / _US, int(backoff) / _US, int(crawl_delay) / _US)
        wait_s = int(wait) / _US
        return Grant(
            wait_s,
            asked + self._fastest / 2 + wait_s,
            int(backoff) / _US,
            int(crawl_delay) / _US,
            int(start),
            int(gap_us),
            turn,
        )

    async def confirm(self, domain: str, grant: Grant) -> float:
        """Seconds the turn's departure must move (a hold learnt since it was given)."""
        token = f"{self.worker}#{grant.turn}"
        return int(await self._script(_CONFIRM, domain, grant.start_us, token)) / _US

    async def departed(self, domain: str, grant: Grant) -> None:
        """The turn's request left: the next turn is its gap from now."""
        await self._script(_DEPARTED, domain, grant.gap_us, f"{self.worker}#{grant.turn}")

    async def give_back(self, domain: str, grant: Grant) -> None:
        """This worker's turn of *domain* will not be used: free it for the others."""
        await self._script(_GIVE_BACK, domain, f"{self.worker}#{grant.turn}")

    async def back_off(
        self, domain: str, base: float, factor: float, cap: float, retry_after: float
    ) -> float:
        """A slow-down answer: grow the domain's back-off, hold it for *retry_after*."""
        backoff = await self._script(
            _BACK_OFF,
            domain,
            int(base * _US),
            factor,
            int(cap * _US),
            int(retry_after * _US),
            self._ttl_ms,
        )
        return int(backoff) / _US

    async def recover(self, domain: str, recovery: float) -> float:
        """A success: shrink the domain's back-off."""
        return int(await self._script(_RECOVER, domain, recovery)) / _US

    async def set_crawl_delay(self, domain: str, seconds: float) -> None:
        """robots.txt's ``Crawl-delay``: a floor for every worker, from now on."""
        await self._script(_CRAWL_DELAY, domain, int(seconds * _US), self._ttl_ms)

    @property
    def workers(self) -> int:
        """Live workers at the last heartbeat, this one included."""
        return self._heartbeat.workers

    async def leave(self) -> None:
        """This worker stops pacing (the heartbeat's last user counts it out)."""
        await self._heartbeat.leave()

    def release(self) -> None:
        """Report the reservations' latency in stats, and give the Redis link back."""
        if self._latencies and self._stats is not None:
            ordered = sorted(self._latencies)
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
                self._stats.set_value(f"polite/cluster/reserve_ms_{name}", round(value, 3))
        self._link.release()

    async def _script(self, script: str, domain: str, *args: Any) -> Any:
        (reply,) = await self._link.call(
            COMPONENT, ("EVAL", script, 1, domain_key(domain, "pace"), *args)
        )
        if isinstance(reply, Exception):  # a script error: nothing to share through
            raise RedisUnavailable(f"cluster script failed: {reply}")
        if self._stats is not None:
            self._stats.inc_value("polite/cluster/redis_calls")
        return reply


# -- this worker's membership ------------------------------------------------------------

_HEARTBEAT_ATTRIBUTE = "_scrapy_polite_heartbeat"


class Heartbeat:
    """This worker's entry in the crawl's workers set, renewed on a timer of its own.

    One per crawler, shared by the shared pace and the queue (:meth:`join`).
    It beats every ``heartbeat`` seconds whatever the engine does: a worker
    whose downloader stays full, or that runs without the delay middleware, is
    never taken for dead while it lives. Each beat also runs the *riders*
    (the queue's acknowledgements and its look for dead workers' leases), so
    they cost no round trip of their own per page.
    """

    def __init__(self, crawler: Crawler, config: ClusterConfig) -> None:
        self.worker = worker_id(crawler)
        self.workers = 1  # live workers last seen, this one included
        self.interval = config.heartbeat
        self._lease_us = int(config.lease * _US)
        self._link = RedisLink.open(
            crawler,
            config.url,
            COMPONENT,
            "each worker paces its domains alone, its gaps widened by the live workers",
        )
        self._key = workers_key(crawler.settings, crawler.spidercls.name)
        self._stats = crawler.stats
        self._riders: list[Callable[[], Awaitable[None]]] = []
        self._timer: Any = None
        self._beating = False
        self._users = 0
        crawler.signals.connect(self._start, signal=signals.spider_opened)

    @classmethod
    def join(cls, crawler: Crawler, config: ClusterConfig) -> Heartbeat:
        """The crawler's heartbeat; every :meth:`join` is matched by one :meth:`leave`."""
        beat: Heartbeat | None = crawler.__dict__.get(_HEARTBEAT_ATTRIBUTE)
        if beat is None:
            beat = crawler.__dict__[_HEARTBEAT_ATTRIBUTE] = cls(crawler, config)
        beat._users += 1
        return beat

    def ride(self, call: Callable[[], Awaitable[None]]) -> None:
        """Run *call* after each beat (its :class:`RedisUnavailable` is the layer's to report)."""
        self._riders.append(call)

    async def beat(self) -> None:
        """Say this worker is alive, learn how many are, then run the riders."""
        if self._beating:  # a slow Redis: one beat at a time
            return
        self._beating = True
        try:
            with contextlib.suppress(RedisUnavailable):
                (live,) = await self._link.call(
                    COMPONENT, ("EVAL", _HEARTBEAT, 1, self._key, self.worker, self._lease_us)
                )
                if not isinstance(live, Exception):
                    self.workers = max(1, int(live))
                    if self._stats is not None:
                        self._stats.max_value("polite/cluster/workers_max", self.workers)
            for rider in self._riders:
                with contextlib.suppress(RedisUnavailable):
                    await rider()
        finally:
            self._beating = False

    async def leave(self) -> None:
        """One user is done; the last stops the timer and counts this worker out at once."""
        self._users -= 1
        if self._users > 0:
            return
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        with contextlib.suppress(RedisUnavailable):
            await self._link.call(COMPONENT, ("ZADD", self._key, "XX", 0, self.worker))
        self._link.release()

    def _start(self, spider: Spider | None = None) -> None:
        from twisted.internet.task import LoopingCall

        def beat_now() -> None:
            deferred_from_coro(self.beat()).addErrback(
                lambda failure: logger.error("Heartbeat failed", exc_info=failure.value)
            )

        self._timer = LoopingCall(beat_now)
        self._timer.start(self.interval, now=True)


# -- the domain-aware queue -------------------------------------------------------------

# KEYS: domains, queue, pace, size, dupefilter set; ARGV: score, member, domain, hint (us),
# pace ttl (ms), fingerprint ('' for a request the dupefilter does not record).
# The dupefilter's record and the push are one step: a worker killed between the two
# would leave a URL marked seen and never queued. Every member is unique (a prefix of
# time and worker), so each push counts once. Returns 0 for a request seen meanwhile.
_PUSH = (
    _NOW
    + """
if ARGV[6] ~= '' and redis.call('SADD', KEYS[5], ARGV[6]) == 0 then return 0 end
if redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2]) == 1 then redis.call('INCR', KEYS[4]) end
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('HSET', KEYS[3], 'hint', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 1
"""
)
# Acknowledgements first: a lease is counted out of the size only if it is still held
# (a lease requeued meanwhile is not counted twice). Under OOM or READONLY, Redis
# refuses a script at its first write, before it changed anything.
_ACK_ARGS = """
local done = 0
for i = FIRST_ACK, #ARGV do done = done + redis.call('HDEL', KEYS[LEASED], ARGV[i]) end
if done > 0 then redis.call('DECRBY', KEYS[SIZE], done) end
"""
# KEYS: domains, leased hash, workers, lease counter, size; ARGV: queue key, worker,
# lease (us), horizon (us), acked lease ids... Returns {id, member, domain}, or
# {-1, wait (us) or -1} when no domain is ready.
_POP = (
    _NOW
    + _ACK_ARGS.replace("FIRST_ACK", "5").replace("LEASED", "2").replace("SIZE", "5")
    + """
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[2])
for _ = 1, 8 do
  local ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
  if #ready == 0 then
    ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[4]), 'LIMIT', 0, 1)
  end
  if #ready == 0 then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if #first == 0 then return {-1, -1} end
    return {-1, tonumber(first[2]) - now}
  end
  local d = ready[1]
  local q = 'polite:{' .. d .. '}:queue:' .. ARGV[1]
  local item = redis.call('ZPOPMIN', q)
  if #item == 0 then
    redis.call('ZREM', KEYS[1], d)
  else
    local pace = redis.call('HMGET', 'polite:{' .. d .. '}:pace', 'next', 'gap', 'hint')
    local gap = math.max(tonumber(pace[2]) or 0, tonumber(pace[3]) or 0)
    local at = math.max(now + gap, tonumber(pace[1]) or 0)
    if redis.call('ZCARD', q) == 0 then redis.call('ZREM', KEYS[1], d)
    else redis.call('ZADD', KEYS[1], at, d) end
    local id = redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[2], id, cmsgpack.pack(d, item[2], item[1]))
    return {id, item[1], d}
  end
end
return {-1, 0}
"""
)
# KEYS: leased hash, size; ARGV: lease ids.
_ACK = _ACK_ARGS.replace("FIRST_ACK", "1").replace("LEASED", "1").replace("SIZE", "2") + (
    "return done\n"
)
# Put every lease of the workers in ARGV (or those whose heartbeat expired) back.
# KEYS: domains, workers, leased prefix, size; ARGV: queue key, workers...
_REQUEUE = (
    _NOW
    + """
local workers = {}
for i = 2, #ARGV do workers[#workers + 1] = ARGV[i] end
if #workers == 0 then
  workers = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
end
local moved = 0
for _, w in ipairs(workers) do
  local leased = KEYS[3] .. w
  local all = redis.call('HGETALL', leased)
  for i = 2, #all, 2 do
    local d, score, member = cmsgpack.unpack(all[i])
    local q = 'polite:{' .. d .. '}:queue:' .. ARGV[1]
    if redis.call('ZADD', q, score, member) == 0 then redis.call('DECR', KEYS[4]) end
    redis.call('ZADD', KEYS[1], 'NX', now, d)
    moved = moved + 1
  end
  redis.call('DEL', leased)
  redis.call('ZREM', KEYS[2], w)
end
return moved
"""
)
# A worker asks for requests at least this often (Scrapy's engine heartbeat): when no
# domain is ready now, one ready within it is handed out rather than none.
_POLL_HORIZON = 5.0
# A new worker waits this long for requests before it may find the crawl over.
_STARTUP_GRACE = 3.0
# When nothing is ready, a worker asks Redis again after at most this long (another
# worker may push meanwhile); its own pushes end the wait at once.
_QUIET = 0.2
# Pushes Redis refused (OOM, READONLY) are tried again after this long, doubling.
_REFUSED_RETRY = (0.1, 5.0)
# Entries a pop may quarantine before it gives the engine an answer.
_POP_TRIES = 8
# What ends a queue member's unique prefix ("<time><tag>.<n>|"): the stored request follows.
_MEMBER_SEPARATOR = b"|"


class DomainQueue:
    """scrapy-redis's ``SCHEDULER_QUEUE_CLASS``: one queue per domain, leases per worker.

    Built by scrapy-redis's ``Scheduler.open`` as
    ``DomainQueue(server=, spider=, key=, serializer=)``. Its calls are
    synchronous, as scrapy-redis's scheduler makes every queue's (one round
    trip each, bounded by ``POLITE_REDIS_TIMEOUT``); it talks to Redis through
    the crawler's Redis layer rather than scrapy-redis's ``server``, so an
    outage is one warning and a retry window, never an exception in the engine.
    Requests of one domain come out by priority, then in the order pushed.

    **Leases.** A request handed out is leased to this worker until the engine
    is done with it (:func:`~scrapy_polite._scrapy_internals.requests_in_progress`):
    downloaded and its callback or errback finished, with every request it
    produced already pushed; or answered by the cache, forbidden by robots.txt,
    dropped by any middleware, failed after its retries, or sent back to the
    scheduler (a redirect, a retry: pushed before the old lease ends). That is
    the one place every request taken from the scheduler passes at the end of
    its life in this worker, whatever way it ends. The acknowledgements ride
    on calls the queue makes anyway: the next ``pop``, the size read of
    ``__len__`` and the heartbeat; never before the pushes waiting before them.

    **Nothing read runs.** An entry is built into a request only if it decodes
    to a request of a ``Request`` subclass already imported, with callbacks
    that are methods of the spider's class; anything else is moved to the
    dead-letter list ``<key>:dead`` (``scrapy polite-queue``), its lease ended.

    **Nothing pushed is lost.** A push Redis cannot take (unreachable, or an
    error reply such as OOM or READONLY) waits in this worker and is tried
    again with back-off; the worker does not close while it holds one.
    """

    def __init__(self, server: Any, spider: Spider, key: str, serializer: Any = None) -> None:
        crawler = spider.crawler
        self.spider = spider
        self.key = key
        self.serializer = serializer or load_object("scrapy_polite.serializer")
        self.config = ClusterConfig.from_settings(crawler.settings)
        self.worker = worker_id(crawler)
        self.dead_key = dead_letter_key(key)
        self._link = RedisLink.open(
            crawler, self.config.url, QUEUE, "requests wait in each worker, and go out later"
        )
        self._crawler = crawler
        self._domains = f"{key}:domains"
        self._workers = workers_key(crawler.settings, spider.name)
        self._size = f"{key}:size"
        self._leased_prefix = f"{key}:leased:"
        self._counter = f"{key}:lease-id"
        self._tag = uuid.uuid4().hex[:8]  # this worker's part of each member's prefix
        self._pushed = 0
        self._leases: dict[int, Request] = {}  # lease id: the request the engine holds
        self._acked: list[int] = []  # leases ended here, not yet acknowledged in Redis
        self._unsent: list[Command] = []  # pushes (and dead letters) Redis has not taken
        self._unsent_retry_at = 0.0
        self._unsent_backoff = _REFUSED_RETRY[0]
        self._refused_warned = False
        self._last_size = 0
        self._size_read_at = 0.0
        self._quiet_until = 0.0  # nothing was ready: no need to ask Redis before this
        self._opened = monotonic()
        self._empty_since: float | None = None
        self._idle_before_close = max(0, crawler.settings.getint("SCHEDULER_IDLE_BEFORE_CLOSE"))
        self._ttl_ms = int(max(3600.0, 10 * self.config.lease) * 1000)
        self._hints = _DelayHints(crawler.settings)
        self._stats = crawler.stats
        self._heartbeat = Heartbeat.join(crawler, self.config)
        self._heartbeat.ride(self._on_heartbeat)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)
        if getattr(self.serializer, "__name__", "") == "scrapy_redis.picklecompat":
            logger.warning(
                "SCHEDULER_SERIALIZER is scrapy-redis's pickle: anyone who can write to the "
                "queue's Redis runs code in every worker; scrapy_polite.serializer is JSON"
            )

    def __len__(self) -> int:
        """Requests queued, leased to any worker, or waiting here to be written: the
        crawl is not over while any are (nor while Redis is away).

        A worker just started also counts one for a few seconds (another worker
        may be between its dupefilter check and its push of the first
        requests), and one for ``SCHEDULER_IDLE_BEFORE_CLOSE`` seconds after the
        queue was last seen empty. Read again at most every ``_QUIET`` seconds
        (Scrapy asks very often); the read carries this worker's acknowledgements.
        """
        now = monotonic()
        self._settle()
        acks_waiting = bool(self._acked) and not self._unsent
        if now >= self._size_read_at + _QUIET or not self._last_size or acks_waiting:
            self._send_unsent()
            acked = self._take_acks()
            commands: list[Command] = [("GET", self._size)]
            if acked:
                commands.insert(0, self._ack_command(acked))
            try:
                replies = self._link.blocking(QUEUE, *commands)
            except RedisUnavailable:
                self._acked = acked + self._acked
                return max(1, self._last_size) + len(self._unsent)
            if acked and isinstance(replies[0], Exception):
                self._acked = acked + self._acked
                self._refused(replies[0], "acknowledgements")
            size = replies[-1]
            if not isinstance(size, Exception):
                self._last_size = max(0, int(size or 0))
                self._size_read_at = now
        pending = self._last_size + len(self._unsent)
        if pending:
            self._empty_since = None
            return pending
        if self._empty_since is None:
            self._empty_since = now
        if now - self._opened < _STARTUP_GRACE or now - self._empty_since < self._idle_before_close:
            return 1
        return 0

    def push(self, request: Request) -> None:
        """Write *request* to its domain's queue (or keep it here until Redis takes it)."""
        try:
            data = encode_request(request, self.spider, self.serializer)
        except TypeError as exc:
            _refuse_unstorable(request, exc, self._stats)
            return
        domain = _domain(request)
        queue = domain_key(domain, "queue", self.key)
        dupefilter, fingerprint = _unrecorded(self._crawler).pop(request, (self._size, ""))
        keys = (self._domains, queue, domain_key(domain, "pace"), self._size, dupefilter)
        hint = int(self._hints.floor(domain) * _US)
        self._pushed += 1
        member = b"%016x%s.%x|" % (time.time_ns(), self._tag.encode(), self._pushed) + data
        command = ("EVAL", _PUSH, len(keys), *keys, -request.priority, member, domain, hint)
        self._unsent.append((*command, self._ttl_ms, fingerprint))
        self._send_unsent()
        self._quiet_until = 0.0  # something is ready now

    def pop(self, timeout: int = 0) -> Request | None:
        """The next request of a ready domain, leased to this worker; or None.

        *timeout* (scrapy-redis's ``SCHEDULER_IDLE_BEFORE_CLOSE``) is not
        waited here, which would block the reactor: ``__len__`` keeps the
        worker open that long after the queue was last seen empty instead.
        """
        self._settle()
        now = monotonic()
        if now < self._quiet_until or not self._send_unsent():
            return None
        leased = self._leased_prefix + self.worker
        keys = (self._domains, leased, self._workers, self._counter, self._size)
        lease, horizon = int(self.config.lease * _US), int(_POLL_HORIZON * _US)
        for _ in range(_POP_TRIES):
            acked = self._take_acks()
            try:
                (reply,) = self._link.blocking(
                    QUEUE,
                    ("EVAL", _POP, len(keys), *keys, self.key, self.worker, lease, horizon, *acked),
                )
            except RedisUnavailable:
                self._acked = acked + self._acked
                return None
            if isinstance(reply, Exception):  # OOM, READONLY: nothing was changed
                self._acked = acked + self._acked
                self._refused(reply, "a pop")
                self._quiet_until = now + _QUIET
                return None
            self._inc("pops")
            self._refused_warned = bool(self._unsent) and self._refused_warned
            if int(reply[0]) < 0:  # nothing ready: reply[1] is how long until a domain is (µs)
                wait = int(reply[1]) / _US if int(reply[1]) >= 0 else _QUIET
                self._quiet_until = now + min(max(wait, 0.0), _QUIET)
                return None
            lease_id, member, domain = int(reply[0]), reply[1], reply[2]
            request = self._request(lease_id, member, domain)
            if request is not None:
                self._leases[lease_id] = request
                return request
        return None

    def clear(self) -> None:
        """scrapy-redis's flush: only the last live worker empties the shared queue."""
        try:
            workers, mine = self._link.blocking(
                QUEUE, ("ZCARD", self._workers), ("ZSCORE", self._workers, self.worker)
            )
            others = int(workers) - (mine is not None)
            if others > 0:
                logger.info("Not clearing the shared queue: %d other workers use it", others)
                return
            (domains,) = self._link.blocking(QUEUE, ("ZRANGE", self._domains, 0, -1))
            queues = [domain_key(d.decode(), "queue", self.key) for d in domains]
            self._link.blocking(QUEUE, ("DEL", self._domains, self._size, *queues))
        except RedisUnavailable:
            logger.warning("Could not clear the shared queue: Redis is unavailable")

    # -- entries read back ------------------------------------------------------------
    def _request(self, lease_id: int, member: bytes, domain: bytes) -> Request | None:
        """The request *member* holds, or None once it is quarantined."""
        # A member is "<unique prefix>|<request>"; one written before 0.3 is the request alone.
        data = member if member.startswith(b"{") else member.partition(_MEMBER_SEPARATOR)[2]
        try:
            return trusted_request(self.serializer.loads(data), self.spider)
        except Exception as exc:  # anything wrong with it: never the engine's problem
            reason = f"{type(exc).__name__}: {exc}"
        shown = domain.decode("utf-8", "replace")
        logger.warning(
            "Quarantined a queue entry of %s in %s (%s): %.200r", shown, self.dead_key, reason, data
        )
        self._inc("quarantined")
        letter = json.dumps(
            {
                "reason": reason,
                "domain": shown,
                "worker": self.worker,
                "at": time.time(),
                "member": member.decode("latin-1"),
            }
        )
        self._unsent.append(("RPUSH", self.dead_key, letter))
        self._acked.append(lease_id)
        self._send_unsent()
        return None

    # -- leases ---------------------------------------------------------------------
    def _settle(self) -> None:
        """Leases of requests the engine is done with become acknowledgements to send."""
        if not self._leases:
            return
        in_progress = requests_in_progress(self._crawler.engine)
        ended = [i for i, r in self._leases.items() if r not in in_progress]
        for lease_id in ended:
            del self._leases[lease_id]
        self._acked += ended

    def _take_acks(self) -> list[int]:
        """The acknowledgements to send now: none while pushes wait before them (a
        request's lease ends only once what its callback produced is in Redis)."""
        if self._unsent or not self._acked:
            return []
        acked, self._acked = self._acked, []
        return acked

    def _ack_command(self, acked: list[int]) -> Command:
        keys = (self._leased_prefix + self.worker, self._size)
        return ("EVAL", _ACK, len(keys), *keys, *acked)

    async def _on_heartbeat(self) -> None:
        """With each heartbeat: this worker's acknowledgements, and dead workers' leases
        back to the queue (theirs expired ``POLITE_CLUSTER_LEASE`` after their last beat)."""
        self._settle()
        acked = self._take_acks()
        keys = (self._domains, self._workers, self._leased_prefix, self._size)
        commands = [("EVAL", _REQUEUE, len(keys), *keys, self.key)]
        if acked:
            commands.insert(0, self._ack_command(acked))
        try:
            replies = await self._link.call(QUEUE, *commands)
        except RedisUnavailable:
            self._acked = acked + self._acked
            raise
        if acked and isinstance(replies[0], Exception):
            self._acked = acked + self._acked
        moved = replies[-1]
        if isinstance(moved, Exception):
            self._refused(moved, "a requeue")
        elif moved:
            logger.warning(
                "%d requests of workers that stopped answering went back to the shared queue",
                moved,
            )
            self._inc("requeued", int(moved))

    async def _closed(self, spider: Spider | None = None, reason: str = "") -> None:
        """Write what waits, acknowledge what ended, hand back what did not (a stop)."""
        self._settle()
        moved = 0
        try:
            self._send_unsent(force=True)
            if self._unsent:
                # Not acknowledged either: the requests that produced them go back to the
                # queue with this worker's leases, and are fetched again.
                logger.error(
                    "Redis refused %d writes of this worker to the last: the pages that "
                    "produced them go back to the queue, to be fetched again",
                    len(self._unsent),
                )
                self._inc("unwritten_at_close", len(self._unsent))
            acked = self._take_acks()
            if acked:
                self._link.blocking(QUEUE, self._ack_command(acked))
            keys = (self._domains, self._workers, self._leased_prefix, self._size)
            (moved,) = self._link.blocking(
                QUEUE, ("EVAL", _REQUEUE, len(keys), *keys, self.key, self.worker)
            )
        except RedisUnavailable:
            logger.warning(
                "Redis is unavailable: %d requests pushed by this worker are lost, and its "
                "leases go back to the queue once they expire",
                len(self._unsent),
            )
        finally:
            await self._heartbeat.leave()
            self._link.release()
        if isinstance(moved, int) and moved:
            logger.info("Handed %d unfinished requests back to the shared queue", moved)
            self._inc("handed_back", moved)

    # -- writes Redis may refuse --------------------------------------------------------
    def _send_unsent(self, *, force: bool = False) -> bool:
        """Write the pushes that wait; False while some still do."""
        if not self._unsent:
            return True
        if not force and monotonic() < self._unsent_retry_at:
            return False
        try:
            replies = self._link.blocking(QUEUE, *self._unsent)
        except RedisUnavailable:
            return False
        pairs = zip(self._unsent, replies, strict=True)
        refused = [c for c, r in pairs if isinstance(r, Exception)]
        self._unsent = refused
        if not refused:
            self._unsent_backoff = _REFUSED_RETRY[0]
            if self._refused_warned:
                logger.info("Redis takes this worker's requests again")
                self._refused_warned = False
            return True
        error = next(r for r in replies if isinstance(r, Exception))
        self._unsent_retry_at = monotonic() + self._unsent_backoff
        self._unsent_backoff = min(self._unsent_backoff * 2, _REFUSED_RETRY[1])
        self._refused(error, f"{len(refused)} pushes, kept in this worker until it does")
        return False

    def _refused(self, error: Exception, what: str) -> None:
        """Redis answered with an error (OOM, READONLY): one warning, a stat."""
        self._inc("refused")
        if not self._refused_warned:
            self._refused_warned = True
            logger.warning(
                "Redis at %s refused %s (%s); trying again, and this worker will not close "
                "while it holds requests Redis has not taken",
                self._link.shown_url,
                what,
                error,
            )

    def _inc(self, event: str, count: int = 1) -> None:
        if self._stats is not None:
            self._stats.inc_value(f"polite/cluster/queue/{event}", count)


# -- reading and writing requests ---------------------------------------------------------


def encode_request(request: Request, spider: Spider, serializer: Any) -> bytes:
    """*request* as the queue stores it; :class:`TypeError` if it cannot be stored.

    The dupefilter encodes first (a request that cannot be stored is never
    recorded as seen); the push that follows reuses the bytes, kept per crawler
    for as long as the request lives.
    """
    assert spider.crawler is not None
    memo: WeakKeyDictionary[Request, bytes] = spider.crawler.__dict__.setdefault(
        _ENCODED_ATTRIBUTE, WeakKeyDictionary()
    )
    data = memo.pop(request, None)
    if data is None:
        data = serializer.dumps(request.to_dict(spider=spider))
        assert data is not None
        memo[request] = data
    return data


_ENCODED_ATTRIBUTE = "_scrapy_polite_encoded"
_UNRECORDED_ATTRIBUTE = "_scrapy_polite_unrecorded"


def _unrecorded(crawler: Crawler) -> WeakKeyDictionary[Request, tuple[str, str]]:
    """Requests the dupefilter found new but left for the push to record, with the
    dupefilter's key and their fingerprint (per crawler, for as long as each lives)."""
    found: WeakKeyDictionary[Request, tuple[str, str]] = crawler.__dict__.setdefault(
        _UNRECORDED_ATTRIBUTE, WeakKeyDictionary()
    )
    return found


def trusted_request(entry: Any, spider: Spider) -> Request:
    """Build the request *entry* (a decoded queue entry) describes, if it can be trusted.

    Only a ``Request`` subclass already imported is built (nothing is
    imported), and only methods of the spider's class become callbacks;
    anything else raises :class:`ValueError` naming what is wrong.
    """
    from scrapy import Request, Spider

    if not isinstance(entry, dict):
        raise ValueError("not a request dict")
    if not isinstance(entry.get("url"), str):
        raise ValueError("no URL string")
    path = entry.get("_class", "scrapy.http.request.Request")
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"request class {path!r} is not an import path")
    module_name, _, qualname = path.rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, qualname, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, Request)):
        raise ValueError(f"{path!r} is not a Request subclass this worker has imported")
    for name in ("callback", "errback"):
        method = entry.get(name)
        if method is None:
            continue
        if not isinstance(method, str) or method.startswith("__"):
            raise ValueError(f"{name} {method!r} is not a method name")
        found = inspect.getattr_static(type(spider), method, None)
        scrapys = method not in {"parse", "_parse"} and hasattr(Spider, method)
        if not inspect.isfunction(found) or scrapys:
            raise ValueError(f"{name} {method!r} is not a method of {type(spider).__name__}")
    return request_from_dict(entry, spider=spider)


def _refuse_unstorable(request: Request, exc: TypeError, stats: Any) -> None:
    logger.error("Not scheduled, the shared queue cannot store it: %s: %s", request, exc)
    if stats is not None:
        stats.inc_value("polite/cluster/queue/unstorable")


def dead_letter_key(queue_key: str) -> str:
    """The list of quarantined entries of the queue at *queue_key*."""
    return f"{queue_key}:dead"


try:  # scrapy-redis is the "cluster" extra: without it there is no dupefilter to extend
    from scrapy_redis.dupefilter import RFPDupeFilter as _RedisDupeFilter
except ImportError:  # pragma: no cover
    _RedisDupeFilter = object


class DupeFilter(_RedisDupeFilter):  # type: ignore[misc]
    """scrapy-redis's ``RFPDupeFilter`` through the one Redis layer.

    ``DUPEFILTER_CLASS = "scrapy_polite.cluster.DupeFilter"`` (the add-on sets
    it in cluster mode in place of scrapy-redis's). Each check is one round
    trip bounded by ``POLITE_REDIS_TIMEOUT``, never scrapy-redis's 30 s
    blocking client; while Redis is away or refuses writes, duplicates are
    judged by what this worker has seen (a request may be fetched twice across
    workers then, never zero times). A request the shared queue cannot store is
    refused before it is recorded, so its URL is not marked seen for nothing.

    With :class:`DomainQueue` the check only reads (``SISMEMBER``), and the
    queue's push records the fingerprint in the same script that queues the
    request: a worker killed between a record and its push would leave a URL
    seen and never crawled. With any other queue, the check records (``SADD``).
    """

    def __init__(self, server: Any, key: str, debug: bool = False, **kwargs: Any) -> None:
        super().__init__(server, key, debug)
        self._link: RedisLink | None = kwargs.get("link")
        self._spider: Spider | None = kwargs.get("spider")
        self._serializer: Any = kwargs.get("serializer")
        self._pushes_record: bool = kwargs.get("pushes_record", False)
        self._seen_here: set[str] = set()
        self._warned = False

    @classmethod
    def from_spider(cls, spider: Spider) -> Self:
        crawler = spider.crawler
        settings = crawler.settings
        key = settings.get("SCHEDULER_DUPEFILTER_KEY") or "%(spider)s:dupefilter"
        url = required_redis_url(settings, URL_SETTING, "the shared dupefilter")
        link = RedisLink.open(crawler, url, "dupefilter", "duplicates judged by each worker alone")
        serializer = settings.get("SCHEDULER_SERIALIZER") or "scrapy_polite.serializer"
        queue = settings.get("SCHEDULER_QUEUE_CLASS")
        dupefilter = cls(
            None,
            key % {"spider": spider.name},
            settings.getbool("DUPEFILTER_DEBUG"),
            link=link,
            spider=spider,
            serializer=importlib.import_module(serializer)
            if isinstance(serializer, str)
            else serializer,
            pushes_record=bool(queue) and _is_subclass(queue, DomainQueue),
        )
        # scrapy-redis's scheduler never closes its dupefilter: give the link back at the end.
        crawler.signals.connect(dupefilter.close, signal=signals.spider_closed)
        return dupefilter

    def request_seen(self, request: Request) -> bool:
        if self._spider is not None:
            try:
                encode_request(request, self._spider, self._serializer)
            except TypeError as exc:
                _refuse_unstorable(request, exc, self._spider.crawler.stats)
                return True  # not scheduled, and not recorded
        fingerprint = self.request_fingerprint(request)
        if self._link is None:  # built by from_settings, outside a crawl
            return bool(super().request_seen(request))
        command = "SISMEMBER" if self._pushes_record else "SADD"
        try:
            reply = self._link.blocking_one("dupefilter", command, self.key, fingerprint)
        except RedisUnavailable as exc:
            reply = exc
        if isinstance(reply, Exception):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "The shared dupefilter is unavailable (%s): duplicates are judged by "
                    "this worker alone until Redis answers",
                    reply,
                )
            seen = fingerprint in self._seen_here
            self._seen_here.add(fingerprint)
        else:
            seen = int(reply) == (1 if self._pushes_record else 0)
        if not seen and self._pushes_record and self._spider is not None:
            assert self._spider.crawler is not None
            _unrecorded(self._spider.crawler)[request] = (self.key, fingerprint)
        return seen

    def clear(self) -> None:
        if self._link is None:
            super().clear()
            return
        with contextlib.suppress(RedisUnavailable):
            self._link.blocking("dupefilter", ("DEL", self.key))

    def close(self, reason: str = "", spider: Spider | None = None) -> None:
        if self._link is None:
            super().close(reason)
            return
        link, self._link = self._link, None
        link.release()


class _DelayHints:
    """Each domain's delay floor as this worker's settings give it, for the queue."""

    def __init__(self, settings: BaseSettings) -> None:
        from scrapy_polite.delays import DelayConfig

        self._config = DelayConfig.from_settings(settings)
        self._cache: dict[str, float] = {}

    def floor(self, domain: str) -> float:
        floor = self._cache.get(domain)
        if floor is None:
            floor = self._cache[domain] = self._config.range_for(domain, domain).low
        return floor


def _is_subclass(path_or_class: Any, base: type) -> bool:
    try:
        found = load_object(path_or_class) if isinstance(path_or_class, str) else path_or_class
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, base)


def _domain(request: Request) -> str:
    slot = request.meta.get("download_slot")
    if slot:
        return str(slot)
    from scrapy.utils.httpobj import urlparse_cached

    return urlparse_cached(request).hostname or ""


def queue_key(settings: BaseSettings, spider: str) -> str:
    """scrapy-redis's queue key of *spider* (``SCHEDULER_QUEUE_KEY``): every key of the
    shared queue starts with it."""
    key: str = settings.get("SCHEDULER_QUEUE_KEY") or "%(spider)s:requests"
    return key % {"spider": spider}


def workers_key(settings: BaseSettings, spider: str) -> str:
    """The sorted set of live workers (and their leases' expiry) of *spider*'s crawl."""
    return f"{queue_key(settings, spider)}:workers"


def worker_id(crawler: Crawler) -> str:
    """One id per crawler process, shared by its queue and its pace."""
    found: str | None = crawler.__dict__.get("_scrapy_polite_worker")
    if found is None:
        found = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        crawler.__dict__["_scrapy_polite_worker"] = found
    return found


def _path(obj: Any) -> str | None:
    if obj is None:
        return None
    return f"{obj.__module__}.{obj.__qualname__}"
