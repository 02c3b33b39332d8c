"""The shared queue's JSON request serializer: round trips, clear errors, never a pickle."""

from __future__ import annotations

import json
import pickle

import pytest
import scrapy
from scrapy.utils.request import request_from_dict

from scrapy_polite import serializer
from tests.spiders import PagesSpider


def test_a_request_comes_back_the_same_through_json():
    spider = PagesSpider()
    request = scrapy.Request(
        "http://127.0.0.2/p/1?q=é",
        callback=spider.parse_page,
        method="POST",
        body=b"\x00\xffbinary",
        headers={"X-Token": "a", "Accept": ["text/html", "*/*"]},
        cookies={"session": "1"},
        meta={"depth": 2, "nested": {"list": [1, "two", None], "raw": b"\x01"}},
        cb_kwargs={"page": 7},
        priority=-3,
        dont_filter=True,
    )
    data = serializer.dumps(request.to_dict(spider=spider))
    assert isinstance(data, bytes)
    assert b"pickle" not in data
    back = request_from_dict(serializer.loads(data), spider=spider)
    assert (back.url, back.method, back.body, back.priority) == (
        request.url,
        "POST",
        b"\x00\xffbinary",
        -3,
    )
    assert back.headers.getlist("Accept") == [b"text/html", b"*/*"]
    assert back.meta["nested"] == {"list": [1, "two", None], "raw": b"\x01"}
    assert back.cb_kwargs == {"page": 7}
    assert back.callback == spider.parse_page
    assert back.dont_filter


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({"item": object()}, r"meta\['item'\] is a object"),
        ({"seen": {1, 2}}, r"meta\['seen'\] is a set"),
        ({"deep": {"fn": len}}, r"meta\['deep'\]\['fn'\] is a builtin_function_or_method"),
        ({"deep": {3: "x"}}, r"meta\['deep'\] has a key 3"),
    ],
)
def test_what_json_cannot_hold_fails_at_scheduling_naming_its_key(meta, named):
    request = scrapy.Request("http://127.0.0.2/", meta=meta)
    with pytest.raises(TypeError, match=named):
        serializer.dumps(request.to_dict())


def test_a_pickle_in_the_queue_is_refused_never_run():
    planted = pickle.dumps({"url": "http://127.0.0.2/"})
    # JSON's own error (the bytes are not even text): nothing is unpickled.
    with pytest.raises((UnicodeDecodeError, json.JSONDecodeError)):
        serializer.loads(planted)
