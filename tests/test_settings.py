"""Settings as strings, the way ``scrapy crawl -s`` and Scrapyd's ``schedule.json`` pass them.

Every setting of the bundle is read here from a string and must give the value
its typed form gives; the list- and range-valued ones in each form a Scrapy user
reaches for (one number, a JSON list, a comma-separated list).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scrapy import Spider
from scrapy.settings import Settings
from scrapy.utils.test import get_crawler

from scrapy_polite import Addon, PoliteSettingError
from scrapy_polite._redis import RedisLink, redis_url
from scrapy_polite._settings import as_list, get_dict, robots_user_agent
from scrapy_polite.cluster import SCRAPY_REDIS_SCHEDULER as SCRAPY_REDIS
from scrapy_polite.cluster import ClusterConfig, cluster_enabled
from scrapy_polite.delays import DelayConfig, DelayRange, PoliteDelayMiddleware
from scrapy_polite.httpcache import HttpCacheConfig, RedisCacheStorage
from scrapy_polite.process import ProcessConfig, ProcessPipeline
from scrapy_polite.report import PolitenessReport, ledger, report_enabled
from scrapy_polite.robots import PoliteRobotsTxtMiddleware, RobotsConfig

UA = "PoliteTestBot/1.0 (+https://example.invalid/bot)"
URL = "redis://127.0.0.1:1/0"
BASE = {"USER_AGENT": UA, "POLITE_REDIS_URL": URL, "POLITE_PROCESS_FUNCTION": "json.dumps"}


def _delays(settings: dict[str, Any]) -> DelayConfig:
    return DelayConfig.from_settings(Settings({**BASE, **settings}))


def _robots(settings: dict[str, Any]) -> RobotsConfig:
    return RobotsConfig.from_settings(Settings({**BASE, **settings}))


def _cache(settings: dict[str, Any]) -> HttpCacheConfig:
    return HttpCacheConfig.from_settings(Settings({**BASE, **settings}))


def _process(settings: dict[str, Any]) -> ProcessConfig:
    return ProcessConfig.from_settings(Settings({**BASE, **settings}))


def _cluster(settings: dict[str, Any]) -> ClusterConfig:
    return ClusterConfig.from_settings(Settings({**BASE, **settings}))


class _DemoSpider(Spider):
    name = "demo"


def _report(settings: dict[str, Any]) -> PolitenessReport:
    return PolitenessReport(get_crawler(_DemoSpider, {**BASE, **settings}))


def _link(settings: dict[str, Any]) -> RedisLink:
    return RedisLink.standalone(Settings({**BASE, **settings}), URL)


# (setting, the string Scrapyd passes, what reads it, the value it must give)
STRING_FORMS: list[tuple[str, str, Callable[[dict[str, Any]], Any], Any]] = [
    ("POLITE_DELAY", "2", lambda s: _delays(s).default, DelayRange(2, 2)),
    ("POLITE_DELAY", "[0.3, 0.6]", lambda s: _delays(s).default, DelayRange(0.3, 0.6)),
    ("POLITE_DELAY", "0.3,0.6", lambda s: _delays(s).default, DelayRange(0.3, 0.6)),
    ("POLITE_DELAY", "0.3-0.6", lambda s: _delays(s).default, DelayRange(0.3, 0.6)),
    (
        "POLITE_DELAY",
        '{"delay": [1, 3], "distribution": "lognormal"}',
        lambda s: _delays(s).default,
        DelayRange(1, 3, "lognormal"),
    ),
    (
        "POLITE_DELAY_DOMAINS",
        '{"example.com": "1,2", "slow.example": [4, 5], "x.example": 3}',
        lambda s: dict(_delays(s).domains),
        {
            "example.com": DelayRange(1, 2),
            "slow.example": DelayRange(4, 5),
            "x.example": DelayRange(3, 3),
        },
    ),
    (
        "POLITE_DELAY_DISTRIBUTION",
        "exponential",
        lambda s: _delays(s).default.distribution,
        "exponential",
    ),
    ("POLITE_DELAY_MAX", "30", lambda s: _delays(s).cap, 30.0),
    ("POLITE_DELAY_ENABLED", "false", lambda s: Settings(s).getbool("POLITE_DELAY_ENABLED"), False),
    ("POLITE_BACKOFF_HTTP_CODES", "429", lambda s: _delays(s).backoff_codes, {429}),
    (
        "POLITE_BACKOFF_HTTP_CODES",
        "[429, 503, 520]",
        lambda s: _delays(s).backoff_codes,
        {429, 503, 520},
    ),
    ("POLITE_BACKOFF_HTTP_CODES", "429,503", lambda s: _delays(s).backoff_codes, {429, 503}),
    ("POLITE_BACKOFF_DELAY", "2.5", lambda s: _delays(s).backoff_delay, 2.5),
    ("POLITE_BACKOFF_FACTOR", "3", lambda s: _delays(s).backoff_factor, 3.0),
    ("POLITE_BACKOFF_RECOVERY", "0.5", lambda s: _delays(s).backoff_recovery, 0.5),
    ("POLITE_BACKOFF_RETRIES", "7", lambda s: _delays(s).backoff_retries, 7),
    ("POLITE_OBEY_CRAWL_DELAY", "False", lambda s: _delays(s).obey_crawl_delay, False),
    ("DOWNLOAD_DELAY", "2", lambda s: _delays(s).default, DelayRange(1, 3)),
    (
        "DOWNLOAD_DELAY_JITTER",
        "0",
        lambda s: _delays({"DOWNLOAD_DELAY": "2", **s}).default,
        DelayRange(2, 2),
    ),
    (
        "DOWNLOAD_SLOTS",
        '{"127.0.0.2": {"delay": 1.0, "jitter": 0.5, "concurrency": 1}}',
        lambda s: (_delays(s).slots, _delays(s).slot_concurrency),
        ({"127.0.0.2": DelayRange(0.5, 1.5)}, {"127.0.0.2": 1}),
    ),
    ("AUTOTHROTTLE_ENABLED", "true", lambda s: _delays(s).autothrottle, True),
    ("AUTOTHROTTLE_START_DELAY", "1.5", lambda s: _delays(s).autothrottle_start_delay, 1.5),
    ("POLITE_ROBOTS_USER_AGENT", "Mine/2.0", lambda s: _robots(s).product_token, "Mine"),
    ("ROBOTSTXT_USER_AGENT", "Theirs", lambda s: _robots(s).product_token, "Theirs"),
    ("POLITE_ROBOTS_EXPIRY", "3600", lambda s: _robots(s).expiry, 3600.0),
    ("POLITE_ROBOTS_TIMEOUT", "5", lambda s: _robots(s).timeout, 5.0),
    ("POLITE_ROBOTS_RETRY_DELAY", "1", lambda s: _robots(s).retry_delay, 1.0),
    ("POLITE_ROBOTS_RETRY_MAX_DELAY", "60", lambda s: _robots(s).retry_max_delay, 60.0),
    ("POLITE_ROBOTS_UNREACHABLE_TIMEOUT", "0", lambda s: _robots(s).unreachable_timeout, 0.0),
    ("POLITE_ROBOTS_REDIS_URL", "redis://r:2/1", lambda s: _robots(s).redis_url, "redis://r:2/1"),
    ("POLITE_HTTPCACHE_REDIS_URL", "redis://c:3/2", lambda s: _cache(s).url, "redis://c:3/2"),
    ("POLITE_HTTPCACHE_PREFIX", "team:cache", lambda s: _cache(s).prefix, "team:cache"),
    ("POLITE_HTTPCACHE_NAMESPACE", "shared", lambda s: _cache(s).namespace, "shared"),
    ("HTTPCACHE_EXPIRATION_SECS", "60", lambda s: _cache(s).expiration_secs, 60),
    ("POLITE_HTTPCACHE_COMPRESSION_LEVEL", "6", lambda s: _cache(s).compression_level, 6),
    ("POLITE_HTTPCACHE_COMPRESS_MIN_SIZE", "1024", lambda s: _cache(s).compress_min_size, 1024),
    ("POLITE_HTTPCACHE_MAX_BODY_SIZE", "1000", lambda s: _cache(s).max_body_size, 1000),
    ("POLITE_HTTPCACHE_WRITE_BATCH", "16", lambda s: _cache(s).write_batch, 16),
    ("POLITE_HTTPCACHE_WRITE_DELAY", "0.5", lambda s: _cache(s).write_delay, 0.5),
    ("POLITE_PROCESS_FUNCTION", "json.loads", lambda s: _process(s).function, "json.loads"),
    ("POLITE_PROCESS_WORKERS", "3", lambda s: _process(s).workers, 3),
    ("POLITE_PROCESS_MAX_IN_FLIGHT", "9", lambda s: _process(s).max_in_flight, 9),
    ("POLITE_PROCESS_START_METHOD", "spawn", lambda s: _process(s).start_method, "spawn"),
    ("POLITE_PROCESS_RETRIES", "0", lambda s: _process(s).retries, 0),
    ("POLITE_PROCESS_TIMEOUT", "2.5", lambda s: _process(s).timeout, 2.5),
    ("POLITE_DELAY_MAX_DOMAINS", "500", lambda s: _delays(s).max_domains, 500),
    ("POLITE_ROBOTS_MAX_ORIGINS", "500", lambda s: _robots(s).max_origins, 500),
    (
        "POLITE_REPORT_MAX_DOMAINS",
        "500",
        lambda s: ledger(get_crawler(Spider, {**BASE, **s})).max_domains,
        500,
    ),
    (
        "POLITE_REPORT_ENABLED",
        "False",
        lambda s: report_enabled(get_crawler(Spider, {"ADDONS": {Addon: 100}, **s}).settings),
        False,
    ),
    (
        "POLITE_REPORT_JSON",
        "out/{spider}.json",
        lambda s: _report(s).json_path,
        Path("out/demo.json"),
    ),
    ("POLITE_REPORT_HTML", "report.html", lambda s: _report(s).html_path, Path("report.html")),
    ("POLITE_PROCESS_ON_ERROR", "keep", lambda s: _process(s).on_error, "keep"),
    ("POLITE_CLUSTER", "true", lambda s: cluster_enabled(Settings(s)), True),
    ("POLITE_CLUSTER", "false", lambda s: cluster_enabled(Settings({**BASE, **s})), False),
    (
        "POLITE_CLUSTER",
        "auto",
        lambda s: cluster_enabled(Settings({**BASE, "SCHEDULER": SCRAPY_REDIS, **s})),
        True,
    ),
    ("POLITE_CLUSTER_REDIS_URL", "redis://k:6/5", lambda s: _cluster(s).url, "redis://k:6/5"),
    ("POLITE_CLUSTER_LEASE", "12", lambda s: _cluster(s).lease, 12.0),
    ("POLITE_REDIS_URL", "redis://p:4/3", lambda s: redis_url(Settings(s)), "redis://p:4/3"),
    ("REDIS_URL", "redis://q:5/4", lambda s: redis_url(Settings(s)), "redis://q:5/4"),
    ("REDIS_HOST", "h", lambda s: redis_url(Settings(s)), "redis://h:6379"),
    ("REDIS_PORT", "6380", lambda s: redis_url(Settings(s)), "redis://localhost:6380"),
    (
        "POLITE_REDIS_TIMEOUT",
        "0.25",
        lambda s: _link(s).client.connection_pool.connection_kwargs["socket_timeout"],
        0.25,
    ),
    ("POLITE_REDIS_RETRY_INTERVAL", "7", lambda s: _link(s).retry_interval, 7.0),
    (
        "REDIS_PARAMS",
        '{"client_name": "polite"}',
        lambda s: _link(s).client.connection_pool.connection_kwargs["client_name"],
        "polite",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "read", "expected"),
    STRING_FORMS,
    ids=[f"{name}={text}" for name, text, _, _ in STRING_FORMS],
)
def test_every_setting_accepts_its_string_form(name, text, read, expected):
    value = read({name: text})
    assert (set(value) if isinstance(expected, set) else value) == expected


def test_every_polite_setting_in_the_readme_has_a_string_form_test():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = {
        line.split("`")[1] for line in readme.splitlines() if line.startswith("| `POLITE_")
    }
    tested = {name for name, *_ in STRING_FORMS}
    assert documented
    assert documented - tested == set()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (2, [2]),
        ("2", ["2"]),
        ("[0.3, 0.6]", [0.3, 0.6]),
        ("0.3,0.6", ["0.3", "0.6"]),
        ("0.3, 0.6", ["0.3", "0.6"]),
        ((1, 2), [1, 2]),
    ],
)
def test_a_list_is_read_from_a_number_json_or_commas(raw, expected):
    assert as_list("X", raw, "a list") == expected


@pytest.mark.parametrize("raw", ["[1, 2", "", None, True, {"a": 1}, "[1]x"])
def test_what_is_not_a_list_is_an_error_naming_the_setting(raw):
    with pytest.raises(PoliteSettingError, match=r"Invalid setting X="):
        as_list("X", raw, "a list")


def test_a_dict_setting_that_is_not_json_is_an_error_naming_it():
    with pytest.raises(PoliteSettingError, match="POLITE_DELAY_DOMAINS"):
        get_dict(Settings({"POLITE_DELAY_DOMAINS": "{not json"}), "POLITE_DELAY_DOMAINS")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"USER_AGENT": UA}, (UA, "PoliteTestBot")),
        ({"USER_AGENT": UA, "ROBOTSTXT_USER_AGENT": "Other/1"}, ("Other/1", "Other")),
        ({"ROBOTSTXT_USER_AGENT": "Other", "POLITE_ROBOTS_USER_AGENT": "Mine"}, ("Mine", "Mine")),
    ],
)
def test_one_robots_user_agent_resolution_for_every_component(settings, expected):
    assert robots_user_agent(Settings(settings)) == expected
    with_robots = {**settings, "ROBOTSTXT_OBEY": True}
    assert _robots(with_robots).product_token == expected[1]
    assert _delays(with_robots).robots_token == expected[1]


def test_a_user_agent_without_a_product_token_fails_both_components_alike():
    bad = {"USER_AGENT": "(none)", "ROBOTSTXT_OBEY": True}
    for read in (_robots, _delays):
        with pytest.raises(PoliteSettingError, match=r"Invalid setting USER_AGENT='\(none\)'"):
            read(bad)
    assert _delays({"USER_AGENT": "(none)"}).robots_token == "*"  # no robots.txt: unused


# (setting, a value of the wrong type): each must stop the crawl at start-up, naming it.
WRONG_TYPES: list[tuple[str, Any]] = [
    ("POLITE_REDIS_URL", 6379),
    ("POLITE_REDIS_TIMEOUT", "soon"),
    ("POLITE_REDIS_RETRY_INTERVAL", [1, 2]),
    ("POLITE_DELAY_ENABLED", "maybe"),
    ("POLITE_DELAY", {"low": 1}),
    ("POLITE_DELAY_DISTRIBUTION", 3),
    ("POLITE_DELAY_DOMAINS", "not json"),
    ("POLITE_DELAY_MAX", "long"),
    ("POLITE_BACKOFF_HTTP_CODES", "many"),
    ("POLITE_BACKOFF_DELAY", [5]),
    ("POLITE_BACKOFF_FACTOR", "double"),
    ("POLITE_BACKOFF_RECOVERY", {}),
    ("POLITE_BACKOFF_RETRIES", 2.5),
    ("POLITE_OBEY_CRAWL_DELAY", "sometimes"),
    ("POLITE_ROBOTS_USER_AGENT", 42),
    ("POLITE_ROBOTS_EXPIRY", "a day"),
    ("POLITE_ROBOTS_TIMEOUT", []),
    ("POLITE_ROBOTS_RETRY_DELAY", "soon"),
    ("POLITE_ROBOTS_RETRY_MAX_DELAY", "later"),
    ("POLITE_ROBOTS_UNREACHABLE_TIMEOUT", "never"),
    ("POLITE_ROBOTS_REDIS_URL", ["redis://x"]),
    ("POLITE_HTTPCACHE_REDIS_URL", 1),
    ("POLITE_HTTPCACHE_PREFIX", 7),
    ("POLITE_HTTPCACHE_NAMESPACE", ["a"]),
    ("POLITE_HTTPCACHE_COMPRESSION_LEVEL", "max"),
    ("POLITE_HTTPCACHE_COMPRESS_MIN_SIZE", "big"),
    ("POLITE_HTTPCACHE_MAX_BODY_SIZE", 1.5),
    ("POLITE_HTTPCACHE_WRITE_BATCH", "some"),
    ("POLITE_HTTPCACHE_WRITE_DELAY", "short"),
    ("POLITE_PROCESS_FUNCTION", 5),
    ("POLITE_PROCESS_WORKERS", "all"),
    ("POLITE_PROCESS_MAX_IN_FLIGHT", [2]),
    ("POLITE_PROCESS_START_METHOD", 1),
    ("POLITE_PROCESS_RETRIES", "twice"),
    ("POLITE_PROCESS_TIMEOUT", [1]),
    ("POLITE_PROCESS_ON_ERROR", True),
    ("POLITE_REPORT_ENABLED", "perhaps"),
    ("POLITE_REPORT_JSON", 3),
    ("POLITE_REPORT_HTML", ["a.html"]),
    ("POLITE_CLUSTER", "perhaps"),
    ("POLITE_CLUSTER_REDIS_URL", 9),
    ("POLITE_CLUSTER_LEASE", "long"),
    ("POLITE_DELAY_MAX_DOMAINS", "many"),
    ("POLITE_ROBOTS_MAX_ORIGINS", 2.5),
    ("POLITE_REPORT_MAX_DOMAINS", [100]),
]

EVERYTHING = {
    **BASE,
    "ROBOTSTXT_OBEY": True,
    "HTTPCACHE_ENABLED": True,
    "SCHEDULER": SCRAPY_REDIS,
}


def _start_up(settings: dict[str, Any]) -> None:
    """Build what a crawl with every component on builds at start-up, as Scrapy would."""
    crawler = get_crawler(_DemoSpider, {**EVERYTHING, "ADDONS": {Addon: 100}, **settings})
    PoliteDelayMiddleware.from_crawler(crawler)
    PoliteRobotsTxtMiddleware.from_crawler(crawler)
    RedisCacheStorage(crawler.settings)
    ProcessPipeline.from_crawler(crawler)
    PolitenessReport.from_crawler(crawler)


def test_the_wrong_type_table_covers_every_setting_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = {
        line.split("`")[1] for line in readme.splitlines() if line.startswith("| `POLITE_")
    }
    assert documented == {name for name, _ in WRONG_TYPES}


def test_every_component_starts_with_the_defaults():
    _start_up({})


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES, ids=[name for name, _ in WRONG_TYPES])
def test_a_setting_of_the_wrong_type_fails_at_start_up_naming_it(name: str, value: Any):
    with pytest.raises(PoliteSettingError, match=f"Invalid setting {name}="):
        _start_up({name: value})
