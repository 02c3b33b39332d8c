"""``scrapy polite-report``: the cluster's politeness report, on demand, from Redis.

Every worker of a cluster adds its report to Redis when it closes
(:mod:`scrapy_polite.report`); this command merges what is there, at any time,
and prints the table, or writes it as JSON or HTML::

    scrapy polite-report myspider
    scrapy polite-report myspider --json report.json --html report.html
    scrapy polite-report myspider --clear          # forget it, before a new crawl

The Redis URL comes from the project's settings (``POLITE_CLUSTER_REDIS_URL``,
``POLITE_REDIS_URL``, ``REDIS_URL``), ``-s``, or ``--redis-url``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from scrapy_polite._redis import RedisLink, command_redis_url, redact
from scrapy_polite.cluster import URL_SETTING
from scrapy_polite.report import cluster_report, format_table, render_html, report_key

if TYPE_CHECKING:
    import argparse

__all__ = ["PoliteReportCommand"]


class PoliteReportCommand(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings: ClassVar[dict[str, Any]] = {"LOG_ENABLED": False}

    def syntax(self) -> str:
        return "SPIDER [--json FILE] [--html FILE] [--clear] [--redis-url URL]"

    def short_desc(self) -> str:
        return "Show the politeness report a cluster's workers left in Redis"

    def long_desc(self) -> str:
        return (
            "Merges the reports the workers of SPIDER's cluster wrote to Redis when they "
            "closed, and prints the table (--json, --html: also write it). --clear deletes "
            "them, so that the next crawl's report starts empty. The Redis URL comes from "
            "POLITE_CLUSTER_REDIS_URL, POLITE_REDIS_URL, REDIS_URL, -s, or --redis-url."
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
        parser.add_argument("--html", metavar="FILE", help="write the report as an HTML page")
        parser.add_argument("--clear", action="store_true", help="delete the report")
        parser.add_argument("--redis-url", metavar="URL", help="the cluster's Redis")

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        assert self.settings is not None
        if len(args) != 1:
            raise UsageError("name the spider whose report to show", print_help=False)
        spider = args[0]
        url = command_redis_url(self.settings, URL_SETTING, opts.redis_url)
        link = RedisLink.standalone(self.settings, url)
        try:
            if opts.clear:
                deleted = link.client.delete(report_key(spider))
                print(f"{spider}: report {'deleted' if deleted else 'not found'}")
                return
            found = cluster_report(link.client, spider)
        except redis.RedisError as exc:
            print(f"Redis at {redact(url)}: {type(exc).__name__}: {exc}")
            self.exitcode = 1
            return
        finally:
            link.release()
        if found is None:
            print(f"No politeness report for spider {spider!r} at {redact(url)}")
            self.exitcode = 1
            return
        report, departures = found
        print(format_table(report))
        print(f"workers: {', '.join(report['workers'])}")
        if opts.json:
            Path(opts.json).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        if opts.html:
            Path(opts.html).write_text(render_html(report, departures), encoding="utf-8")
