"""The politeness report: how the crawl behaved towards each domain, from what it did.

:class:`PolitenessReport` is an extension (the add-on enables it). At the close
it logs one table, one line per domain, and writes the same account as JSON to
``POLITE_REPORT_JSON`` and as a self-contained HTML page (a chart of the gaps
per domain, no network needed to open it) to ``POLITE_REPORT_HTML`` when those
name files. :meth:`PolitenessReport.build` gives it on demand.

Every figure comes from what happened, never from the settings: the components
write into the crawler's :class:`Ledger` as they act (the delay middleware when
a download starts, when an answer comes back, before a retry can hide it, and
when it backs off; the robots.txt middleware when it learns a file's status or
forbids a request), and the extension itself counts the items from Scrapy's
signals. Without the delay middleware (``POLITE_DELAY_ENABLED = False``) the
report has no requests, answers nor gaps.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import statistics
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import load_object

from scrapy_polite._redis import KEY_PREFIX, RedisLink, RedisUnavailable, redis_url
from scrapy_polite._settings import PoliteSettingError, get_int, get_str

if TYPE_CHECKING:
    import redis
    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

__all__ = [
    "DomainAccount",
    "Ledger",
    "PolitenessReport",
    "cluster_report",
    "format_table",
    "ledger",
    "merge_reports",
    "render_html",
    "report_enabled",
    "report_key",
]

logger = logging.getLogger(__name__)

_CRAWLER_ATTRIBUTE = "_scrapy_polite_ledger"
# The report's row for the domains folded away past POLITE_REPORT_MAX_DOMAINS.
OTHER_DOMAINS = "(other domains)"
COMPONENT = "report"
# A worker's part of the cluster's report stays this long after its last write.
_REPORT_TTL = 7 * 86400
# Departures kept per domain (the latest) for the median, the chart and the cluster's merge.
_KEPT_DEPARTURES = 2000
_CHART_POINTS = 400


def report_enabled(settings: BaseSettings) -> bool:
    """Whether :class:`PolitenessReport` is among the crawl's extensions."""
    extensions = settings.getwithbase("EXTENSIONS")
    return any(
        load_object(path) is PolitenessReport
        for path, order in extensions.items()
        if order is not None
    )


def ledger(crawler: Crawler) -> Ledger:
    """The crawler's ledger, shared by the components that write into it."""
    found: Ledger | None = crawler.__dict__.get(_CRAWLER_ATTRIBUTE)
    if found is None:
        size = get_int(crawler.settings, "POLITE_REPORT_MAX_DOMAINS", 10_000, minimum=10)
        found = crawler.__dict__[_CRAWLER_ATTRIBUTE] = Ledger(size)
    return found


@dataclass
class DomainAccount:
    """What the crawl did to one domain (a download slot's key: its host)."""

    domain: str
    requests: int = 0  # downloads started (departures)
    responses: Counter[str] = field(default_factory=Counter)  # "2xx": n, from the site
    cache_hits: int = 0
    backoff_answers: int = 0  # 429/503 (POLITE_BACKOFF_HTTP_CODES)
    waits: list[float] = field(default_factory=list)  # Retry-After holds honoured, seconds
    robots: str = "not checked"
    forbidden: int = 0
    items: int = 0
    items_dropped: int = 0
    delay_source: str = ""  # where the current gap comes from
    configured_gap: float | None = None  # the mean gap the settings ask for, seconds
    first_departure: float = 0.0  # Unix time
    last_departure: float = 0.0
    gap_count: int = 0
    gap_min: float = float("inf")
    gap_sum: float = 0.0
    # The latest departures (Unix times), for the median, the chart and the cluster's merge.
    departures: deque[float] = field(default_factory=lambda: deque(maxlen=_KEPT_DEPARTURES))

    def departed(self, when: float) -> None:
        """A download started at Unix time *when*."""
        self.requests += 1
        self.departures.append(when)
        if self.requests == 1:
            self.first_departure = self.last_departure = when
            return
        gap = max(0.0, when - self.last_departure)
        self.last_departure = max(self.last_departure, when)
        self.gap_count += 1
        self.gap_min = min(self.gap_min, gap)
        self.gap_sum += gap

    def to_dict(self, *, cache_on: bool) -> dict[str, Any]:
        span = self.last_departure - self.first_departure
        achieved = 60 * self.gap_count / span if span > 0 else None
        configured = (
            60 / self.configured_gap if self.configured_gap and self.configured_gap > 0 else None
        )
        gaps = sorted(_gaps(list(self.departures)))
        return {
            "requests": self.requests,
            "responses": dict(sorted(self.responses.items())),
            "gap_min": _rounded(self.gap_min if self.gap_count else None),
            "gap_median": _rounded(statistics.median(gaps) if gaps else None),
            "gap_mean": _rounded(self.gap_sum / self.gap_count if self.gap_count else None),
            "requests_per_minute": _rounded(achieved, 1),
            "configured_per_minute": _rounded(configured, 1),
            "delay_source": self.delay_source or None,  # None: no request went out
            "robots": self.robots,
            "forbidden": self.forbidden,
            "backoff_answers": self.backoff_answers,
            "waits_honoured": [round(w, 3) for w in self.waits],
            "cache_hits": self.cache_hits,
            "cache_misses": sum(self.responses.values()) if cache_on else None,
            "items": self.items,
            "items_dropped": self.items_dropped,
        }


class Ledger:
    """One account per domain, written by the components as they act.

    At most *max_domains* accounts are kept: past that, the least recently
    written one is folded into :attr:`others` (its counts, not its gaps).
    """

    def __init__(self, max_domains: int = 10_000) -> None:
        self.domains: OrderedDict[str, DomainAccount] = OrderedDict()  # least recent first
        self.max_domains = max_domains
        self.others = DomainAccount(OTHER_DOMAINS)

    def account(self, domain: str) -> DomainAccount:
        found = self.domains.get(domain)
        if found is not None:
            self.domains.move_to_end(domain)
            return found
        found = self.domains[domain] = DomainAccount(domain)
        if len(self.domains) > self.max_domains:
            _, oldest = self.domains.popitem(last=False)
            self._fold(oldest)
        return found

    def _fold(self, account: DomainAccount) -> None:
        others = self.others
        others.requests += account.requests
        others.responses.update(account.responses)
        others.cache_hits += account.cache_hits
        others.backoff_answers += account.backoff_answers
        others.forbidden += account.forbidden
        others.items += account.items
        others.items_dropped += account.items_dropped
        others.robots = "-"
        others.delay_source = "-"


class PolitenessReport:
    """Extension: the per-domain politeness report, logged and written at the close."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.ledger = ledger(crawler)
        self.json_path = _path(crawler, "POLITE_REPORT_JSON")
        self.html_path = _path(crawler, "POLITE_REPORT_HTML")
        self.cache_on = crawler.settings.getbool("HTTPCACHE_ENABLED")
        # cluster.py imports robots.py, which writes into the ledger: imported here.
        from scrapy_polite.cluster import URL_SETTING, cluster_enabled

        self.cluster_url = (
            redis_url(crawler.settings, URL_SETTING) if cluster_enabled(crawler.settings) else None
        )
        self.started = time.time()
        crawler.signals.connect(self._item, signal=signals.item_scraped)
        crawler.signals.connect(self._dropped, signal=signals.item_dropped)
        crawler.signals.connect(self._opened, signal=signals.spider_opened)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # -- what the extension counts itself ----------------------------------------------
    def _opened(self) -> None:
        self.started = time.time()

    def _item(self, item: Any, response: Response | None) -> None:
        domain = self._domain(response.request) if response is not None else None
        if domain is not None:
            self.ledger.account(domain).items += 1

    def _dropped(self, item: Any, response: Response | None) -> None:
        domain = self._domain(response.request) if response is not None else None
        if domain is not None:
            self.ledger.account(domain).items_dropped += 1

    def _domain(self, request: Request | None) -> str | None:
        if request is None or self.crawler.engine is None:
            return None
        if not urlparse_cached(request).hostname:
            return None
        key: str = self.crawler.engine.downloader.get_slot_key(request)
        return key

    # -- the report ------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        """The report as a JSON-ready dict: the crawl, then ``"domains"``."""
        stats = self.crawler.stats.get_stats() if self.crawler.stats else {}
        domains = {
            name: self.ledger.domains[name].to_dict(cache_on=self.cache_on)
            for name in sorted(self.ledger.domains)
        }
        if self.ledger.others.requests or self.ledger.others.items:
            domains[OTHER_DOMAINS] = self.ledger.others.to_dict(cache_on=self.cache_on)
        spider = self.crawler.spider
        return {
            "spider": spider.name if spider is not None else None,
            "started": round(self.started, 3),
            "finished": round(time.time(), 3),
            "finish_reason": stats.get("finish_reason"),
            "items_processed_in_pool": stats.get("polite/process/processed"),
            "domains": domains,
        }

    def departures(self) -> dict[str, list[float]]:
        """The latest departures of each domain, Unix times."""
        return {name: list(a.departures) for name, a in self.ledger.domains.items()}

    async def _closed(self, spider: Spider) -> None:
        report = self.build()
        logger.info("%s", format_table(report), extra={"spider": spider})
        departures = self.departures()
        if self.cluster_url is not None:
            shared = await self._share(report, departures)
            if shared is not None:
                report["cluster"], departures = shared
                logger.info("%s", format_table(report["cluster"]), extra={"spider": spider})
        self._write(self.json_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
        # In cluster mode, the page shows the whole cluster, as far as it is known.
        self._write(self.html_path, render_html(report.get("cluster", report), departures))

    async def _share(
        self, report: dict[str, Any], departures: dict[str, list[float]]
    ) -> tuple[dict[str, Any], dict[str, list[float]]] | None:
        """Add this worker's report to the cluster's in Redis; the cluster's, merged."""
        from scrapy_polite.cluster import worker_id

        assert self.cluster_url is not None
        key = report_key(report["spider"] or "")
        entry = json.dumps({"report": report, "departures": departures})
        link = RedisLink.open(
            self.crawler, self.cluster_url, COMPONENT, "the report is this worker's only"
        )
        try:
            *_, found = await link.call(
                COMPONENT,
                ("HSET", key, worker_id(self.crawler), entry),
                ("EXPIRE", key, _REPORT_TTL),
                ("HGETALL", key),
            )
        except RedisUnavailable:
            return None
        finally:
            link.release()
        if isinstance(found, Exception):
            logger.warning("Could not read the cluster's report at %s: %s", key, found)
            return None
        return merge_reports(_decoded(found))

    def _write(self, path: Path | None, text: str) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as error:
            logger.error("Could not write the politeness report to %s: %s", path, error)
            return
        logger.info("Politeness report written to %s", path)


# -- the cluster's report -------------------------------------------------------------------
def report_key(spider: str) -> str:
    """The Redis hash of a spider's cluster report: one field per worker."""
    return f"{KEY_PREFIX}:report:{spider}"


def cluster_report(
    client: redis.Redis, spider: str
) -> tuple[dict[str, Any], dict[str, list[float]]] | None:
    """The cluster's report of *spider* as its workers left it in Redis (and every
    domain's departures), or ``None`` if no worker has written one."""
    entries = _decoded(client.hgetall(report_key(spider)))
    return merge_reports(entries) if entries else None


def merge_reports(
    entries: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The cluster's report from its workers' (worker id: ``{"report", "departures"}``),
    and every domain's departures, merged."""
    domains: dict[str, dict[str, Any]] = {}
    departures: dict[str, list[float]] = {}
    reports = [entry["report"] for entry in entries.values()]
    for entry in entries.values():
        for name, times in entry.get("departures", {}).items():
            departures.setdefault(name, []).extend(times)
        for name, part in entry["report"]["domains"].items():
            _add(domains.setdefault(name, _empty_domain()), part)
    for name, merged in domains.items():
        gaps = _gaps(departures.get(name, []))
        times = departures.get(name, [])
        span = max(times) - min(times) if times else 0
        merged["gap_min"] = _rounded(min(gaps) if gaps else None)
        merged["gap_median"] = _rounded(statistics.median(gaps) if gaps else None)
        merged["gap_mean"] = _rounded(sum(gaps) / len(gaps) if gaps else None)
        merged["requests_per_minute"] = _rounded(60 * len(gaps) / span if span > 0 else None, 1)
        # A worker that sent nothing there did not check: the others' status counts.
        statuses = merged["robots"] - {"not checked"} or {"not checked"}
        merged["robots"] = ", ".join(sorted(statuses))
        merged["delay_source"] = ", ".join(sorted(merged["delay_source"])) or None
        merged["responses"] = dict(sorted(merged["responses"].items()))
    reasons = sorted({str(r.get("finish_reason")) for r in reports})
    processed = [r.get("items_processed_in_pool") for r in reports]
    report = {
        "spider": reports[0]["spider"] if reports else None,
        "workers": sorted(entries),
        "started": min((r["started"] for r in reports), default=None),
        "finished": max((r["finished"] for r in reports), default=None),
        "finish_reason": f"{len(entries)} workers: {', '.join(reasons)}",
        "items_processed_in_pool": sum(n for n in processed if n) if any(processed) else None,
        "domains": dict(sorted(domains.items())),
    }
    return report, departures


_SUMMED = (
    "requests",
    "forbidden",
    "backoff_answers",
    "cache_hits",
    "items",
    "items_dropped",
)


def _empty_domain() -> dict[str, Any]:
    merged: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    merged |= {
        "responses": Counter(),
        "waits_honoured": [],
        "cache_misses": None,
        "robots": set(),
        "delay_source": set(),
        "configured_per_minute": None,
    }
    return merged


def _add(merged: dict[str, Any], part: dict[str, Any]) -> None:
    for name in _SUMMED:
        merged[name] += part.get(name) or 0
    merged["responses"].update(part.get("responses") or {})
    merged["waits_honoured"].extend(part.get("waits_honoured") or [])
    if part.get("cache_misses") is not None:
        merged["cache_misses"] = (merged["cache_misses"] or 0) + part["cache_misses"]
    merged["robots"].add(part.get("robots") or "not checked")
    if part.get("delay_source"):
        merged["delay_source"].add(part["delay_source"])
    asked = part.get("configured_per_minute")
    if asked is not None:
        merged["configured_per_minute"] = max(merged["configured_per_minute"] or 0, asked)


def _decoded(found: Any) -> dict[str, dict[str, Any]]:
    """The workers' entries from ``HGETALL``; an entry that is not ours is skipped."""
    entries: dict[str, dict[str, Any]] = {}
    for worker, raw in dict(found).items():
        try:
            entry = json.loads(raw)
            if isinstance(entry, dict) and isinstance(entry.get("report"), dict):
                entries[worker.decode() if isinstance(worker, bytes) else str(worker)] = entry
        except (ValueError, UnicodeDecodeError):
            continue
    return entries


# -- rendering ------------------------------------------------------------------------------
_COLUMNS = (
    ("domain", "domain"),
    ("requests", "requests"),
    ("2xx/3xx/4xx/5xx", "statuses"),
    ("gap min/median/mean s", "gaps"),
    ("req/min (asked)", "pace"),
    ("delay from", "delay_source"),
    ("robots.txt", "robots"),
    ("forbidden", "forbidden"),
    ("429/503 (waited s)", "backoff"),
    ("cache hit/miss", "cache"),
    ("items", "items"),
)


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table, one line per domain."""
    rows = [[title for title, _ in _COLUMNS]]
    for domain, entry in report["domains"].items():
        cells = _cells(domain, entry)
        rows.append([cells[key] for _, key in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    head = (
        f"Politeness report for spider {report['spider']!r} "
        f"({len(report['domains'])} domains, {report.get('finish_reason') or 'running'})"
    )
    return "\n".join([head, *lines])


def _cells(domain: str, entry: dict[str, Any]) -> dict[str, str]:
    responses = entry["responses"]
    pace = _number(entry["requests_per_minute"], 1)
    if entry["configured_per_minute"] is not None:
        pace += f" ({_number(entry['configured_per_minute'], 1)})"
    waits = sum(entry["waits_honoured"])
    misses = entry["cache_misses"]
    return {
        "domain": domain,
        "requests": str(entry["requests"]),
        "statuses": "/".join(str(responses.get(f"{c}xx", 0)) for c in "2345"),
        "gaps": "/".join(_number(entry[k], 3) for k in ("gap_min", "gap_median", "gap_mean")),
        "pace": pace,
        "delay_source": entry["delay_source"] or "-",
        "robots": entry["robots"],
        "forbidden": str(entry["forbidden"]),
        "backoff": f"{entry['backoff_answers']} ({waits:.1f})",
        "cache": f"{entry['cache_hits']}/{'-' if misses is None else misses}",
        "items": str(entry["items"]),
    }


def render_html(report: dict[str, Any], departures: dict[str, list[float]]) -> str:
    """A self-contained page: the table, and a chart of the gaps over time per domain
    (from each domain's *departures*, Unix times)."""
    title = f"Politeness report: {report['spider']}"
    rows = []
    for domain, entry in report["domains"].items():
        cells = _cells(domain, entry)
        rows.append("<tr>" + "".join(f"<td>{html.escape(cells[k])}</td>" for _, k in _COLUMNS))
    header = "".join(f"<th>{html.escape(t)}</th>" for t, _ in _COLUMNS)
    charts = [
        _chart(domain, sorted(departures.get(domain, ())), entry)
        for domain, entry in report["domains"].items()
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }}
figcaption {{ font-size: 0.85em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Finish reason: {html.escape(str(report["finish_reason"]))}.
Gaps are the seconds between two downloads to one domain, as the crawler started them.</p>
<table><tr>{header}</tr>
{chr(10).join(rows)}
</table>
{chr(10).join(charts)}
</body></html>
"""


def _chart(domain: str, times: list[float], entry: dict[str, Any]) -> str:
    width, height, pad = 360, 160, 30
    points = [(b - times[0], b - a) for a, b in itertools.pairwise(times)]
    if len(points) > _CHART_POINTS:
        step = len(points) / _CHART_POINTS
        points = [points[int(i * step)] for i in range(_CHART_POINTS)]
    if not points:
        body = f'<text x="{pad}" y="{height // 2}">no gaps (fewer than two requests)</text>'
    else:
        span = max(t for t, _ in points) or 1.0
        top = max(g for _, g in points) * 1.1 or 1.0
        dots = "".join(
            f'<circle cx="{pad + (width - 2 * pad) * t / span:.1f}" '
            f'cy="{height - pad - (height - 2 * pad) * g / top:.1f}" r="1.8"/>'
            for t, g in points
        )
        body = (
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            'stroke="#888"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
            f'<text x="{pad}" y="{height - 8}" font-size="10">0 s</text>'
            f'<text x="{width - pad}" y="{height - 8}" font-size="10" text-anchor="end">'
            f"{span:.0f} s</text>"
            f'<text x="2" y="{pad}" font-size="10">{top:.2f} s</text>'
            f'<g fill="#1f6fb2">{dots}</g>'
        )
    caption = html.escape(
        f"{domain}: {entry['requests']} requests, shortest gap "
        f"{_number(entry['gap_min'], 3)} s, median {_number(entry['gap_median'], 3)} s"
    )
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{caption}">{body}</svg><figcaption>{caption}</figcaption></figure>'
    )


def _gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in itertools.pairwise(ordered)]


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _path(crawler: Crawler, name: str) -> Path | None:
    value = get_str(crawler.settings, name, None, allow_none=True)
    if value is None or not value.strip():
        return None
    spider = getattr(crawler.spidercls, "name", "") or ""
    try:
        return Path(value.replace("{spider}", spider)).expanduser()
    except (TypeError, ValueError) as error:
        raise PoliteSettingError(name, value, f"a file path ({error})") from None
