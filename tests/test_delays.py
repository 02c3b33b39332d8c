"""Jittered per-domain delays, measured at the site."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.crawl import crawl
from tests.site import Site

ADDON = {"ADDONS": {"scrapy_polite.Addon": 100}}


def _urls(site: Site, host: str, count: int) -> list[str]:
    return [site.url(host, f"/p/{i}") for i in range(count)]


@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_uniform_delay_spaces_each_host_and_hosts_run_in_parallel(site: Site, reactor: str):
    hosts = site.hosts[:3]
    urls = [u for host in hosts for u in _urls(site, host, 14)]
    result = crawl(
        "tests.spiders.PagesSpider",
        {**ADDON, "POLITE_DELAY": [0.3, 0.6], "CONCURRENT_REQUESTS_PER_DOMAIN": 2},
        args={"urls": json.dumps(urls)},
        reactor=reactor,
    )
    assert len(result.items) == len(urls)
    all_gaps = []
    for host in hosts:
        gaps = site.gaps(host)
        assert len(gaps) == 13
        assert min(gaps) >= 0.3 - 0.005, gaps  # the floor holds (timer resolution aside)
        all_gaps += gaps
    mean = statistics.mean(all_gaps)
    assert 0.45 * 0.9 <= mean <= 0.45 * 1.1, all_gaps
    assert statistics.stdev(all_gaps) > 0.03, all_gaps  # jitter is real
    # In parallel: the hosts' crawls overlap instead of running one after another.
    spans = [(site.hits(h)[0].time, site.hits(h)[-1].time) for h in hosts]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
