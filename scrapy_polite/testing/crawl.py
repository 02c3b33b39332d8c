"""Run a real Scrapy crawl in a child process and collect what it produced.

Each crawl gets its own Python process, so each can pick its reactor (the
asyncio reactor, Scrapy's default, or Twisted's plain epoll reactor) and runs
exactly as ``scrapy crawl`` would. The child writes the scraped items (as
dicts) and the final stats to a JSON file that the parent reads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_SETTINGS",
    "REACTORS",
    "CrawlResult",
    "child_env",
    "crawl",
    "finish_crawl",
    "start_crawl",
]

REACTORS = {
    "asyncio": "twisted.internet.asyncioreactor.AsyncioSelectorReactor",
    "epoll": "twisted.internet.epollreactor.EPollReactor",
}

BASE_SETTINGS: dict[str, Any] = {
    "LOG_LEVEL": "INFO",
    "TELNETCONSOLE_ENABLED": False,
    "ROBOTSTXT_OBEY": False,
    "USER_AGENT": "PoliteTestBot/1.0 (+https://example.invalid/bot)",
}


@dataclass
class CrawlResult:
    items: list[dict[str, Any]]
    stats: dict[str, Any]
    log: str
    returncode: int

    def stat(self, key: str, default: Any = 0) -> Any:
        return self.stats.get(key, default)


def child_env(path: str | Path | None = None) -> dict[str, str]:
    """This process's environment, with *path* (default: the working directory,
    where spiders named by import path live) first on ``PYTHONPATH``."""
    env = dict(os.environ)
    first = str(path or Path.cwd())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH")]))
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return env


def start_crawl(
    spider: str,
    settings: dict[str, Any] | None = None,
    *,
    reactor: str = "asyncio",
    args: dict[str, Any] | None = None,
) -> tuple[subprocess.Popen[str], Path]:
    """Start a crawl; return the process and the path its results go to."""
    workdir = Path(tempfile.mkdtemp(prefix="polite-crawl-"))
    out = workdir / "result.json"
    spec = {
        "spider": spider,
        "settings": {**BASE_SETTINGS, **(settings or {}), "TWISTED_REACTOR": REACTORS[reactor]},
        "args": args or {},
        "out": str(out),
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    process = subprocess.Popen(
        [sys.executable, "-m", "scrapy_polite.testing.crawl", str(spec_path)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, out


def finish_crawl(process: subprocess.Popen[str], out: Path, timeout: float = 180) -> CrawlResult:
    log, _ = process.communicate(timeout=timeout)
    data = json.loads(out.read_text()) if out.exists() else {"items": [], "stats": {}}
    return CrawlResult(data["items"], data["stats"], log, process.returncode)


def crawl(
    spider: str,
    settings: dict[str, Any] | None = None,
    *,
    reactor: str = "asyncio",
    args: dict[str, Any] | None = None,
    timeout: float = 180,
    check: bool = True,
) -> CrawlResult:
    """Run one crawl to the end. With *check*, a failed crawl raises with its log."""
    result = finish_crawl(*start_crawl(spider, settings, reactor=reactor, args=args), timeout)
    if check and (result.returncode != 0 or "Traceback" in result.log):
        raise AssertionError(f"crawl failed (exit {result.returncode}):\n{result.log[-6000:]}")
    return result


def _run_child(spec_path: str) -> None:
    from itemadapter import ItemAdapter
    from scrapy import signals
    from scrapy.crawler import CrawlerProcess
    from scrapy.utils.misc import load_object

    spec = json.loads(Path(spec_path).read_text())
    items: list[dict[str, Any]] = []
    process = CrawlerProcess(spec["settings"])
    crawler = process.create_crawler(load_object(spec["spider"]))

    def on_item(item: Any) -> None:
        items.append(ItemAdapter(item).asdict())

    crawler.signals.connect(on_item, signal=signals.item_scraped)
    process.crawl(crawler, **spec["args"])
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    Path(spec["out"]).write_text(json.dumps({"items": items, "stats": stats}, default=str))


if __name__ == "__main__":
    _run_child(sys.argv[1])
