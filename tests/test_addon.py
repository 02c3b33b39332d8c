"""The add-on: what it changes, what it leaves alone, and that it logs what it enabled."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scrapy import Spider
from scrapy.downloadermiddlewares.httpcache import HttpCacheMiddleware
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.settings import BaseSettings
from scrapy.utils.test import get_crawler

from scrapy_polite import Addon
from scrapy_polite.delays import PoliteDelayMiddleware
from scrapy_polite.httpcache import RedisHttpCacheMiddleware
from scrapy_polite.process import ProcessPipeline
from scrapy_polite.report import PolitenessReport
from scrapy_polite.robots import PoliteRobotsTxtMiddleware
from scrapy_polite.testing.crawl import crawl
from scrapy_polite.testing.site import Site


def _settings(user: dict[str, Any]) -> dict[str, Any]:
    settings = get_crawler(Spider, user).settings
    return {
        name: dict(settings[name]) if isinstance(settings[name], BaseSettings) else settings[name]
        for name in settings
    }


def _changed_by_addon(user: dict[str, Any]) -> dict[str, Any]:
    """Every setting whose value the add-on changed, given the user's settings."""
    without = _settings(user)
    with_addon = _settings({**user, "ADDONS": {Addon: 100}})
    return {
        name: value
        for name, value in with_addon.items()
        if name != "ADDONS" and value != without.get(name)
    }


REPORT = {"EXTENSIONS": {PolitenessReport: 500}}


def test_addon_alone_adds_only_the_delay_middleware_and_the_report():
    assert _changed_by_addon({}) == {
        "DOWNLOADER_MIDDLEWARES": {PoliteDelayMiddleware: 950},
        **REPORT,
    }


def test_robotstxt_obey_swaps_scrapys_middleware_for_ours():
    changed = _changed_by_addon({"ROBOTSTXT_OBEY": True})
    assert changed == {
        "DOWNLOADER_MIDDLEWARES": {
            RobotsTxtMiddleware: None,
            PoliteRobotsTxtMiddleware: 100,
            PoliteDelayMiddleware: 950,
        },
        **REPORT,
    }


def test_http_cache_gets_the_redis_storage_unless_the_user_chose_one():
    changed = _changed_by_addon({"HTTPCACHE_ENABLED": True})
    assert changed["HTTPCACHE_STORAGE"] == "scrapy_polite.httpcache.RedisCacheStorage"
    mine = "scrapy.extensions.httpcache.DbmCacheStorage"
    changed = _changed_by_addon({"HTTPCACHE_ENABLED": True, "HTTPCACHE_STORAGE": mine})
    assert "HTTPCACHE_STORAGE" not in changed


CACHE_IN_OUR_MIDDLEWARE = {
    HttpCacheMiddleware: None,
    RedisHttpCacheMiddleware: 900,
    PoliteDelayMiddleware: 950,
}


@pytest.mark.parametrize("storage", [None, "scrapy_polite.httpcache.RedisCacheStorage"])
def test_the_redis_storage_gets_the_awaiting_middleware_in_place_of_scrapys(storage):
    user = {"HTTPCACHE_ENABLED": True, "HTTPCACHE_STORAGE": storage} if storage else {}
    changed = _changed_by_addon({"HTTPCACHE_ENABLED": True, **user})
    assert changed["DOWNLOADER_MIDDLEWARES"] == CACHE_IN_OUR_MIDDLEWARE


def test_scrapys_cache_middleware_stays_with_another_storage_or_when_the_user_placed_it():
    dbm = {
        "HTTPCACHE_ENABLED": True,
        "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.DbmCacheStorage",
    }
    assert _changed_by_addon(dbm)["DOWNLOADER_MIDDLEWARES"] == {PoliteDelayMiddleware: 950}
    placed = {
        "HTTPCACHE_ENABLED": True,
        "DOWNLOADER_MIDDLEWARES": {
            "scrapy.downloadermiddlewares.httpcache.HttpCacheMiddleware": 890
        },
    }
    middlewares = _changed_by_addon(placed)["DOWNLOADER_MIDDLEWARES"]
    assert RedisHttpCacheMiddleware not in middlewares
    assert middlewares["scrapy.downloadermiddlewares.httpcache.HttpCacheMiddleware"] == 890


def test_process_pipeline_is_added_after_the_users_pipelines_only_when_a_function_is_set():
    changed = _changed_by_addon({"POLITE_PROCESS_FUNCTION": "json.loads"})
    assert changed["ITEM_PIPELINES"] == {ProcessPipeline: 1000}
    assert "ITEM_PIPELINES" not in _changed_by_addon({})


@pytest.mark.parametrize("placed", [700, None])
def test_a_component_the_user_placed_or_disabled_is_left_as_is_and_never_added_twice(placed):
    path = "scrapy_polite.delays.PoliteDelayMiddleware"
    settings = get_crawler(
        Spider, {"ADDONS": {Addon: 100}, "DOWNLOADER_MIDDLEWARES": {path: placed}}
    ).settings
    middlewares = settings.getdict("DOWNLOADER_MIDDLEWARES")
    ours = [key for key in middlewares if key in (path, PoliteDelayMiddleware)]
    assert ours == [path]
    assert middlewares[path] == placed


EVERYTHING_ON = {
    "ROBOTSTXT_OBEY": True,
    "HTTPCACHE_ENABLED": True,
    "POLITE_PROCESS_FUNCTION": "json.dumps",
}


def test_every_setting_the_addon_writes_keeps_the_users_own_value():
    written = _changed_by_addon(EVERYTHING_ON)
    assert set(written) == {
        "DOWNLOADER_MIDDLEWARES",
        "HTTPCACHE_STORAGE",
        "ITEM_PIPELINES",
        "EXTENSIONS",
    }
    assert set(written["DOWNLOADER_MIDDLEWARES"]) == {
        RobotsTxtMiddleware,
        PoliteRobotsTxtMiddleware,
        HttpCacheMiddleware,
        RedisHttpCacheMiddleware,
        PoliteDelayMiddleware,
    }
    users = {
        "DOWNLOADER_MIDDLEWARES": {"scrapy_polite.delays.PoliteDelayMiddleware": 123},
        "HTTPCACHE_STORAGE": "scrapy.extensions.httpcache.DbmCacheStorage",
        "ITEM_PIPELINES": {"scrapy_polite.process.ProcessPipeline": 7},
        "EXTENSIONS": {"scrapy_polite.report.PolitenessReport": 3},
    }
    assert set(users) == set(written)  # one user value for each setting the add-on writes
    settings = get_crawler(Spider, {**EVERYTHING_ON, **users, "ADDONS": {Addon: 100}}).settings
    assert settings["HTTPCACHE_STORAGE"] == users["HTTPCACHE_STORAGE"]
    assert settings.getpriority("HTTPCACHE_STORAGE") == 20  # the project's, not the add-on's
    middlewares = settings.getdict("DOWNLOADER_MIDDLEWARES")
    assert middlewares["scrapy_polite.delays.PoliteDelayMiddleware"] == 123
    assert PoliteDelayMiddleware not in middlewares
    pipelines = settings.getdict("ITEM_PIPELINES")
    assert pipelines == {"scrapy_polite.process.ProcessPipeline": 7}
    assert settings.getdict("EXTENSIONS") == {"scrapy_polite.report.PolitenessReport": 3}


def test_delays_and_the_report_can_be_switched_off():
    assert _changed_by_addon({"POLITE_DELAY_ENABLED": False}) == REPORT
    off = {"POLITE_DELAY_ENABLED": False, "POLITE_REPORT_ENABLED": False}
    assert _changed_by_addon(off) == {}


@pytest.mark.parametrize("reactor", ["asyncio", "epoll"])
def test_one_line_in_settings_turns_the_bundle_on_in_a_real_crawl(site: Site, reactor: str):
    host = site.hosts[0]
    result = crawl(
        "tests.spiders.PagesSpider",
        {"ADDONS": {"scrapy_polite.Addon": 100}, "POLITE_DELAY": 0.2},
        args={"urls": json.dumps([site.url(host, f"/p/{i}") for i in range(3)])},
        reactor=reactor,
    )
    assert "scrapy-polite: per-domain delays on" in result.log
    assert len(result.items) == 3
    assert min(site.gaps(host)) >= 0.2 - 0.01


SCRAPY_REDIS = {
    "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
    "REDIS_URL": "redis://127.0.0.1:1/0",
}


def test_scrapy_redis_with_a_redis_url_turns_cluster_mode_on_with_queue_serializer_persist():
    changed = _changed_by_addon(SCRAPY_REDIS)
    assert changed["SCHEDULER_QUEUE_CLASS"] == "scrapy_polite.cluster.DomainQueue"
    assert changed["SCHEDULER_SERIALIZER"] == "scrapy_polite.serializer"
    assert changed["SCHEDULER_PERSIST"] is True
    assert changed["DUPEFILTER_CLASS"] == "scrapy_polite.cluster.DupeFilter"
    assert _changed_by_addon({"SCHEDULER": "scrapy_redis.scheduler.Scheduler"}).keys() == {
        "DOWNLOADER_MIDDLEWARES",  # no Redis URL: no cluster mode
        "EXTENSIONS",
    }
    assert "SCHEDULER_QUEUE_CLASS" not in _changed_by_addon(
        {**SCRAPY_REDIS, "POLITE_CLUSTER": "false"}
    )


def test_cluster_mode_keeps_the_users_own_queue_serializer_and_persist():
    mine = {
        "SCHEDULER_QUEUE_CLASS": "scrapy_redis.queue.FifoQueue",
        "SCHEDULER_SERIALIZER": "json",
        "SCHEDULER_PERSIST": False,
    }
    settings = get_crawler(Spider, {**SCRAPY_REDIS, **mine, "ADDONS": {Addon: 100}}).settings
    assert {name: settings[name] for name in mine} == mine


def test_cluster_mode_puts_its_dupefilter_in_the_place_of_scrapy_redis_but_keeps_any_other():
    def dupefilter(chosen: str) -> str:
        settings = {**SCRAPY_REDIS, "DUPEFILTER_CLASS": chosen, "ADDONS": {Addon: 100}}
        return get_crawler(Spider, settings).settings["DUPEFILTER_CLASS"]

    assert dupefilter("scrapy_redis.dupefilter.RFPDupeFilter") == "scrapy_polite.cluster.DupeFilter"
    assert dupefilter("myproject.MyDupeFilter") == "myproject.MyDupeFilter"
