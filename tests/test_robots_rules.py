"""RFC 9309's rules without a crawl: product tokens, groups, Crawl-delay, size, status codes."""

from __future__ import annotations

import pytest
from scrapy.robotstxt import RobotParser
from scrapy.utils.test import get_crawler

from scrapy_polite._robots_rules import (
    MAX_SIZE,
    RobotsRules,
    decode_body,
    outcome_of_status,
    product_token,
)

UA = "PoliteTestBot/1.0 (+https://example.invalid/bot)"


@pytest.mark.parametrize(
    ("user_agent", "token"),
    [
        (UA, "PoliteTestBot"),
        ("MyBot", "MyBot"),
        ("my_bot-2/3.0", "my_bot-"),
        ("Mozilla/5.0 (compatible; Foobot/2.1; +https://foo.example/bot)", "Foobot"),
        ("Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0", "Mozilla"),
        ("  /1.0", None),
        ("", None),
    ],
)
def test_product_token_is_the_name_a_user_agent_starts_with(user_agent, token):
    assert product_token(user_agent) == token


GROUPS = """\
User-agent: bot
Disallow: /bot-group

User-agent: Polite   # a prefix of our token, not our token
Disallow: /prefix-group

User-agent: PoliteTestBot/2.0
User-agent: OtherBot
Disallow: /our-group

User-agent: *
Disallow: /star-group
"""


def test_only_the_group_of_the_exact_product_token_applies():
    rules = RobotsRules(GROUPS)
    # Protego alone gives "bot" to "…/bot)" in our user agent and "Polite" to PoliteTestBot.
    assert not rules.allowed("http://a.example/our-group", UA)
    for path in ("/bot-group", "/prefix-group", "/star-group"):
        assert rules.allowed(f"http://a.example{path}", UA), path
    assert not rules.allowed("http://a.example/our-group", "otherbot")  # any case
    assert not rules.allowed("http://a.example/bot-group", "bot/1.0")
    assert not rules.allowed("http://a.example/star-group", "MyBot/1.0")  # no group: *
    assert rules.allowed("http://a.example/bot-group", "MyBot/1.0")
    assert rules.allowed(b"http://a.example/robots.txt", UA)


def test_crawl_delay_is_the_larger_of_crawl_delay_and_request_rate_of_the_matching_group():
    rules = RobotsRules(
        GROUPS.replace("/our-group\n", "/our-group\nCrawl-delay: 3\n").replace(
            "/star-group\n", "/star-group\nRequest-rate: 1/5s\n"
        )
    )
    assert rules.crawl_delay(UA) == 3.0  # our group: Crawl-delay only
    assert rules.crawl_delay("MyBot/1.0") == 5.0  # the * group: 1 request per 5 s
    both = RobotsRules("User-agent: *\nCrawl-delay: 2\nRequest-rate: 3/3s\n")
    assert both.crawl_delay(UA) == 2.0
    assert RobotsRules("User-agent: *\nDisallow: /x\n").crawl_delay(UA) is None


def test_body_is_cut_to_its_first_500_kib_on_a_line_boundary():
    line = b"Disallow: /filler/0123456789\n"
    body = line * (MAX_SIZE // len(line) + 100)
    text, truncated = decode_body(body)
    assert truncated
    assert len(text.encode()) <= MAX_SIZE
    assert text.endswith("/filler/0123456789")  # no half line
    assert decode_body(b"\xef\xbb\xbfUser-agent: *\n\xff\xfe") == (
        "User-agent: *\n\ufffd\ufffd",
        False,
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "rules"),
        (204, "rules"),
        (404, "unavailable"),
        (401, "unavailable"),
        (410, "unavailable"),
        (429, "unreachable"),
        (500, "unreachable"),
        (503, "unreachable"),
        (304, "unavailable"),
    ],
)
def test_each_status_class_means_what_rfc_9309_section_2_3_1_says(status, kind):
    outcome = outcome_of_status(status, b"User-agent: *\nDisallow: /\n")
    assert outcome is not None
    assert (outcome.kind, outcome.detail) == (kind, str(status))
    assert outcome.text == ("User-agent: *\nDisallow: /\n" if kind == "rules" else "")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_an_outcome_but_a_hop_to_follow(status):
    assert outcome_of_status(status, b"") is None


def test_a_file_over_500_kib_is_marked_truncated():
    outcome = outcome_of_status(200, b"Disallow: /x\n" * (MAX_SIZE // 10))
    assert outcome is not None
    assert outcome.truncated


def test_rules_are_a_scrapy_robot_parser_usable_as_robotstxt_parser():
    rules = RobotsRules.from_crawler(get_crawler(), b"User-agent: *\nDisallow: /x\nCrawl-delay: 2")
    assert isinstance(rules, RobotParser)
    assert not rules.allowed("http://a.example/x", UA)
    assert rules.allowed("http://a.example/y", UA)
    assert rules.crawl_delay(UA) == 2.0
