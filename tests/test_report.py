"""The politeness report: built from what the crawl did, logged, written as JSON and HTML."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from scrapy import Spider
from scrapy.utils.test import get_crawler

from scrapy_polite.report import PolitenessReport, cluster_report, format_table, report_enabled
from scrapy_polite.testing.crawl import CrawlResult, crawl, finish_crawl, start_crawl
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Hit, Reply, Site

ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}}
PAGES_SPIDER = "tests.spiders.PagesSpider"
ROBOTS = "User-agent: *\nDisallow: /private\n"
HTML = [("Content-Type", "text/html")]


def _crawl_three_hosts(site: Site, tmp_path: Path, **extra):
    """Host 1 has a robots.txt forbidding /private, host 2 none (404) and a 404 page,
    host 3 answers 429 with Retry-After 1 once; 0.2 s between requests."""
    polite, plain, limited = site.hosts[:3]
    site.route(polite, "/robots.txt", Reply(200, ROBOTS, [("Content-Type", "text/plain")]))
    site.route(
        limited,
        "/busy",
        Reply(429, b"slow down", [("Retry-After", "1")]),
        Reply(200, b"<html><title>ok</title></html>", HTML),
    )
    urls = [site.url(polite, f"/p/{i}") for i in range(5)]
    urls += [site.url(polite, "/private/a"), site.url(polite, "/private/b")]
    urls += [site.url(plain, f"/p/{i}") for i in range(4)] + [site.url(plain, "/missing")]
    urls += [site.url(limited, "/busy")]
    settings = {
        **ADDON,
        "ROBOTSTXT_OBEY": True,
        "POLITE_DELAY": 0.2,
        "HTTPERROR_ALLOWED_CODES": [404],
        "POLITE_REPORT_JSON": str(tmp_path / "{spider}.json"),
        "POLITE_REPORT_HTML": str(tmp_path / "report.html"),
        **extra,
    }
    return crawl(PAGES_SPIDER, settings, args={"urls": json.dumps(urls)})


@dataclass
class ThreeHosts:
    site: Site
    hits: dict[str, list[Hit]]
    result: CrawlResult
    out: Path


@pytest.fixture(scope="module")
def three_hosts(_site_session: Site, tmp_path_factory: pytest.TempPathFactory) -> ThreeHosts:
    """One crawl for the tests of the JSON and HTML reports."""
    site = _site_session
    site.reset()
    out = tmp_path_factory.mktemp("report")
    result = _crawl_three_hosts(site, out)
    crawled = ThreeHosts(site, {h: site.hits(h) for h in site.hosts[:3]}, result, out)
    site.reset()
    return crawled


def _gaps(hits: list[Hit]) -> list[float]:
    times = sorted(h.time for h in hits)
    return [b - a for a, b in itertools.pairwise(times)]


def test_the_json_report_counts_per_domain_what_the_site_saw(three_hosts: ThreeHosts):
    site, hits, result, tmp_path = (
        three_hosts.site,
        three_hosts.hits,
        three_hosts.result,
        three_hosts.out,
    )
    polite, plain, limited = site.hosts[:3]
    report = json.loads((tmp_path / "pages.json").read_text())
    domains = report["domains"]
    assert set(domains) == {polite, plain, limited}
    assert report["spider"] == "pages"
    assert report["finish_reason"] == "finished"
    for host in (polite, plain, limited):
        entry = domains[host]
        # Requests and answers are the site's own count, robots.txt included.
        assert entry["requests"] == len(hits[host]), host
        assert sum(entry["responses"].values()) == len(hits[host]), host
        # The shortest gap is the floor as the crawler kept it, and as the site saw it.
        assert entry["gap_min"] >= 0.2 - 0.005, host
        assert abs(entry["gap_min"] - min(_gaps(hits[host]))) < 0.05, host
        assert entry["gap_min"] <= entry["gap_median"]
        assert entry["gap_min"] <= entry["gap_mean"]
        assert entry["configured_per_minute"] == 300.0  # one request per 0.2 s
        assert 0 < entry["requests_per_minute"] <= 300.0 * 1.05
    assert domains[polite]["responses"] == {"2xx": 6}  # robots.txt and 5 pages
    assert domains[polite]["robots"] == "file"
    assert domains[polite]["forbidden"] == 2
    assert domains[polite]["items"] == 5
    assert domains[plain]["responses"] == {"2xx": 4, "4xx": 2}  # robots.txt 404, /missing
    assert domains[plain]["robots"] == "unavailable"
    assert domains[plain]["forbidden"] == 0
    # The 429 is counted though the delay middleware turned it into a retry.
    assert domains[limited]["responses"] == {"2xx": 1, "4xx": 2}
    assert domains[limited]["backoff_answers"] == 1
    assert domains[limited]["waits_honoured"] == [1.0]
    assert domains[limited]["delay_source"] == "back-off"
    assert domains[polite]["delay_source"] == "POLITE_DELAY"
    assert domains[polite]["cache_hits"] == 0
    assert domains[polite]["cache_misses"] is None  # no cache
    assert "Politeness report for spider 'pages' (3 domains, finished)" in result.log
    assert f"Politeness report written to {tmp_path / 'pages.json'}" in result.log


def test_the_html_report_is_one_self_contained_page_with_a_chart_per_domain(
    three_hosts: ThreeHosts,
):
    site = three_hosts.site
    page = (three_hosts.out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 3
    assert page.count("<circle") >= 3  # a dot per gap
    for host in site.hosts[:3]:
        assert f"<td>{host}</td>" in page
    # Nothing to fetch: no script, stylesheet or image from anywhere.
    for tag in ("<script", "<link", "<img", "src=", "@import"):
        assert tag not in page


def test_a_cached_rerun_reports_hits_and_sends_only_robots_txt(
    site: Site, tmp_path: Path, redis_server: RedisServer
):
    host = site.hosts[0]
    urls = [site.url(host, f"/p/{i}") for i in range(4)]
    settings = {
        **ADDON,
        "ROBOTSTXT_OBEY": True,
        "POLITE_DELAY": 0,
        "HTTPCACHE_ENABLED": True,
        "POLITE_HTTPCACHE_REDIS_URL": redis_server.url,
        "POLITE_REPORT_JSON": str(tmp_path / "report.json"),
    }
    crawl(PAGES_SPIDER, settings, args={"urls": json.dumps(urls)})
    first = json.loads((tmp_path / "report.json").read_text())["domains"][host]
    assert (first["cache_hits"], first["cache_misses"]) == (0, 5)  # robots.txt is never cached
    site.reset()
    crawl(PAGES_SPIDER, settings, args={"urls": json.dumps(urls)})
    second = json.loads((tmp_path / "report.json").read_text())["domains"][host]
    assert (second["cache_hits"], second["cache_misses"]) == (4, 1)
    assert second["requests"] == len(site.hits(host)) == 1  # robots.txt only
    assert second["items"] == 4


def test_the_addon_runs_the_report_unless_it_is_switched_off():
    on = get_crawler(Spider, ADDON).settings
    assert report_enabled(on)
    off = get_crawler(Spider, {**ADDON, "POLITE_REPORT_ENABLED": False}).settings
    assert not report_enabled(off)
    assert not report_enabled(get_crawler(Spider, {}).settings)
    crawler = get_crawler(Spider, {"EXTENSIONS": {PolitenessReport: 0}})
    assert report_enabled(crawler.settings)


def test_the_table_has_a_line_per_domain_and_dashes_for_what_is_unknown():
    report = {
        "spider": "demo",
        "domains": {
            "a.example": {
                "requests": 1,
                "responses": {"2xx": 1},
                "gap_min": None,
                "gap_median": None,
                "gap_mean": None,
                "requests_per_minute": None,
                "configured_per_minute": 60.0,
                "delay_source": "POLITE_DELAY",
                "robots": "file",
                "forbidden": 0,
                "backoff_answers": 0,
                "waits_honoured": [],
                "cache_hits": 0,
                "cache_misses": None,
                "items": 1,
                "items_dropped": 0,
            }
        },
    }
    lines = format_table(report).splitlines()
    assert lines[0] == "Politeness report for spider 'demo' (1 domains, running)"
    assert lines[1].split()[0] == "domain"
    assert set(lines[2]) <= {"-", " "}
    row = lines[3].split()
    assert row[0] == "a.example"
    assert "-/-/-" in row  # no gap with one request
    assert "1/0/0/0" in row


def test_in_cluster_mode_the_workers_reports_merge_into_one_for_the_whole_cluster(
    site: Site, redis_server: RedisServer, tmp_path: Path
):
    hosts = site.hosts[:2]
    for host in hosts:
        site.set_pages(host, 8)
    settings = {
        **ADDON,
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_polite.cluster.DupeFilter",
        "REDIS_URL": redis_server.url,
        "POLITE_DELAY": 0.2,
        "POLITE_CLUSTER_LEASE": 3,
    }
    urls = json.dumps([site.url(h, "/") for h in hosts])
    started = [
        start_crawl("tests.spiders.SharedSpider", settings, args={"urls": urls}) for _ in range(2)
    ]
    results = [finish_crawl(*s, timeout=120) for s in started]
    assert all(r.returncode == 0 for r in results), results[0].log[-3000:]
    found = cluster_report(redis_server.client(), "shared")
    assert found is not None
    report, departures = found
    assert len(report["workers"]) == 2
    assert report["finish_reason"] == "2 workers: finished"
    for host in hosts:
        entry = report["domains"][host]
        assert entry["requests"] == len(site.hits(host)) == 9  # the index and 8 pages
        assert entry["items"] == 9
        assert len(departures[host]) == 9
        # The cluster's gaps are the site's: the floor holds across workers.
        assert entry["gap_min"] >= 0.2 - 0.005
        assert abs(entry["gap_min"] - min(site.gaps(host))) < 0.05
    # Each worker logs its own report, and the cluster's as far as it knows it.
    logs = "\n".join(r.log for r in results)
    assert logs.count("Politeness report for spider 'shared'") == 4
    assert "(2 domains, 2 workers: finished)" in logs
