"""An item pipeline that runs a CPU-bound function of each item in worker processes.

``POLITE_PROCESS_FUNCTION`` names a function that takes the item's fields as a
plain dict and returns a dict. :class:`ProcessPipeline` sends each item to a
pool of worker processes and awaits the answer, so the reactor keeps crawling
while the function runs, and the work uses every core instead of one (the GIL
makes threads no help for Python code).

- At most ``POLITE_PROCESS_MAX_IN_FLIGHT`` items are in the pool at once;
  ``process_item`` waits for a free place, which keeps the item's response in
  Scrapy's scraper, whose size limit then slows the downloads to the pool's pace.
- An item the pool cannot process is dropped, or passed on unchanged with
  ``POLITE_PROCESS_ON_ERROR = "keep"``, and the reason is logged: the
  function raised (with the worker's traceback), a field cannot be pickled
  (named), or its worker died every time it ran.
- A worker that dies (killed, segfault, ``os._exit``) breaks the pool: the
  pool is rebuilt, and every item that was in it runs again, each one alone,
  so that a death can be blamed on the one item that was running. Only a
  death while an item runs alone counts against it; after
  ``POLITE_PROCESS_RETRIES`` such retries the item is given up.
- A function that runs longer than ``POLITE_PROCESS_TIMEOUT`` seconds (no
  limit by default) is over time: the pool's workers are replaced, the item
  is retried alone or given up like one whose worker died, and the other items
  that were in the pool run again (they are not suspects).
- The pool starts in ``open_spider`` (which also checks that the workers can
  import the function) and is drained and shut down in ``close_spider``.
  Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group;
  the crawl decides when to stop) and exit by themselves if the crawl process
  dies.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pkgutil import resolve_name
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from itemadapter import ItemAdapter
from scrapy.exceptions import DropItem
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred, DeferredSemaphore

from scrapy_polite._settings import PoliteSettingError, get_choice, get_float, get_int

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from twisted.internet.base import DelayedCall, ReactorBase
    from typing_extensions import Self

__all__ = [
    "ON_ERROR",
    "START_METHODS",
    "ProcessConfig",
    "ProcessPipeline",
    "available_cores",
    "default_start_method",
]

logger = logging.getLogger(__name__)

START_METHODS = ("forkserver", "spawn", "fork")
# Items in the pool per worker, by default. Each hand-off between the reactor and the
# executor's threads can wait for the GIL (up to its 5 ms switch interval), so a fast
# function needs many items in flight to keep the workers busy: with 2 per worker, the
# bundle benchmark ran at 116 pages/s, with 16 per worker at 205 (stock Scrapy: 267).
_IN_FLIGHT_PER_WORKER = 16
ON_ERROR = ("drop", "keep")


def available_cores() -> int:
    """The number of cores this process may run on."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return int(count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``; never plain ``fork``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass(frozen=True)
class ProcessConfig:
    """Every setting of the process pipeline, read and validated once."""

    function: str  # the import path the workers load it by
    workers: int
    max_in_flight: int
    start_method: str
    retries: int
    on_error: str
    timeout: float  # 0: none

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> Self:
        workers = get_int(settings, "POLITE_PROCESS_WORKERS", available_cores(), minimum=1)
        methods = tuple(m for m in START_METHODS if m in multiprocessing.get_all_start_methods())
        return cls(
            function=_function_path(settings.get("POLITE_PROCESS_FUNCTION")),
            workers=workers,
            max_in_flight=get_int(
                settings, "POLITE_PROCESS_MAX_IN_FLIGHT", _IN_FLIGHT_PER_WORKER * workers, minimum=1
            ),
            start_method=get_choice(
                settings, "POLITE_PROCESS_START_METHOD", default_start_method(), methods
            ),
            retries=get_int(settings, "POLITE_PROCESS_RETRIES", 2, minimum=0),
            on_error=get_choice(settings, "POLITE_PROCESS_ON_ERROR", "drop", ON_ERROR),
            timeout=get_float(settings, "POLITE_PROCESS_TIMEOUT", 0, minimum=0),
        )


def _function_path(value: Any) -> str:
    """The import path of the ``POLITE_PROCESS_FUNCTION`` callable, checked here.

    The workers import the function by this path, so it is loaded once in the
    crawl process at start-up: a typo stops the crawl before it begins.
    """
    setting = "POLITE_PROCESS_FUNCTION"
    expected = "the import path of a function, such as 'myproject.textstats.compute'"
    if callable(value):
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if not module or not qualname or "<" in qualname:
            raise PoliteSettingError(setting, value, expected)
        path = f"{module}:{qualname}"
    elif isinstance(value, str) and value.strip():
        path = value.strip()
    else:
        raise PoliteSettingError(setting, value, expected)
    try:
        function = resolve_name(path)
    except Exception as error:
        raise PoliteSettingError(
            setting, value, f"{expected} ({type(error).__name__}: {error})"
        ) from None
    if callable(value) and function is not value:
        raise PoliteSettingError(
            setting, value, f"a function that can be imported by its name, {path}"
        )
    if not callable(function):
        raise PoliteSettingError(
            setting, value, f"a callable, not a {type(function).__name__} object"
        )
    return path


class ProcessPipeline:
    """Run ``POLITE_PROCESS_FUNCTION`` on each item in a pool of worker processes."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.config = ProcessConfig.from_settings(crawler.settings)
        assert crawler.stats is not None
        self.stats: StatsCollector = crawler.stats
        self._pool: _WorkerPool | None = None
        self._places = DeferredSemaphore(self.config.max_in_flight)
        self._in_flight = 0
        self._warned_types: set[type] = set()

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- life cycle -----------------------------------------------------------------
    async def open_spider(self, spider: Spider | None = None) -> None:
        config = self.config
        pool = _WorkerPool(config, self.stats)
        try:
            await pool.start()
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        from twisted.internet import reactor

        # A stop that does not close the spider (a second Ctrl-C) must not wait for the
        # items in flight: the interpreter would, at exit, for the pool's threads.
        cast("ReactorBase", reactor).addSystemEventTrigger("before", "shutdown", self._abandon)
        logger.info(
            "Process pipeline: %s in %d worker process(es) (%s), up to %d items in flight",
            config.function,
            config.workers,
            config.start_method,
            config.max_in_flight,
        )

    async def close_spider(self, spider: Spider | None = None) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            await pool.close()  # a stop at once meanwhile still finds it (_abandon)
        finally:
            self._pool = None

    def _abandon(self) -> None:
        """The reactor stops with the pool still open: kill the workers now."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        logger.warning(
            "Stopping at once: %d item(s) in the process pipeline are not finished",
            self._in_flight,
        )
        self.stats.inc_value("polite/process/abandoned", self._in_flight)
        pool.kill()

    # -- items ----------------------------------------------------------------------
    async def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        pool = self._pool
        if pool is None:
            raise DropItem("the process pipeline's worker pool is not running")
        stats = self.stats
        stats.inc_value("polite/process/items")
        waiting_since = monotonic()
        await maybe_deferred_to_future(self._places.acquire())
        _add_seconds(stats, "polite/process/wait_time", monotonic() - waiting_since)
        self._in_flight += 1
        stats.max_value("polite/process/in_flight_max", self._in_flight)
        try:
            return await self._process(item, pool)
        finally:
            self._in_flight -= 1
            self._places.release()

    async def _process(self, item: Any, pool: _WorkerPool) -> Any:
        fields = ItemAdapter(item).asdict()
        try:
            payload = _dumps(fields, "item")
        except _NotPicklableError as error:
            return self._not_processed(item, fields, "unpicklable", str(error))
        outcome = await maybe_deferred_to_future(pool.run(payload, _describe(fields)))
        try:
            pickled, seconds = outcome.result()
            # Our own worker wrote it, to the pool's private pipe: no one else could.
            result = pickle.loads(pickled)  # noqa: S301
        except DropItem:
            self.stats.inc_value("polite/process/dropped_by_function")
            raise
        except _FunctionError as error:
            self.stats.inc_value(f"polite/process/failed/{error.kind}")
            return self._not_processed(
                item, fields, "failed", f"{self.config.function} raised {error}", error.details
            )
        except _WorkerDiedError as error:
            return self._not_processed(item, fields, "gave_up", str(error))
        except Exception as error:  # e.g. the result names a class this process lacks
            return self._not_processed(
                item,
                fields,
                "failed",
                f"cannot read the result of {self.config.function}: "
                f"{type(error).__name__}: {error}",
            )
        self.stats.inc_value("polite/process/processed")
        _add_seconds(self.stats, "polite/process/time", seconds)
        return self._rebuild(item, result)

    def _not_processed(
        self, item: Any, fields: dict[str, Any], stat: str, reason: str, details: str = ""
    ) -> Any:
        """Log why *item* was not processed; drop it, or pass it on unchanged."""
        keep = self.config.on_error == "keep"
        self.stats.inc_value(f"polite/process/{stat}")
        if keep:
            self.stats.inc_value("polite/process/kept")
        logger.error(
            "Process pipeline could not process %s (%s it): %s%s",
            _describe(fields),
            "passing on" if keep else "dropping",
            reason,
            f"\n{details.rstrip()}" if details else "",
        )
        if keep:
            return item
        raise DropItem(reason)

    def _rebuild(self, item: Any, result: dict[str, Any]) -> Any:
        """The function's result, as an item of the original item's type if it can be one."""
        if type(item) is dict:
            return result
        try:
            if isinstance(item, dict):
                return type(item)(result)
            adapter = ItemAdapter(item)
            unknown = set(result) - set(adapter.field_names())
            if unknown:
                return self._retyped(item, result, f"no field {', '.join(sorted(unknown))}")
            for name in set(adapter.keys()) - set(result):
                del adapter[name]
            for name, value in result.items():
                adapter[name] = value
        except Exception as error:
            return self._retyped(item, result, f"{type(error).__name__}: {error}")
        return item

    def _retyped(self, item: Any, result: dict[str, Any], reason: str) -> dict[str, Any]:
        self.stats.inc_value("polite/process/retyped")
        if type(item) not in self._warned_types:
            self._warned_types.add(type(item))
            logger.warning(
                "%s returned fields that a %s cannot hold (%s): such items go on as dicts",
                self.config.function,
                type(item).__name__,
                reason,
            )
        return result


def _add_seconds(stats: StatsCollector, key: str, seconds: float) -> None:
    stats.set_value(key, round(stats.get_value(key, 0.0) + seconds, 6))


def _describe(fields: dict[str, Any]) -> str:
    url = fields.get("url")
    if isinstance(url, str):
        return f"the item of {url}"
    text = repr(fields)
    return f"the item {text[:200]}{'...' if len(text) > 200 else ''}"


# -- the pool ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    """One item on its way through the pool."""

    payload: bytes
    label: str  # for the log: "the item of <url>"
    done: Deferred[Future[tuple[bytes, float]]] = field(default_factory=Deferred)
    suspect: bool = False  # was in the pool when a worker died: runs again, alone
    deaths: int = 0  # worker deaths while this item ran alone, and times it ran over time
    overdue: bool = False  # ran over POLITE_PROCESS_TIMEOUT in its current run
    collateral: bool = False  # its worker was killed because another item ran over time
    watchdog: DelayedCall | None = None  # fires at POLITE_PROCESS_TIMEOUT


class _WorkerPool:
    """A ``ProcessPoolExecutor``, rebuilt when a worker dies, driven from the reactor thread.

    ``run`` returns a Deferred (awaitable on every reactor) that fires in the
    reactor thread with the item's finished ``concurrent.futures.Future``. The
    executor's own thread only hands finished futures over, with
    ``reactor.callFromThread``; all the bookkeeping happens in the reactor thread.
    """

    def __init__(self, config: ProcessConfig, stats: StatsCollector) -> None:
        self.config = config
        self.stats = stats
        self._context = multiprocessing.get_context(config.start_method)
        self._executor = self._new_executor()
        self._backlog: deque[_Job] = deque()  # not yet submitted, in order
        self._running: set[_Job] = set()  # submitted to the current executor
        self._solo: _Job | None = None  # a suspect running alone
        self._idle_waiters: list[Deferred[None]] = []

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.config.workers, mp_context=self._context, initializer=_init_worker
        )

    async def start(self) -> None:
        """Start every worker and have it import the function, in a thread."""
        from twisted.internet.threads import deferToThread

        function = self.config.function
        try:
            await maybe_deferred_to_future(
                deferToThread(_warm_up, self._executor, function, self.config.workers)
            )
        except _FunctionError as error:
            logger.error("A worker process failed to import %s:\n%s", function, error.details)
            raise PoliteSettingError(
                "POLITE_PROCESS_FUNCTION",
                function,
                f"a function the worker processes can import ({error}; traceback above)",
            ) from None
        except BrokenProcessPool as error:
            raise RuntimeError(
                f"the process pipeline's worker processes could not start ({error}); "
                "see their output above"
            ) from None

    def run(self, payload: bytes, label: str) -> Deferred[Future[tuple[bytes, float]]]:
        job = _Job(payload, label)
        self._backlog.append(job)
        self._pump()
        return job.done

    async def close(self) -> None:
        """Wait for every item to finish, then stop the workers (in a thread)."""
        from twisted.internet.threads import deferToThread

        while self._backlog or self._running:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            await maybe_deferred_to_future(waiter)
        await maybe_deferred_to_future(deferToThread(self._executor.shutdown, True))

    def kill(self) -> None:
        """Stop at once: kill the workers, forget every item."""
        self._backlog.clear()
        _kill_workers(self._executor)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scheduling -------------------------------------------------------------------
    def _pump(self) -> None:
        """Submit what may go: everything in order, except that a suspect runs alone.

        With a timeout, no more than one item per worker is submitted, so that
        each starts at once and its clock counts its own run only.
        """
        limited = bool(self.config.timeout)
        while self._backlog and self._solo is None:
            if limited and len(self._running) >= self.config.workers:
                return
            job = self._backlog[0]
            if job.suspect:
                if self._running:
                    return  # until the pool is empty
                self._solo = job
            self._backlog.popleft()
            self._submit(job)

    def _submit(self, job: _Job) -> None:
        from twisted.internet import reactor

        executor = self._executor
        try:
            future = executor.submit(_run_in_worker, self.config.function, job.payload)
        except BrokenProcessPool:
            # Broken before its futures told us so; this item never ran in it.
            self._restart(executor, explain=True)
            self._submit(job)
            return
        except Exception as error:  # e.g. once the interpreter is shutting down
            if self._solo is job:
                self._solo = None
            job.done.callback(_failed(error))
            return
        self._running.add(job)
        if self.config.timeout:
            clock = cast("ReactorBase", reactor)
            job.watchdog = clock.callLater(self.config.timeout, self._over_time, job, executor)
        future.add_done_callback(partial(reactor.callFromThread, self._finished, job, executor))

    def _over_time(self, job: _Job, executor: ProcessPoolExecutor) -> None:
        """*job* ran over the timeout: kill the workers; the pool breaks, as after a death."""
        job.watchdog = None
        if job not in self._running or executor is not self._executor:
            return
        for other in self._running:
            other.collateral = other is not job
        job.overdue = True
        self.stats.inc_value("polite/process/timed_out")
        logger.warning(
            "%s ran over POLITE_PROCESS_TIMEOUT (%s s) in a worker process: "
            "its workers are replaced, and the items that were in the pool run again",
            job.label,
            self.config.timeout,
        )
        _kill_workers(executor)

    def _finished(
        self, job: _Job, executor: ProcessPoolExecutor, future: Future[tuple[bytes, float]]
    ) -> None:
        self._running.discard(job)
        if job.watchdog is not None:
            if job.watchdog.active():
                job.watchdog.cancel()
            job.watchdog = None
        solo = self._solo is job
        if solo:
            self._solo = None
        if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
            self._worker_died(job, executor, solo)
        else:
            job.done.callback(future)
        self._pump()
        if not self._backlog and not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _worker_died(self, job: _Job, executor: ProcessPoolExecutor, solo: bool) -> None:
        over_time = job.overdue or job.collateral
        if executor is self._executor:
            self._restart(executor, explain=not solo and not over_time)
        if job.collateral:  # killed with the one over time: not a suspect, runs again
            job.collateral = False
            self.stats.inc_value("polite/process/retried")
            self._backlog.appendleft(job)
            return
        if job.overdue:
            self._over_time_again(job)
            return
        if not solo:
            # It shared the pool with others: the death cannot be blamed on it.
            job.suspect = True
            self.stats.inc_value("polite/process/retried")
            self._backlog.append(job)
            return
        if self._given_up(
            job,
            "its worker process died each time it ran ({deaths} times alone; "
            "POLITE_PROCESS_RETRIES = {retries})",
        ):
            return
        logger.warning(
            "A worker process died running %s alone; started new workers (retry %d of %d)",
            job.label,
            job.deaths,
            self.config.retries,
        )
        self._backlog.appendleft(job)

    def _over_time_again(self, job: _Job) -> None:
        """*job* ran over the timeout: the same count as a death while it ran alone."""
        job.overdue = False
        if self._given_up(
            job,
            f"it ran over POLITE_PROCESS_TIMEOUT ({self.config.timeout} s) or its worker "
            "died, {deaths} times (POLITE_PROCESS_RETRIES = {retries})",
        ):
            return
        job.suspect = True  # runs again alone
        self._backlog.appendleft(job)

    def _given_up(self, job: _Job, reason: str) -> bool:
        """Count one death (or run over time) against *job*; past ``POLITE_PROCESS_RETRIES``
        fail it with *reason* (``{deaths}``, ``{retries}`` filled in) and return True."""
        job.deaths += 1
        retries = self.config.retries
        if job.deaths <= retries:
            self.stats.inc_value("polite/process/retried")
            return False
        message = reason.format(deaths=job.deaths, retries=retries)
        job.done.callback(_failed(_WorkerDiedError(message)))
        return True

    def _restart(self, broken: ProcessPoolExecutor, *, explain: bool) -> None:
        if explain:
            logger.warning(
                "A worker process died; started new workers. The items that were in the pool "
                "run again, one at a time, to find the one at fault."
            )
        self.stats.inc_value("polite/process/worker_restarts")
        broken.shutdown(wait=False)  # its manager thread reaps the dead pool's processes
        self._executor = self._new_executor()


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    """SIGKILL every worker process of *executor* (``_processes`` is the
    executor's own table of them; it has no public way to stop one)."""
    processes = getattr(executor, "_processes", None) or {}
    for process in list(processes.values()):
        try:
            process.kill()
        except (OSError, ValueError):  # already gone, or already closed
            continue


def _failed(error: BaseException) -> Future[tuple[bytes, float]]:
    outcome: Future[tuple[bytes, float]] = Future()
    outcome.set_exception(error)
    return outcome


def _warm_up(executor: ProcessPoolExecutor, function: str, workers: int) -> None:
    """Start the workers (one per submitted check) and make sure they can load *function*."""
    checks = [executor.submit(_check_worker, function) for _ in range(workers)]
    for check in checks:
        check.result()


class _WorkerDiedError(Exception):
    """The worker running an item died, every time it ran."""


class _NotPicklableError(TypeError):
    """A field cannot be sent to (or back from) a worker process."""


class _FunctionError(Exception):
    """What the function raised in a worker: its type's name, message and traceback.

    The worker sends this instead of the exception itself, which might not be
    picklable, or might be a ``SystemExit`` that must not reach the reactor.
    """

    def __init__(self, kind: str, message: str, details: str) -> None:
        super().__init__(kind, message, details)
        self.kind = kind
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}" if self.message else self.kind


def _dumps(fields: dict[str, Any], what: str) -> bytes:
    """Pickle *fields*; if it fails, name the field at fault."""
    try:
        return pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        for name, value in fields.items():
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as field_error:
                raise _NotPicklableError(
                    f"{what} field {name!r} (a {type(value).__name__}) cannot be pickled "
                    f"for the worker processes: {field_error}"
                ) from None
        raise _NotPicklableError(f"the {what} cannot be pickled: {error}") from None


# -- in the worker processes ------------------------------------------------------------
def _init_worker() -> None:
    """Ignore Ctrl-C, and exit if the crawl process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the crawl process is gone
    os._exit(1)


def _check_worker(function: str) -> None:
    try:
        resolve_name(function)
    except BaseException as error:
        raise _FunctionError(type(error).__name__, str(error), traceback.format_exc()) from None


def _run_in_worker(function: str, payload: bytes) -> tuple[bytes, float]:
    """Run *function* on one item's fields: its pickled result, and the seconds it took."""
    started = time.perf_counter()
    try:
        # The crawl process wrote it, to the pool's private pipe.
        result = resolve_name(function)(pickle.loads(payload))  # noqa: S301
        if not isinstance(result, Mapping):
            raise TypeError(
                f"it returned a {type(result).__name__}, not a dict of the item's fields"
            )
        seconds = time.perf_counter() - started
        return _dumps(dict(result), "result"), seconds
    except DropItem as error:
        raise DropItem(str(error)) from None
    except _NotPicklableError as error:
        raise _FunctionError("NotPicklable", str(error), "") from None
    except BaseException as error:
        raise _FunctionError(type(error).__name__, str(error), traceback.format_exc()) from None
