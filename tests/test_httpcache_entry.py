"""The cache entry format without Redis: what is compressed, which classes come back."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from scrapy.http import HtmlResponse, Response, TextResponse

from scrapy_polite._httpcache_entry import MAGIC, CacheEntryError, decode_entry, encode_entry
from scrapy_polite.testing.site import page_body
from tests.conftest import html_response


def test_compression_is_skipped_where_it_is_not_worth_it():
    def encoding(response: Response) -> str:
        data = encode_entry(response, stored_at=0)
        entry = decode_entry(data)
        assert entry.body == response.body
        return json.loads(data[len(MAGIC) :].partition(b"\n")[0])["body"]

    text = page_body("example.com", 2)
    assert encoding(html_response(body=text)) == "zlib"
    assert encoding(html_response(body=text[:100])) == "raw"  # tiny
    assert encoding(html_response(body=os.urandom(4000))) == "raw"  # incompressible
    gzipped = html_response(body=text, headers=[("Content-Encoding", "gzip")])
    assert encoding(gzipped) == "raw"  # already compressed by the site
    image = Response("http://example.com/i.png", body=text, headers={"Content-Type": "image/png"})
    assert encoding(image) == "raw"
    level0 = encode_entry(html_response(body=text), stored_at=0, compression_level=0)
    assert b'"body":"raw"' in level0


def test_text_response_class_is_kept_and_unknown_class_is_guessed():
    plain = TextResponse("http://example.com/t.txt", body=b"hello " * 100, encoding="utf-8")
    assert type(decode_entry(encode_entry(plain, stored_at=0)).response()) is TextResponse
    data = encode_entry(html_response(), stored_at=0).replace(
        b'"class":"html"', b'"class":"os.system"'
    )
    assert type(decode_entry(data).response()) is HtmlResponse


def test_a_pickle_or_foreign_bytes_never_decode():
    for data in (pickle.dumps({"status": 200}), b"", b"SPHC/2\n{}\n", MAGIC + b"{}"):
        with pytest.raises(CacheEntryError):
            decode_entry(data)


def test_status_url_headers_body_and_stored_time_round_trip():
    response = html_response(
        "http://example.com/a?b=1",
        status=203,
        headers=[("Content-Type", "text/html"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
    )
    entry = decode_entry(encode_entry(response, stored_at=1234.5))
    assert (entry.status, entry.url, entry.stored_at) == (203, response.url, 1234.5)
    assert entry.headers.count(("Set-Cookie", "a=1")) == 1
    back = entry.response()
    assert back.headers.getlist("Set-Cookie") == [b"a=1", b"b=2"]
    assert back.body == response.body
