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
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _scrapyd(tmp_path: Path) -> Iterator[str]:
    """A Scrapyd on a free loopback port with the example project deployed; its URL."""
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
        "max_proc = 4\n"
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
        yield base
    finally:
        scrapyd.terminate()
        scrapyd.wait(30)


def _schedule(base: str, site: Site, hosts: tuple[str, ...], *settings: str) -> str:
    form = urllib.parse.urlencode(
        [
            ("project", "polite_demo"),
            ("spider", "demo"),
            ("site", _site_arg(site, hosts).removeprefix("site=")),
            ("setting", "POLITE_DELAY_DOMAINS={}"),
            *(("setting", setting) for setting in settings),
        ]
    ).encode()
    with urllib.request.urlopen(f"{base}/schedule.json", form, timeout=10) as response:
        return str(json.loads(response.read())["jobid"])


def _wait_finished(base: str, *jobs: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        finished = {j["id"] for j in _get(f"{base}/listjobs.json?project=polite_demo")["finished"]}
        if finished >= set(jobs):
            return
        assert time.monotonic() < deadline, "the Scrapyd jobs did not finish"
        time.sleep(0.5)


def _job_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / "logs" / "polite_demo" / "demo" / f"{job}.log").read_text()


def _job_items(tmp_path: Path, job: str) -> list[str]:
    path = tmp_path / "items" / "polite_demo" / "demo" / f"{job}.jl"
    return path.read_text().splitlines() if path.exists() else []


def test_the_example_project_deploys_to_scrapyd_and_its_job_runs_politely(demo_site, tmp_path):
    site, hosts = demo_site
    with _scrapyd(tmp_path) as base:
        job = _schedule(base, site, hosts)
        _wait_finished(base, job)
    log = _job_log(tmp_path, job)
    assert "scrapy-polite: per-domain delays on" in log
    assert "Traceback" not in log
    assert len(_job_items(tmp_path, job)) == len(hosts) * PAGES
    for host in hosts:
        assert min(site.gaps(host)) >= FLOOR - EPS, [
            (h.path, round(h.time - site.hits(host)[0].time, 3)) for h in site.hits(host)
        ]


def test_two_scrapyd_jobs_share_one_crawl_and_the_one_left_finishes_it_politely(
    demo_site, redis_server: RedisServer, tmp_path
):
    site, all_hosts = demo_site
    hosts = all_hosts[:2]  # no robots.txt to wait for: the crawl starts at once
    for host in hosts:
        site.set_pages(host, 12)
    cluster = (
        "SCHEDULER=scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS=scrapy_polite.cluster.DupeFilter",
        f"REDIS_URL={redis_server.url}",
        "POLITE_CLUSTER_LEASE=3",
    )
    with _scrapyd(tmp_path) as base:
        jobs = [_schedule(base, site, hosts, *cluster) for _ in range(2)]
        deadline = time.monotonic() + 60
        while len(site.page_hits()) < 6:
            assert time.monotonic() < deadline, "the jobs did not start crawling"
            time.sleep(0.1)
        form = urllib.parse.urlencode({"project": "polite_demo", "job": jobs[0]}).encode()
        with urllib.request.urlopen(f"{base}/cancel.json", form, timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
        _wait_finished(base, *jobs)
    logs = [_job_log(tmp_path, job) for job in jobs]
    for log in logs:
        assert "Traceback" not in log
        assert "cluster mode on" in log
        assert "'polite/cluster/queue/pops'" in log  # the jobs' stats, in their logs
    every = {f"/p/{i}" for i in range(12)}
    for host in hosts:
        pages = [h.path for h in site.page_hits(host) if h.path.startswith("/p/")]
        assert set(pages) == every, host  # every page, one job or the other
        assert len(pages) <= 12 + 2, host  # again at most what the cancelled job had in flight
        assert min(site.gaps(host)) >= FLOOR - EPS, (host, site.gaps(host))
    urls = {json.loads(i)["url"] for job in jobs for i in _job_items(tmp_path, job)}
    assert urls == {site.url(h, p) for h in hosts for p in every}  # no item lost
