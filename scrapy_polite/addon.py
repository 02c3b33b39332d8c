"""The add-on: ``ADDONS = {"scrapy_polite.Addon": 100}`` turns the bundle on.

It only fills in what the user has not set: components go in at their default
places unless the user already placed them (or disabled them with ``None``),
and settings are written at the ``"addon"`` priority, below the project's.

A request passes through the bundle in this order: the robots.txt check
(priority 100, replacing Scrapy's ``RobotsTxtMiddleware`` when
``ROBOTSTXT_OBEY`` is on), the HTTP cache (Scrapy's ``HttpCacheMiddleware`` at
900, with the Redis storage: a hit is answered here, before the domain's turn,
so it never waits), the delay middleware (950), which hands the request to its
domain's paced download slot, then the slot's turn and the download. On the way
back the delay middleware sees a 429/503 first and turns it into a retry before
the cache or Scrapy's retry middleware (550) see it. An item passes through the
user's pipelines, then the process pool (1000).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.downloadermiddlewares.httpcache import HttpCacheMiddleware
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.settings import SETTINGS_PRIORITIES
from scrapy.utils.misc import load_object

from scrapy_polite._redis import redact, redis_url
from scrapy_polite._settings import get_bool
from scrapy_polite.cluster import cluster_enabled
from scrapy_polite.httpcache import RedisCacheStorage

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

__all__ = ["Addon"]

logger = logging.getLogger(__name__)

DELAY_MIDDLEWARE = "scrapy_polite.delays.PoliteDelayMiddleware"
ROBOTS_MIDDLEWARE = "scrapy_polite.robots.PoliteRobotsTxtMiddleware"
CACHE_STORAGE = "scrapy_polite.httpcache.RedisCacheStorage"
CACHE_MIDDLEWARE = "scrapy_polite.httpcache.RedisHttpCacheMiddleware"
PROCESS_PIPELINE = "scrapy_polite.process.ProcessPipeline"
REPORT_EXTENSION = "scrapy_polite.report.PolitenessReport"
CLUSTER_QUEUE = "scrapy_polite.cluster.DomainQueue"
CLUSTER_SERIALIZER = "scrapy_polite.serializer"
CLUSTER_DUPEFILTER = "scrapy_polite.cluster.DupeFilter"
SCRAPY_REDIS_DUPEFILTER = "scrapy_redis.dupefilter.RFPDupeFilter"

DELAY_PRIORITY = 950
ROBOTS_PRIORITY = 100
CACHE_PRIORITY = 900  # Scrapy's HttpCacheMiddleware's
PROCESS_PRIORITY = 1000
REPORT_PRIORITY = 500


class Addon:
    """``ADDONS = {"scrapy_polite.Addon": 100}``: see the module's docstring."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def update_settings(self, settings: BaseSettings) -> None:
        enabled = [self._enable_delays(settings)]
        enabled.append(self._enable_robots(settings))
        enabled.append(self._enable_cache(settings))
        enabled.append(self._enable_process(settings))
        enabled.append(self._enable_cluster(settings))
        enabled.append(self._enable_report(settings))
        logger.info("scrapy-polite: %s", "; ".join(enabled))

    def _enable_delays(self, settings: BaseSettings) -> str:
        if not get_bool(settings, "POLITE_DELAY_ENABLED", True):
            return "delays off"
        _add_component(settings, "DOWNLOADER_MIDDLEWARES", DELAY_MIDDLEWARE, DELAY_PRIORITY)
        return "per-domain delays on"

    def _enable_robots(self, settings: BaseSettings) -> str:
        if not settings.getbool("ROBOTSTXT_OBEY"):
            return "robots.txt off (ROBOTSTXT_OBEY)"
        if _replace_middleware(settings, RobotsTxtMiddleware, ROBOTS_MIDDLEWARE, ROBOTS_PRIORITY):
            return "robots.txt on (RFC 9309)"
        return "robots.txt left to Scrapy's RobotsTxtMiddleware (placed by the user)"

    def _enable_cache(self, settings: BaseSettings) -> str:
        if not settings.getbool("HTTPCACHE_ENABLED"):
            return "HTTP cache off (HTTPCACHE_ENABLED)"
        priority = settings.getpriority("HTTPCACHE_STORAGE") or 0
        if priority <= SETTINGS_PRIORITIES["default"]:
            settings.set("HTTPCACHE_STORAGE", CACHE_STORAGE, priority="addon")
        elif not issubclass(load_object(settings.get("HTTPCACHE_STORAGE")), RedisCacheStorage):
            return f"HTTP cache storage {settings.get('HTTPCACHE_STORAGE')} (the user's)"
        _replace_middleware(settings, HttpCacheMiddleware, CACHE_MIDDLEWARE, CACHE_PRIORITY)
        url = redis_url(settings, "POLITE_HTTPCACHE_REDIS_URL")
        return f"Redis HTTP cache on ({redact(url) if url else 'no Redis URL set'})"

    def _enable_process(self, settings: BaseSettings) -> str:
        if not settings.get("POLITE_PROCESS_FUNCTION"):
            return "process pipeline off (POLITE_PROCESS_FUNCTION)"
        _add_component(settings, "ITEM_PIPELINES", PROCESS_PIPELINE, PROCESS_PRIORITY)
        return f"process pipeline on ({settings.get('POLITE_PROCESS_FUNCTION')})"

    def _enable_cluster(self, settings: BaseSettings) -> str:
        if not cluster_enabled(settings):
            return "cluster mode off (POLITE_CLUSTER, scrapy-redis's SCHEDULER)"
        for name, value in (
            ("SCHEDULER_QUEUE_CLASS", CLUSTER_QUEUE),
            ("SCHEDULER_SERIALIZER", CLUSTER_SERIALIZER),
            # scrapy-redis's default (False) makes the first worker to finish flush the queue.
            ("SCHEDULER_PERSIST", True),
        ):
            if (settings.getpriority(name) or 0) <= SETTINGS_PRIORITIES["default"]:
                settings.set(name, value, priority="addon")
        # scrapy-redis's dupefilter blocks the reactor up to 60 s per request when Redis
        # hangs; ours is the same filter through the one Redis layer, so it also takes
        # the place of scrapy-redis's where the user named that one.
        priority = settings.getpriority("DUPEFILTER_CLASS") or 0
        chosen = settings.get("DUPEFILTER_CLASS")
        if priority <= SETTINGS_PRIORITIES["default"] or _names(chosen, SCRAPY_REDIS_DUPEFILTER):
            priority = max(priority, SETTINGS_PRIORITIES["addon"])
            settings.set("DUPEFILTER_CLASS", CLUSTER_DUPEFILTER, priority=priority)
        url = redis_url(settings, "POLITE_CLUSTER_REDIS_URL")
        return f"cluster mode on ({redact(url) if url else '?'}: shared pace, domain-aware queue)"

    def _enable_report(self, settings: BaseSettings) -> str:
        if not get_bool(settings, "POLITE_REPORT_ENABLED", True):
            return "politeness report off (POLITE_REPORT_ENABLED)"
        _add_component(settings, "EXTENSIONS", REPORT_EXTENSION, REPORT_PRIORITY)
        return "politeness report at the close"


def _replace_middleware(settings: BaseSettings, scrapys: type, ours: str, priority: int) -> bool:
    """Put *ours* in the place of Scrapy's middleware *scrapys*, unless the user
    placed Scrapy's in ``DOWNLOADER_MIDDLEWARES``; whether it did."""
    middlewares = settings.getdict("DOWNLOADER_MIDDLEWARES")
    if any(load_object(k) is scrapys for k, v in middlewares.items() if v is not None):
        return False
    settings.set_in_component_priority_dict("DOWNLOADER_MIDDLEWARES", scrapys, None)
    settings.setdefault_in_component_priority_dict(
        "DOWNLOADER_MIDDLEWARES", load_object(ours), priority
    )
    return True


def _names(value: object, path: str) -> bool:
    """Whether a setting's *value* (an import path or the object) is the object at *path*."""
    if isinstance(value, str):
        return value == path
    try:
        return value is load_object(path)
    except (ImportError, AttributeError):
        return False


def _add_component(settings: BaseSettings, name: str, path: str, priority: int) -> None:
    """Place *path* in the *name* component dict unless the user already did."""
    settings.setdefault_in_component_priority_dict(name, load_object(path), priority)
