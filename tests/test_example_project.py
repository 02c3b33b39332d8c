"""The example project as users run it: ``scrapy crawl``, a scrapy-redis cluster, Scrapyd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from scrapy_polite.testing import free_port
from scrapy_polite.testing.redis_server import RedisServer
from scrapy_polite.testing.site import Site

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "example_project"
PAGES = 5
FLOOR = 0.2  # the project's POLITE_DELAY low end
EPS = 0.01


def _site_arg(site: Site, hosts: tuple[str, ...]) -> str:
    return "site=" + ",".join(site.url(h, "/") for h in hosts)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _scrapy(*args: str, cwd: Path = PROJECT) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scrapy", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    _, log = process.communicate(timeout=300)
    assert process.returncode == 0, log[-4000:]
    return log


@pytest.fixture
def demo_site(site: Site) -> tuple[Site, tuple[str, ...]]:
    hosts = site.hosts[:4]
    for host in hosts:
        site.set_pages(host, PAGES)
    return site, hosts


def test_scrapy_crawl_of_the_example_project_visits_every_demo_host_politely(demo_site, tmp_path):
    site, hosts = demo_site
    out = tmp_path / "items.jsonl"
    log = _finish(
        _scrapy(
            "crawl",
            "demo",
            "-a",
            _site_arg(site, hosts),
            "-s",
            "POLITE_DELAY_DOMAINS={}",
            "-O",
            str(out),
        )
    )
    assert "scrapy-polite: per-domain delays on" in log
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) == len(hosts) * PAGES
    for host in hosts:
        assert min(site.gaps(host)) >= FLOOR - EPS, [
            (h.path, round(h.time - site.hits(host)[0].time, 3)) for h in site.hits(host)
        ]


def test_two_crawlers_sharing_a_scrapy_redis_queue_fetch_every_page_exactly_once(
    demo_site, redis_server: RedisServer, tmp_path
):
    site, hosts = demo_site
    cluster = [
        "-s",
        "SCHEDULER=scrapy_redis.scheduler.Scheduler",
        "-s",
        "DUPEFILTER_CLASS=scrapy_redis.dupefilter.RFPDupeFilter",
        "-s",
        "SCHEDULER_PERSIST=True",
        "-s",
        f"REDIS_URL={redis_server.url}",
        "-s",
        "POLITE_DELAY_DOMAINS={}",
    ]
    outs = [tmp_path / f"items-{i}.jsonl" for i in range(2)]
    crawlers = [
        _scrapy("crawl", "demo", "-a", _site_arg(site, hosts), *cluster, "-O", str(out))
        for out in outs
    ]
    for crawler in crawlers:
        _finish(crawler)
    pages = [h.path for h in site.hits() if h.path.startswith("/p/")]
    assert len(pages) == len(hosts) * PAGES  # every page once, across both crawlers
    items = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert sorted(i["url"] for i in items) == sorted(
        site.url(h, f"/p/{i}") for h in hosts for i in range(PAGES)
    )


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_the_example_project_deploys_to_scrapyd_and_its_job_runs_politely(demo_site, tmp_path):
    site, hosts = demo_site
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns(".demo", "__pycache__"))
    cfg = (project / "scrapy.cfg").read_text()
    (project / "scrapy.cfg").write_text(cfg.replace("http://127.0.0.1:6800", base))
    (tmp_path / "scrapyd.conf").write_text(
        "[scrapyd]\n"
        f"bind_address = 127.0.0.1\nhttp_port = {port}\npoll_interval = 0.5\n"
        f"eggs_dir = {tmp_path / 'eggs'}\nlogs_dir = {tmp_path / 'logs'}\n"
        f"items_dir = {(tmp_path / 'items').as_uri()}\ndbs_dir = {tmp_path / 'dbs'}\n"
    )
    scrapyd = subprocess.Popen(
        [sys.executable, "-m", "scrapyd", "--pidfile", str(tmp_path / "twistd.pid")],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _get(f"{base}/daemonstatus.json")["status"] == "ok"
                break
            except OSError:
                assert time.monotonic() < deadline, "scrapyd did not start"
                time.sleep(0.2)
        deploy = subprocess.run(
            [
                sys.executable,
                "-m",
                "scrapyd_client.deploy",
                "local",
                "-p",
                "polite_demo",
                "-v",
                "1",
            ],
            cwd=project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        form = urllib.parse.urlencode(
            [
                ("project", "polite_demo"),
                ("spider", "demo"),
                ("site", _site_arg(site, hosts).removeprefix("site=")),
                ("setting", "POLITE_DELAY_DOMAINS={}"),
            ]
        ).encode()
        with urllib.request.urlopen(f"{base}/schedule.json", form, timeout=10) as response:
            job = json.loads(response.read())["jobid"]
        deadline = time.monotonic() + 180
        while not any(
            j["id"] == job for j in _get(f"{base}/listjobs.json?project=polite_demo")["finished"]
        ):
            assert time.monotonic() < deadline, "the Scrapyd job did not finish"
            time.sleep(0.5)
    finally:
        scrapyd.terminate()
        scrapyd.wait(30)
    log = (tmp_path / "logs" / "polite_demo" / "demo" / f"{job}.log").read_text()
    assert "scrapy-polite: per-domain delays on" in log
    assert "Traceback" not in log
    items = (tmp_path / "items" / "polite_demo" / "demo" / f"{job}.jl").read_text().splitlines()
    assert len(items) == len(hosts) * PAGES
    for host in hosts:
        assert min(site.gaps(host)) >= FLOOR - EPS, [
            (h.path, round(h.time - site.hits(host)[0].time, 3)) for h in site.hits(host)
        ]
