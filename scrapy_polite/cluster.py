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
  handed out is leased to its worker until it leaves the downloader; a worker
  that stops hands its leases back, and the leases of a worker that died
  return to the queue once it has missed ``POLITE_CLUSTER_LEASE`` seconds of
  heartbeats.
- **No pickle.** :mod:`scrapy_polite.serializer` stores requests as JSON.

The add-on places the queue and the serializer unless you chose your own, and
sets ``SCHEDULER_PERSIST = True`` (with ``False`` the first worker to finish
would flush the others' queue).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

from scrapy import signals
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
from scrapy_polite._settings import PoliteSettingError, get_float
from scrapy_polite.robots import requests_held_at_close

if TYPE_CHECKING:
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
    "SharedPace",
    "cluster_enabled",
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
        self.workers = 1  # live workers last seen, this one included
        self._link = RedisLink.open(
            crawler,
            config.url,
            COMPONENT,
            "each worker paces its domains alone, its gaps widened by the live workers",
        )
        self._workers_key = workers_key(crawler.settings, crawler.spidercls.name)
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

    async def heartbeat(self) -> int:
        """Say this worker is alive; return how many are."""
        lease_us = int(self.config.lease * _US)
        (live,) = await self._link.call(
            COMPONENT,
            ("EVAL", _HEARTBEAT, 1, self._workers_key, self.worker, lease_us),
        )
        self.workers = max(1, int(live))
        if self._stats is not None:
            self._stats.max_value("polite/cluster/workers_max", self.workers)
        return self.workers

    async def leave(self) -> None:
        """This worker stops: count it out at once (expired; the queue puts back any lease)."""
        await self._link.call(COMPONENT, ("ZADD", self._workers_key, "XX", 0, self.worker))

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


# -- the domain-aware queue -------------------------------------------------------------

_PUSH = (
    _NOW
    + """
if redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2]) == 1 then redis.call('INCR', KEYS[4]) end
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('HSET', KEYS[3], 'hint', ARGV[4]) end
return 1
"""
)
# KEYS: domains, leased hash, workers, lease counter, size; ARGV: queue key, worker,
# lease (us), horizon (us), acked lease ids...
_POP = (
    _NOW
    + """
local done = 0
for i = 5, #ARGV do done = done + redis.call('HDEL', KEYS[2], ARGV[i]) end
if done > 0 then redis.call('DECRBY', KEYS[5], done) end
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
    redis.call('HSET', KEYS[2], id, d .. '\\n' .. item[2] .. '\\n' .. item[1])
    return {id, item[1]}
  end
end
return {-1, 0}
"""
)
_ACK = """
local done = 0
for i = 1, #ARGV do done = done + redis.call('HDEL', KEYS[1], ARGV[i]) end
if done > 0 then redis.call('DECRBY', KEYS[2], done) end
return done
"""
# Put every lease of the workers in ARGV (or those whose heartbeat expired) back.
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
    local v = all[i]
    local a = string.find(v, '\\n', 1, true)
    local b = string.find(v, '\\n', a + 1, true)
    local d = string.sub(v, 1, a - 1)
    local q = 'polite:{' .. d .. '}:queue:' .. ARGV[1]
    redis.call('ZADD', q, string.sub(v, a + 1, b - 1), string.sub(v, b + 1))
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


class DomainQueue:
    """scrapy-redis's ``SCHEDULER_QUEUE_CLASS``: one queue per domain, leases per worker.

    Built by scrapy-redis's ``Scheduler.open`` as
    ``DomainQueue(server=, spider=, key=, serializer=)``. Its calls are
    synchronous, as scrapy-redis's scheduler makes every queue's (one round
    trip each, bounded by ``POLITE_REDIS_TIMEOUT``); it talks to Redis through
    the crawler's Redis layer rather than scrapy-redis's ``server``, so an
    outage is one warning and a retry window, never an exception in the engine.
    Requests of one domain come out by priority. A request handed out is
    leased to this worker until it leaves the downloader; the acknowledgements
    ride on the next ``pop``. While Redis is away, pushed requests wait in this
    worker and are written when it answers again: none is lost.
    """

    def __init__(self, server: Any, spider: Spider, key: str, serializer: Any = None) -> None:
        crawler = spider.crawler
        self.spider = spider
        self.key = key
        self.serializer = serializer or load_object("scrapy_polite.serializer")
        self.config = ClusterConfig.from_settings(crawler.settings)
        self.worker = worker_id(crawler)
        self._link = RedisLink.open(
            crawler, self.config.url, QUEUE, "requests wait in each worker, and go out later"
        )
        self._domains = f"{key}:domains"
        self._workers = workers_key(crawler.settings, spider.name)
        self._size = f"{key}:size"
        self._leased_prefix = f"{key}:leased:"
        self._counter = f"{key}:lease-id"
        self._acked: list[int] = []
        self._unsent: list[Command] = []  # pushes that waited out an outage
        self._last_size = 0
        self._size_read_at = 0.0
        self._quiet_until = 0.0  # nothing was ready: no need to ask Redis before this
        self._requeue_at = 0.0  # when to look for dead workers' leases again
        self._opened = monotonic()
        self._hints = _DelayHints(crawler.settings)
        self._stats = crawler.stats
        self._requeue()
        crawler.signals.connect(self._downloaded, signal=signals.response_downloaded)
        crawler.signals.connect(self._left_downloader, signal=signals.request_left_downloader)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)
        crawler.signals.connect(self._take_held, signal=requests_held_at_close)

    def __len__(self) -> int:
        """Requests queued or leased to a worker: the crawl is not over while any are.

        A worker just started also counts one for a few seconds: another worker
        may be between its dupefilter check and its push of the first requests.
        Read again at most every ``_QUIET`` seconds (Scrapy asks very often).
        """
        now = monotonic()
        if now >= self._size_read_at + _QUIET or not self._last_size:
            try:
                (size,) = self._link.blocking(QUEUE, ("GET", self._size))
                self._last_size = max(0, int(size or 0))
                self._size_read_at = now
            except RedisUnavailable:
                return max(1, self._last_size) + len(self._unsent)  # not over: Redis is away
        if not self._last_size and monotonic() - self._opened < _STARTUP_GRACE:
            return 1
        return self._last_size + len(self._unsent)

    def push(self, request: Request) -> None:
        domain = _domain(request)
        request.meta.pop(_LEASE, None)
        data = self._encode(request)
        queue = domain_key(domain, "queue", self.key)
        keys = (self._domains, queue, domain_key(domain, "pace"), self._size)
        hint = int(self._hints.floor(domain) * _US)
        command = ("EVAL", _PUSH, len(keys), *keys, -request.priority, data, domain, hint)
        self._unsent.append(command)
        self._send_unsent()
        self._quiet_until = 0.0  # something is ready now

    def pop(self, timeout: int = 0) -> Request | None:
        now = monotonic()
        if now < self._quiet_until or not self._send_unsent():
            return None
        if now >= self._requeue_at:
            self._requeue_at = now + self.config.heartbeat
            self._requeue()
        acked, self._acked = self._acked, []
        leased = self._leased_prefix + self.worker
        keys = (self._domains, leased, self._workers, self._counter, self._size)
        lease, horizon = int(self.config.lease * _US), int(_POLL_HORIZON * _US)
        try:
            (reply,) = self._link.blocking(
                QUEUE,
                ("EVAL", _POP, len(keys), *keys, self.key, self.worker, lease, horizon, *acked),
            )
        except RedisUnavailable:
            self._acked = acked + self._acked
            return None
        if isinstance(reply, Exception):
            raise reply
        self._inc("pops")
        lease_id, data = reply
        if int(lease_id) < 0:  # nothing ready: data is how long until a domain is (µs)
            wait = int(data) / _US if int(data) >= 0 else _QUIET
            self._quiet_until = now + min(max(wait, 0.0), _QUIET)
            return None
        request = request_from_dict(self.serializer.loads(data), spider=self.spider)
        request.meta[_LEASE] = int(lease_id)
        return request

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

    # -- leases -------------------------------------------------------------------
    def _downloaded(self, response: Any, request: Request, spider: Spider | None = None) -> None:
        self._ack(request)

    def _left_downloader(self, request: Request, spider: Spider | None = None) -> None:
        engine = self.spider.crawler.engine
        # A download that failed is done with; what a stopping crawl cancels is handed back.
        if engine is not None and engine.running:
            self._ack(request)

    def _ack(self, request: Request) -> None:
        lease = request.meta.pop(_LEASE, None)
        if lease is None:
            return
        from scrapy.utils.defer import deferred_from_coro

        deferred_from_coro(self._send_ack(int(lease)))

    async def _send_ack(self, lease: int) -> None:
        """Done with a leased request: at once, off the reactor thread's wait."""
        keys = (self._leased_prefix + self.worker, self._size)
        try:
            await self._link.call(QUEUE, ("EVAL", _ACK, len(keys), *keys, lease))
        except RedisUnavailable:
            self._acked.append(lease)  # sent with the next pop

    def _take_held(self, requests: list[Request]) -> int:
        """The robots.txt middleware's held requests, at a stop: back to the shared queue."""
        for request in requests:
            self.push(request)
        self._inc("handed_back", len(requests))
        return len(requests)

    def _closed(self, spider: Spider | None = None, reason: str = "") -> None:
        """Hand back what this worker took and did not download (graceful stop)."""
        try:
            self._send_unsent()
            leased = self._leased_prefix + self.worker
            acked, self._acked = self._acked, []
            if acked:
                (done,) = self._link.blocking(QUEUE, ("HDEL", leased, *acked))
                if done:
                    self._link.blocking(QUEUE, ("DECRBY", self._size, done))
            moved = self._requeue(self.worker)
        except RedisUnavailable:
            logger.warning(
                "Redis is unavailable: %d requests pushed by this worker are lost, and its "
                "leases go back to the queue once they expire",
                len(self._unsent),
            )
            moved = 0
        finally:
            self._link.release()
        if moved:
            logger.info("Handed %d unfinished requests back to the shared queue", moved)
            self._inc("handed_back", moved)

    def _requeue(self, *workers: str) -> int:
        """Put the leases of *workers*, or of every worker whose heartbeat expired, back."""
        keys = (self._domains, self._workers, self._leased_prefix)
        try:
            (moved,) = self._link.blocking(
                QUEUE, ("EVAL", _REQUEUE, len(keys), *keys, self.key, *workers)
            )
        except RedisUnavailable:
            return 0
        if isinstance(moved, Exception):
            raise moved
        if moved and not workers:
            logger.warning(
                "%d requests of workers that stopped answering went back to the shared queue",
                moved,
            )
            self._inc("requeued", int(moved))
        return int(moved)

    def _send_unsent(self) -> bool:
        """Write the pushes that wait; False while Redis is away."""
        if not self._unsent:
            return True
        try:
            replies = self._link.blocking(QUEUE, *self._unsent)
        except RedisUnavailable:
            return False
        failed = [r for r in replies if isinstance(r, Exception)]
        self._unsent = []
        if failed:
            raise failed[0]
        return True

    def _encode(self, request: Request) -> bytes:
        data: bytes = self.serializer.dumps(request.to_dict(spider=self.spider))
        return data

    def _inc(self, event: str, count: int = 1) -> None:
        if self._stats is not None:
            self._stats.inc_value(f"polite/cluster/queue/{event}", count)


try:  # scrapy-redis is the "cluster" extra: without it there is no dupefilter to extend
    from scrapy_redis.dupefilter import RFPDupeFilter as _RedisDupeFilter
except ImportError:  # pragma: no cover
    _RedisDupeFilter = object


class DupeFilter(_RedisDupeFilter):  # type: ignore[misc]
    """scrapy-redis's ``RFPDupeFilter`` that survives a Redis outage.

    ``DUPEFILTER_CLASS = "scrapy_polite.cluster.DupeFilter"``. scrapy-redis's
    raises when Redis is away, and the request being scheduled is lost. This
    one then judges by what this worker has seen (a request may be fetched
    twice across workers during the outage, never zero times).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen_here: set[str] = set()
        self._warned = False

    def request_seen(self, request: Request) -> bool:
        import redis

        try:
            return bool(super().request_seen(request))
        except (redis.RedisError, OSError) as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "The shared dupefilter is unavailable (%s): duplicates are judged by "
                    "this worker alone until Redis answers",
                    exc,
                )
            fingerprint = self.request_fingerprint(request)
            seen = fingerprint in self._seen_here
            self._seen_here.add(fingerprint)
            return seen


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


def _domain(request: Request) -> str:
    slot = request.meta.get("download_slot")
    if slot:
        return str(slot)
    from scrapy.utils.httpobj import urlparse_cached

    return urlparse_cached(request).hostname or ""


def workers_key(settings: BaseSettings, spider: str) -> str:
    """The sorted set of live workers (and their leases' expiry) of *spider*'s crawl."""
    queue_key = settings.get("SCHEDULER_QUEUE_KEY") or "%(spider)s:requests"
    return f"{queue_key % {'spider': spider}}:workers"


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
