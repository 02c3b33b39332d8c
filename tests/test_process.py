"""The process pipeline, in real crawls with real worker processes."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import scrapy
from itemadapter import ItemAdapter
from scrapy import signals
from scrapy.exceptions import DropItem
from scrapy.http import Response
from scrapy.settings import Settings

from scrapy_polite import PoliteSettingError
from scrapy_polite.process import ProcessConfig, available_cores
from scrapy_polite.testing.crawl import crawl, finish_crawl, start_crawl
from scrapy_polite.testing.site import Site

WORK = "tests.test_process.work"
PIPELINE = {"POLITE_DELAY_ENABLED": False, "EXTENSIONS": {"tests.test_process.CrawlProbe": 0}}
ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}, "POLITE_PROCESS_FUNCTION": WORK, **PIPELINE}


# -- what the tests run: the function, a spider, a probe ---------------------------------
def text_stats(text: str) -> dict[str, Any]:
    words = re.findall(r"[a-z]+", text.lower())
    return {
        "words": len(words),
        "top": [word for word, _ in Counter(words).most_common(3)],
        "sha256": sha256(text.encode()).hexdigest(),
    }


def work(fields: dict[str, Any]) -> dict[str, Any]:
    """The function under test: text statistics, with misbehaviours the item asks for."""
    if fields.get("pid_dir"):
        Path(fields["pid_dir"], str(os.getpid())).touch()
    if fields.get("die"):
        _die(fields)
    if fields.get("fail"):
        raise ValueError(f"no statistics for {fields['url']}")
    if fields.get("drop"):
        raise DropItem(f"the function does not want {fields['url']}")
    if fields.get("exit"):
        raise SystemExit(3)
    if fields.get("hang"):
        time.sleep(3600)  # a function that never returns
    burn_until = time.perf_counter() + fields.get("burn", 0)
    while time.perf_counter() < burn_until:  # CPU work, holding the GIL
        pass
    time.sleep(fields.get("sleep", 0))
    return {**fields, **text_stats(fields["text"]), "pid": os.getpid(), "done_at": time.time()}


def _die(fields: dict[str, Any]) -> None:
    """Die as asked: every time, or only the first time (a marker file remembers)."""
    marker = fields.get("marker")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).touch()
    how = fields["die"]
    if how == "exit":
        os._exit(7)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segfault":
        ctypes.string_at(0)
    time.sleep(5)  # a signal may take a moment to land


class PageItem(scrapy.Item):
    url = scrapy.Field()
    n = scrapy.Field()
    text = scrapy.Field()
    crawl_pid = scrapy.Field()
    words = scrapy.Field()
    top = scrapy.Field()
    sha256 = scrapy.Field()
    pid = scrapy.Field()
    done_at = scrapy.Field()


@dataclass
class PageRecord:
    """An item type that cannot hold the function's extra fields."""

    url: str
    n: int
    text: str
    crawl_pid: int


class ItemsSpider(scrapy.Spider):
    """One item per page. ``extra`` fields go into every item, ``marks`` into item n.

    ``kind="mixed"`` yields a :class:`PageItem` for even pages and a
    :class:`PageRecord` for odd ones; a mark ``{"unpicklable": true}`` puts a
    lock in the item.
    """

    name = "process_items"

    def __init__(
        self, urls: str = "[]", extra: str = "{}", marks: str = "{}", kind: str = "dict", **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.start_urls = json.loads(urls)
        self.extra = json.loads(extra)
        self.marks = json.loads(marks)
        self.kind = kind

    def parse(self, response: Response) -> Iterator[Any]:
        n = int(response.url.rsplit("/", 1)[1])
        fields = {
            "url": response.url,
            "n": n,
            "text": " ".join(response.css("p::text").getall()),
            "crawl_pid": os.getpid(),
            **self.extra,
            **self.marks.get(str(n), {}),
        }
        if fields.pop("unpicklable", False):
            fields["lock"] = threading.Lock()
        if self.kind == "mixed":
            yield PageItem(**fields) if n % 2 == 0 else PageRecord(**fields)
        else:
            yield fields


class InlinePipeline:
    """The control: the same function, run in the reactor thread."""

    def process_item(self, item: Any, spider: Any = None) -> Any:
        return work(ItemAdapter(item).asdict())


class CrawlProbe:
    """Test extension: the reactor's lag, the types of the items scraped, the closing time.

    Every 10 ms a timer measures how late the reactor runs it; the worst and
    the 95th percentile go to the stats as ``probe/lag_max`` and ``probe/lag_p95``.
    """

    INTERVAL = 0.01

    def __init__(self, crawler: Any) -> None:
        self.stats = crawler.stats
        self.lags: list[float] = []
        self.call: Any = None
        self.due = 0.0
        crawler.signals.connect(self.opened, signal=signals.spider_opened)
        crawler.signals.connect(self.scraped, signal=signals.item_scraped)
        crawler.signals.connect(self.closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Any) -> CrawlProbe:
        return cls(crawler)

    def opened(self, spider: Any) -> None:
        self.schedule()

    def schedule(self) -> None:
        from twisted.internet import reactor

        self.due = time.monotonic() + self.INTERVAL
        self.call = reactor.callLater(self.INTERVAL, self.tick)

    def tick(self) -> None:
        self.lags.append(max(0.0, time.monotonic() - self.due))
        self.schedule()

    def scraped(self, item: Any) -> None:
        self.stats.inc_value(f"probe/item_type/{type(item).__name__}")

    def closed(self, spider: Any) -> None:
        self.stats.set_value("probe/closed_at", time.time())
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.lags:
            lags = sorted(self.lags)
            self.stats.set_value("probe/lag_max", lags[-1])
            self.stats.set_value("probe/lag_p95", lags[int(0.95 * (len(lags) - 1))])
            self.stats.set_value("probe/ticks", len(lags))


def _urls(site: Site, count: int, host: str | None = None) -> list[str]:
    return [site.url(host or site.hosts[0], f"/p/{i}") for i in range(count)]


def _run(site: Site, settings: dict[str, Any], count: int, **args: Any) -> Any:
    spider_args = {"urls": json.dumps(_urls(site, count))}
    reactor = args.pop("reactor", "asyncio")
    check = args.pop("check", True)
    spider_args.update({k: json.dumps(v) if k != "kind" else v for k, v in args.items()})
    return crawl(
        "tests.test_process.ItemsSpider", settings, args=spider_args, reactor=reactor, check=check
    )


def _assert_accounted_for(result: Any) -> None:
    """Every item that entered the pipeline came out of it, one way or another."""
    outcomes = ("processed", "failed", "unpicklable", "gave_up", "dropped_by_function")
    assert result.stat("polite/process/items") == sum(
        result.stat(f"polite/process/{outcome}") for outcome in outcomes
    ), result.stats


# -- results ------------------------------------------------------------------------------
@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_items_come_back_with_what_the_function_computed_in_a_worker(site: Site, reactor: str):
    result = _run(site, {**ADDON, "POLITE_PROCESS_WORKERS": 2}, 24, reactor=reactor)
    assert len(result.items) == 24
    for item in result.items:
        assert {k: item[k] for k in ("words", "top", "sha256")} == text_stats(item["text"])
        assert item["pid"] != item["crawl_pid"]  # computed in another process
    assert {item["n"] for item in result.items} == set(range(24))
    assert len({item["pid"] for item in result.items}) <= 2
    assert result.stat("polite/process/items") == result.stat("polite/process/processed") == 24
    assert 0 < result.stat("polite/process/time") < 24  # seconds spent in the function
    assert result.stat("polite/process/in_flight_max") <= 32  # 2 workers x 16
    # The spider closed after the last item had been computed.
    assert result.stat("probe/closed_at") >= max(item["done_at"] for item in result.items)
    assert "process pipeline on (tests.test_process.work)" in result.log


def test_items_keep_their_type_unless_it_cannot_hold_the_result(site: Site):
    result = _run(site, ADDON, 12, kind="mixed")
    assert len(result.items) == 12
    assert all("sha256" in item for item in result.items)
    # PageItem declares the new fields; the PageRecord dataclass does not.
    assert result.stat("probe/item_type/PageItem") == 6
    assert result.stat("probe/item_type/dict") == 6
    assert result.stat("polite/process/retyped") == 6
    assert result.log.count("a PageRecord cannot hold (no field done_at, pid, sha256") == 1


# -- the reactor and back-pressure ------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "reactor"),
    [("process", "asyncio"), ("process", "epoll"), ("inline", "asyncio")],
)
def test_reactor_stays_responsive_while_the_function_burns_cpu_in_workers(
    site: Site, where: str, reactor: str
):
    burn = 0.5
    settings = (
        {**ADDON, "POLITE_PROCESS_WORKERS": 2}
        if where == "process"
        else {
            **PIPELINE,
            "ITEM_PIPELINES": {"tests.test_process.InlinePipeline": 300},
        }
    )
    result = _run(site, settings, 6, extra={"burn": burn}, reactor=reactor)
    assert len(result.items) == 6
    lag_max, lag_p95 = result.stat("probe/lag_max"), result.stat("probe/lag_p95")
    if where == "inline":
        # The probe sees a blocked reactor: the control that shows it can fail.
        assert lag_max >= burn * 0.9, result.stats
    else:
        # 6 x 0.5 s on 2 workers lasts over 1.5 s: the 10 ms timer kept running meanwhile.
        assert result.stat("probe/ticks") > 40, result.stats
        # Loose ceilings (the machine is shared), still far below one item's burn.
        assert lag_max < burn * 0.6, result.stats
        assert lag_p95 < 0.05, result.stats


def test_no_more_items_in_flight_than_the_limit_and_the_spider_waits_for_them(site: Site):
    settings = {**ADDON, "POLITE_PROCESS_WORKERS": 1, "POLITE_PROCESS_MAX_IN_FLIGHT": 2}
    result = _run(site, settings, 8, extra={"sleep": 0.2})
    assert len(result.items) == 8
    assert result.stat("polite/process/in_flight_max") == 2
    # 8 items for 2 places, served at 0.2 s each: the 6 last ones wait, for 4.2 s in all
    # if they all arrive at once (less if their downloads straggle). Without waiting, ~0.
    assert result.stat("polite/process/wait_time") >= 1.0
    assert result.stat("probe/closed_at") >= max(item["done_at"] for item in result.items)


# -- workers that die ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["exit", "sigkill", "segfault"])
def test_worker_killed_mid_item_is_replaced_and_the_item_retried(
    site: Site, tmp_path: Path, how: str
):
    marks = {"5": {"die": how, "marker": str(tmp_path / "died")}}
    settings = {**ADDON, "POLITE_PROCESS_WORKERS": 2}
    result = _run(site, settings, 12, marks=marks, extra={"sleep": 0.05})
    assert (tmp_path / "died").exists()
    assert sorted(item["n"] for item in result.items) == list(range(12))
    assert (
        next(i for i in result.items if i["n"] == 5)["sha256"]
        == text_stats(next(i for i in result.items if i["n"] == 5)["text"])["sha256"]
    )
    assert result.stat("polite/process/worker_restarts") == 1
    assert result.stat("polite/process/retried") >= 1  # the item 5, and whoever shared the pool
    assert result.stat("polite/process/gave_up") == 0
    assert result.stat("polite/process/processed") == 12
    _assert_accounted_for(result)


def test_item_that_always_kills_its_worker_is_given_up_and_only_that_one(site: Site):
    marks = {"3": {"die": "exit"}}
    settings = {**ADDON, "POLITE_PROCESS_WORKERS": 2, "POLITE_PROCESS_RETRIES": 1}
    result = _run(site, settings, 10, marks=marks, extra={"sleep": 0.05}, check=False)
    assert result.returncode == 0
    assert sorted(item["n"] for item in result.items) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert result.stat("polite/process/gave_up") == 1
    # The first death, in company, is nobody's; then it dies alone, and once more alone.
    assert result.stat("polite/process/worker_restarts") == 3
    assert result.stat("polite/process/processed") == 9
    url = site.url(site.hosts[0], "/p/3")
    assert re.search(
        rf"could not process the item of {re.escape(url)} \(dropping it\): its worker process "
        r"died each time it ran \(2 times alone; POLITE_PROCESS_RETRIES = 1\)",
        result.log,
    ), result.log[-3000:]
    _assert_accounted_for(result)


def test_a_function_that_never_returns_is_timed_out_retried_alone_then_given_up(site: Site):
    marks = {"3": {"hang": True}}
    settings = {
        **ADDON,
        "POLITE_PROCESS_WORKERS": 2,
        "POLITE_PROCESS_RETRIES": 1,
        "POLITE_PROCESS_TIMEOUT": 1.5,
    }
    result = _run(site, settings, 10, marks=marks, extra={"sleep": 0.05}, check=False)
    assert result.returncode == 0
    assert result.stat("finish_reason") == "finished"
    assert sorted(item["n"] for item in result.items) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    # Over time in company, then once more alone: given up, as with POLITE_PROCESS_RETRIES = 1.
    assert result.stat("polite/process/timed_out") == 2
    assert result.stat("polite/process/worker_restarts") == 2
    assert result.stat("polite/process/gave_up") == 1
    assert result.stat("polite/process/processed") == 9
    url = site.url(site.hosts[0], "/p/3")
    assert result.log.count(f"the item of {url} ran over POLITE_PROCESS_TIMEOUT (1.5 s)") == 2
    assert re.search(
        rf"could not process the item of {re.escape(url)} \(dropping it\): it ran over "
        r"POLITE_PROCESS_TIMEOUT \(1.5 s\) or its worker died, 2 times",
        result.log,
    ), result.log[-3000:]
    _assert_accounted_for(result)


# -- stopping --------------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = {child for child, ppid in parents.items() if ppid == parent}
        todo += children - found
        found |= children
    return found


def _running(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie (an exited process not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _crawl_with_busy_workers(
    site: Site, pid_dir: Path, sleep: float = 0.5
) -> tuple[Any, Path, set[int]]:
    """Start a 40-page crawl of slow items; return once both workers are busy.

    Also returns every process the crawl has started by then (workers, fork
    server, resource tracker).
    """
    settings = {**ADDON, "DOWNLOAD_DELAY": 0.1}
    settings |= {"POLITE_PROCESS_WORKERS": 2, "POLITE_PROCESS_MAX_IN_FLIGHT": 4}
    extra = {"sleep": sleep, "pid_dir": str(pid_dir)}
    args = {"urls": json.dumps(_urls(site, 40)), "extra": json.dumps(extra)}
    process, out = start_crawl("tests.test_process.ItemsSpider", settings, args=args)
    deadline = time.monotonic() + 60
    while len(list(pid_dir.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = {int(path.name) for path in pid_dir.iterdir()}
    spawned = _descendants(process.pid)
    if len(workers) != 2 or not workers <= spawned:
        process.kill()
        raise AssertionError(f"the workers never started:\n{finish_crawl(process, out).log}")
    return process, out, spawned


def _assert_all_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)], "processes left behind"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_crawl_finishes_items_in_flight_and_leaves_no_process(
    site: Site, tmp_path: Path, sig: signal.Signals
):
    process, out, spawned = _crawl_with_busy_workers(site, tmp_path)
    try:
        process.send_signal(sig)
        if sig == signal.SIGINT:
            for pid in spawned:  # a terminal's Ctrl-C reaches the whole process group
                os.kill(pid, signal.SIGINT)
        result = finish_crawl(process, out, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert result.returncode == 0, result.log[-3000:]
    assert result.stat("finish_reason") == "shutdown"
    assert 0 < len(result.items) < 40
    # Every item the pipeline had accepted was finished, none failed or was lost.
    assert result.stat("polite/process/items") == result.stat("polite/process/processed")
    assert result.stat("polite/process/processed") == len(result.items)
    assert result.stat("polite/process/worker_restarts") == 0
    _assert_all_gone(spawned)


def test_a_second_sigint_stops_at_once_and_leaves_no_process(site: Site, tmp_path: Path):
    # Items of 20 s each: a graceful stop would wait for the ones in flight.
    process, out, spawned = _crawl_with_busy_workers(site, tmp_path, sleep=20)
    try:
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)  # the user insists
        second = time.monotonic()
        result = finish_crawl(process, out, timeout=60)
        stopped_after = time.monotonic() - second
    finally:
        if process.poll() is None:
            process.kill()
    assert "forcing unclean shutdown" in result.log
    assert stopped_after < 10  # not the 20 s the items in flight still had to run
    _assert_all_gone(spawned)


def test_workers_exit_by_themselves_when_the_crawl_process_is_killed(site: Site, tmp_path: Path):
    process, out, spawned = _crawl_with_busy_workers(site, tmp_path)
    process.kill()  # SIGKILL: no shutdown code runs in the crawl process
    finish_crawl(process, out, timeout=60)
    _assert_all_gone(spawned)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_error", ["drop", "keep"])
def test_function_errors_are_logged_with_the_workers_traceback(site: Site, on_error: str):
    marks = {"2": {"fail": True}, "4": {"drop": True}, "6": {"exit": True}}
    settings = {**ADDON, "POLITE_PROCESS_ON_ERROR": on_error}
    result = _run(site, settings, 8, marks=marks, check=False)
    assert result.returncode == 0
    url = site.url(site.hosts[0], "/p/2")
    # The worker's traceback, down to the line that raised.
    assert "raise ValueError(f\"no statistics for {fields['url']}\")" in result.log
    assert f"ValueError: no statistics for {url}" in result.log
    assert result.stat("polite/process/failed") == 2
    assert result.stat("polite/process/failed/ValueError") == 1
    assert result.stat("polite/process/failed/SystemExit") == 1
    assert result.stat("polite/process/dropped_by_function") == 1  # DropItem always drops
    assert result.stat("polite/process/worker_restarts") == 0
    kept = sorted(item["n"] for item in result.items)
    if on_error == "drop":
        assert kept == [0, 1, 3, 5, 7]
        assert f"Dropped: tests.test_process.work raised ValueError: no statistics for {url}" in (
            result.log
        )
    else:
        assert kept == [0, 1, 2, 3, 5, 6, 7]
        unchanged = next(item for item in result.items if item["n"] == 2)
        assert "sha256" not in unchanged
        assert result.stat("polite/process/kept") == 2
    _assert_accounted_for(result)


def test_unpicklable_item_is_dropped_naming_the_field(site: Site):
    result = _run(site, ADDON, 6, marks={"1": {"unpicklable": True}}, check=False)
    assert result.returncode == 0
    assert sorted(item["n"] for item in result.items) == [0, 2, 3, 4, 5]
    assert result.stat("polite/process/unpicklable") == 1
    assert "item field 'lock' (a lock) cannot be pickled for the worker processes" in result.log
    _assert_accounted_for(result)


def test_bad_function_path_stops_the_crawl_at_start_up(site: Site):
    settings = {**ADDON, "POLITE_PROCESS_FUNCTION": "tests.test_process.no_such_function"}
    result = _run(site, settings, 3, check=False)
    assert result.items == []
    assert not site.page_hits()
    assert "Invalid setting POLITE_PROCESS_FUNCTION='tests.test_process.no_such_function'" in (
        result.log
    )


def test_function_the_workers_cannot_import_stops_the_crawl_at_start_up(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "parent_only.py").write_text(
        "import multiprocessing\n"
        "if multiprocessing.parent_process() is not None:\n"
        "    raise ImportError('no workers here')\n"
        "def compute(item):\n"
        "    return item\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    result = _run(site, {**ADDON, "POLITE_PROCESS_FUNCTION": "parent_only.compute"}, 3, check=False)
    assert result.items == []
    assert not site.page_hits()
    assert "A worker process failed to import parent_only.compute" in result.log
    assert 'parent_only.py", line 3, in <module>' in result.log  # the worker's traceback
    assert (
        "Invalid setting POLITE_PROCESS_FUNCTION='parent_only.compute': expected a function the "
        "worker processes can import (ImportError: no workers here; traceback above)"
    ) in result.log


# -- settings ------------------------------------------------------------------------------------
def test_defaults_use_every_core_and_a_start_method_safe_with_threads():
    config = ProcessConfig.from_settings(Settings({"POLITE_PROCESS_FUNCTION": WORK}))
    assert config.function == WORK
    assert config.workers == available_cores() == len(os.sched_getaffinity(0))
    assert config.max_in_flight == 16 * config.workers
    assert config.start_method == "forkserver"
    assert (config.retries, config.on_error) == (2, "drop")


def test_function_given_as_an_object_is_sent_by_its_import_path():
    config = ProcessConfig.from_settings(Settings({"POLITE_PROCESS_FUNCTION": work}))
    assert config.function == "tests.test_process:work"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("POLITE_PROCESS_FUNCTION", None, "expected the import path of a function"),
        ("POLITE_PROCESS_FUNCTION", "nosuchmodule.f", "ModuleNotFoundError"),
        ("POLITE_PROCESS_FUNCTION", "tests.test_process.WORK", "a callable, not a str object"),
        ("POLITE_PROCESS_FUNCTION", lambda item: item, "expected the import path of a function"),
        ("POLITE_PROCESS_WORKERS", 0, "at least 1"),
        ("POLITE_PROCESS_MAX_IN_FLIGHT", "many", "a whole number"),
        ("POLITE_PROCESS_START_METHOD", "thread", "one of 'forkserver', 'spawn', 'fork'"),
        ("POLITE_PROCESS_RETRIES", -1, "at least 0"),
        ("POLITE_PROCESS_ON_ERROR", "ignore", "one of 'drop', 'keep'"),
        ("POLITE_PROCESS_TIMEOUT", -1, "at least 0"),
        ("POLITE_PROCESS_TIMEOUT", "soon", "a number"),
    ],
)
def test_bad_settings_are_rejected_naming_the_setting(name: str, value: Any, message: str):
    settings = Settings({"POLITE_PROCESS_FUNCTION": WORK, name: value})
    with pytest.raises(PoliteSettingError, match=f"Invalid setting {name}=") as error:
        ProcessConfig.from_settings(settings)
    assert message in str(error.value)
