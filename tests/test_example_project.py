"""The example project runs with ``scrapy crawl``, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.crawl import ROOT
from tests.site import Site


def test_scrapy_crawl_of_the_example_project_visits_every_demo_host_politely(site: Site, tmp_path):
    hosts = site.hosts[:4]
    for host in hosts:
        site.set_pages(host, 5)
    out = tmp_path / "items.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "scrapy",
            "crawl",
            "demo",
            "-a",
            "site=" + ",".join(site.url(h, "/") for h in hosts),
            "-s",
            "POLITE_DELAY_DOMAINS={}",
            "-O",
            str(out),
        ],
        cwd=ROOT / "example_project",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    assert "scrapy-polite: per-domain delays on" in process.stderr
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) == 4 * 5
    for host in hosts:
        assert min(site.gaps(host)) >= 0.2 - 0.01  # the project's POLITE_DELAY floor
