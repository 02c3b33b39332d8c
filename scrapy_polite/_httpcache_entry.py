"""The cache entry format: one Redis string per response, never pickle.

::

    SPHC/1\n{"status": 200, "url": ..., "headers": [[name, value], ...], ...}\n<body>

a magic line, one line of JSON (status, URL, every header value in order,
stored-at time, body encoding and size, response class), then the body, raw or
zlib-compressed. :func:`decode_entry` checks every field and refuses bodies
larger than announced (no zlib bombs); whatever it cannot read raises
:class:`CacheEntryError`, which the storage counts as a miss.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from scrapy.http import Headers, HtmlResponse, JsonResponse, Response, TextResponse, XmlResponse
from scrapy.responsetypes import responsetypes

__all__ = ["MAGIC", "CacheEntry", "CacheEntryError", "decode_entry", "encode_entry"]

#: The first bytes of every entry: the format's name and version.
MAGIC = b"SPHC/1\n"

# Response classes an entry may name; anything else is guessed from the
# headers, URL and body, as Scrapy's downloader does. A class path read from
# Redis is never imported.
_CLASSES: dict[str, type[Response]] = {
    "response": Response,
    "text": TextResponse,
    "html": HtmlResponse,
    "xml": XmlResponse,
    "json": JsonResponse,
}
_CLASS_NAMES = {cls: name for name, cls in _CLASSES.items()}

# Bodies of these types are already compressed: zlib would spend time for nothing.
_COMPRESSED_TYPES = (b"image/", b"audio/", b"video/", b"font/woff")
_COMPRESSED_SUBTYPES = (b"zip", b"gzip", b"x-gzip", b"x-7z-compressed", b"x-bzip2", b"x-xz")
# No body announcing more than this is decompressed (Scrapy's DOWNLOAD_MAXSIZE default).
_MAX_BODY_SIZE = 1024 * 1024 * 1024
# A compressed body is kept only if it is at most this fraction of the raw one.
_WORTH_IT = 0.9


class CacheEntryError(ValueError):
    """Bytes that are not a valid cache entry."""


@dataclass(frozen=True)
class CacheEntry:
    """One cached response, as decoded from Redis."""

    status: int
    url: str
    headers: list[tuple[str, str]]  # every value of every header, latin-1 text
    body: bytes
    stored_at: float  # Unix time
    response_class: str | None = None
    protocol: str | None = None
    ip_address: str | None = None

    def response(self) -> Response:
        headers: dict[bytes, list[bytes]] = {}
        for name, value in self.headers:
            headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
        cls = _CLASSES.get(self.response_class or "") or responsetypes.from_args(
            headers=Headers(headers), url=self.url, body=self.body
        )
        return cls(
            url=self.url,
            status=self.status,
            headers=headers,
            body=self.body,
            protocol=self.protocol,
            ip_address=ip_address(self.ip_address) if self.ip_address else None,
        )


def encode_entry(
    response: Response,
    *,
    stored_at: float,
    compression_level: int = 1,
    compress_min_size: int = 256,
) -> bytes:
    """*response* as cache entry bytes: magic line, JSON line, body.

    The body is zlib-compressed at *compression_level* unless that isn't worth
    it: a level of 0, a body under *compress_min_size* bytes, a body that is
    already compressed (a ``Content-Encoding``, an image, an archive), or one
    that zlib shrinks by less than 10 %.
    """
    body = response.body
    encoding = "raw"
    payload = body
    if (
        compression_level
        and len(body) >= compress_min_size
        and not _already_compressed(response.headers)
    ):
        compressed = zlib.compress(body, compression_level)
        if len(compressed) <= len(body) * _WORTH_IT:
            encoding, payload = "zlib", compressed
    header: dict[str, Any] = {
        "status": response.status,
        "url": response.url,
        "headers": [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.items()
            for value in values
        ],
        "stored_at": stored_at,
        "body": encoding,
        "size": len(body),
    }
    class_name = _CLASS_NAMES.get(type(response))
    if class_name:
        header["class"] = class_name
    if response.protocol:
        header["protocol"] = response.protocol
    if response.ip_address is not None:
        header["ip"] = str(response.ip_address)
    line = json.dumps(header, separators=(",", ":")).encode("ascii")
    return b"".join((MAGIC, line, b"\n", payload))


def decode_entry(data: bytes) -> CacheEntry:
    """Parse entry bytes written by :func:`encode_entry`; raise :class:`CacheEntryError`."""
    if not data.startswith(MAGIC):
        raise CacheEntryError("not a scrapy-polite cache entry")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CacheEntryError("truncated header")
    try:
        header = json.loads(data[len(MAGIC) : end])
        entry = CacheEntry(
            status=_typed(header["status"], int),
            url=_typed(header["url"], str),
            headers=_headers(header["headers"]),
            body=_body(header, data[end + 1 :]),
            stored_at=float(_typed(header["stored_at"], (int, float))),
            response_class=_typed(header.get("class"), (str, type(None))),
            protocol=_typed(header.get("protocol"), (str, type(None))),
            ip_address=_typed(header.get("ip"), (str, type(None))),
        )
    except CacheEntryError:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CacheEntryError(f"bad header: {exc}") from None
    if not 100 <= entry.status <= 999:
        raise CacheEntryError(f"bad status {entry.status}")
    return entry


def _already_compressed(headers: Headers) -> bool:
    encoding = headers.get(b"Content-Encoding")
    if encoding and encoding.strip().lower() != b"identity":
        return True
    content_type = (headers.get(b"Content-Type") or b"").split(b";")[0].strip().lower()
    if content_type.startswith(_COMPRESSED_TYPES):
        return True
    return content_type.startswith(b"application/") and content_type[12:] in _COMPRESSED_SUBTYPES


def _body(header: dict[str, Any], payload: bytes) -> bytes:
    size = _typed(header["size"], int)
    if not 0 <= size <= _MAX_BODY_SIZE:
        raise CacheEntryError(f"bad body size {size}")
    encoding = header["body"]
    if encoding == "raw":
        body = payload
    elif encoding == "zlib":
        decompressor = zlib.decompressobj()
        body = decompressor.decompress(payload, size + 1)  # never more than announced
        if not decompressor.eof or decompressor.unused_data:
            raise CacheEntryError("compressed body is truncated or longer than announced")
    else:
        raise CacheEntryError(f"unknown body encoding {encoding!r}")
    if len(body) != size:
        raise CacheEntryError(f"body is {len(body)} bytes, {size} announced")
    return body


def _headers(value: Any) -> list[tuple[str, str]]:
    pairs = [(name, text) for name, text in _typed(value, list)]
    if not all(type(name) is str and type(text) is str for name, text in pairs):
        raise CacheEntryError("headers are not [name, value] text pairs")
    return pairs


def _typed(value: Any, types: type | tuple[type, ...]) -> Any:
    if not isinstance(value, types) or isinstance(value, bool):
        raise CacheEntryError(f"unexpected value {value!r}")
    return value
