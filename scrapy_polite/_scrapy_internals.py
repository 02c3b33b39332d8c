"""Every reach into Scrapy's internals, in one place, each named for the feature it serves.

Scrapy gives no public hook for a component to choose a download slot's waits,
so the delay middleware uses these. Each was checked against Scrapy 2.18.0 and
2.19.0 (the supported range); ``tox -e floor`` runs the suite on the oldest.

- :class:`PacedSlot` (subclasses ``scrapy.core.downloader.Slot``, overrides
  ``download_delay`` and ``free_transfer_slots``, replaces ``transferring``,
  reads ``lastseen``, ``delay``, ``queue`` and ``active``): per-domain gaps
  drawn by a :class:`Pace`, and ``CONCURRENT_REQUESTS_PER_DOMAIN`` held on the
  asyncio reactor.
- :func:`install_slot` (writes ``Downloader.slots``, calls
  ``Downloader._start_slot_gc``): every domain gets a :class:`PacedSlot`
  before Scrapy would build a plain one. It returns the slot's wake-up
  (cancels ``Slot.latercall``, calls ``Downloader._process_queue``): a pace that
  learns a new departure time (an answer from the cluster's Redis) must wake
  the slot, which otherwise sleeps until the old time.
- :func:`requests_in_progress` (reads ``ExecutionEngine._slot.inprogress``): the
  cluster's queue ends a request's lease when the engine is done with it. The
  engine adds every request it takes from the scheduler to that set before the
  download and removes it only once the downloader's answer was handled: a
  redirect or retry rescheduled, or the callback or errback run and everything
  it produced scheduled; a middleware's ``IgnoreRequest`` (robots.txt, offsite)
  and a cache hit end the same way. Scrapy sends no signal at that moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING, Protocol

from scrapy.core.downloader import Slot

if TYPE_CHECKING:
    from collections.abc import Collection

    from scrapy import Request
    from scrapy.core.downloader import Downloader
    from scrapy.core.engine import ExecutionEngine

__all__ = ["Pace", "PacedSlot", "has_slot", "install_slot", "requests_in_progress"]


class Pace(Protocol):
    """What a :class:`PacedSlot` asks of its domain."""

    last_departure: float  # restored into a new slot after Scrapy dropped an idle one

    def wait(self, lastseen: float, slot_delay: float, ready: bool) -> float:
        """Seconds the slot must still wait after the departure at *lastseen*
        (``time.monotonic()``); *slot_delay* is what AutoThrottle wrote; *ready*:
        a request is queued and the slot may start one now."""

    def started(self, now: float) -> None:
        """A download of the slot started at *now*."""


class PacedSlot(Slot):
    """A download slot whose waits come from a :class:`Pace`.

    Scrapy calls ``download_delay()`` each time it looks at the slot's queue and
    holds the slot while the result, counted from ``lastseen``, is positive.

    ``free_transfer_slots``: Scrapy's queue loop pops the head of the queue
    each time it is positive, but on the asyncio reactor that download only
    joins ``transferring`` once its task first runs, after the loop is over.
    Counting it from the pop on keeps ``CONCURRENT_REQUESTS_PER_DOMAIN`` at the
    site; requests that left without starting are forgotten.
    """

    __slots__ = ("_pace", "_starting")

    def __init__(self, concurrency: int, pace: Pace, start_delay: float = 0.0) -> None:
        # ``delay`` is left for AutoThrottle to write; the pace may use it.
        super().__init__(concurrency, start_delay, 0.0)
        self.lastseen = pace.last_departure
        self._pace = pace
        self._starting: set[Request] = set()
        self.transferring = _Transferring(self._starting, pace)

    def download_delay(self) -> float:
        ready = bool(self.queue) and (
            self.concurrency - len(self.transferring) - len(self._starting & self.active) > 0
        )
        return self._pace.wait(self.lastseen, self.delay, ready)

    def free_transfer_slots(self) -> int:
        starting = self._starting
        if starting:
            starting &= self.active
        free = self.concurrency - len(self.transferring) - len(starting)
        if free > 0 and self.queue:
            starting.add(self.queue[0][0])
        return free


class _Transferring(set["Request"]):
    """A slot's downloads in progress; a download that starts is no longer starting."""

    def __init__(self, starting: set[Request], pace: Pace) -> None:
        super().__init__()
        self._starting = starting
        self._pace = pace

    def add(self, request: Request) -> None:
        self._starting.discard(request)
        self._pace.started(monotonic())
        super().add(request)


def has_slot(downloader: Downloader, key: str) -> bool:
    """Whether the downloader has a slot for *key* now."""
    return key in downloader.slots


def install_slot(downloader: Downloader, key: str, slot: Slot) -> Callable[[], None]:
    """Make *slot* the downloader's slot for *key*, with Scrapy's idle-slot collector on;
    return a function that wakes the slot now (to look at its queue again)."""
    downloader.slots[key] = slot
    downloader._start_slot_gc()
    return partial(_wake, downloader, slot)


def _wake(downloader: Downloader, slot: Slot) -> None:
    if slot.latercall is not None:
        with contextlib.suppress(Exception):  # it may have just fired
            slot.latercall.cancel()
        slot.latercall = None
    downloader._process_queue(slot)


def requests_in_progress(engine: ExecutionEngine | None) -> Collection[Request]:
    """The requests the engine took from the scheduler and is not done with yet
    (an empty collection once the engine has closed its slot)."""
    slot = getattr(engine, "_slot", None)
    if slot is None:
        return ()
    inprogress: Collection[Request] = slot.inprogress
    return inprogress
