"""The cache entry format: one Redis string per response, never pickle.

::

    SPHC/1\n{"status": 200, "url": ..., "headers": [[name, value], ...], ...}\n<body>

a magic line, one line of JSON (status, URL, every header value in order,
stored-at time, body encoding and size, and what ``Response.to_dict()`` adds:
the response class, flags, protocol, IP address, a text response's declared
encoding and the extra ``attributes`` a subclass declares), then the body, raw
or zlib-compressed. :func:`decode_entry` checks every field and refuses bodies
larger than announced (no zlib bombs); whatever it cannot read raises
:class:`CacheEntryError`, which the storage counts as a miss.

A class named in an entry is resolved only among modules already imported, and
only if it is a ``Response`` subclass: nothing is imported or called on the
strength of a name read from a shared Redis. A plain ``Response`` names no
class, and comes back as the class Scrapy's downloader would have built
(``HtmlResponse`` for an HTML page), as with Scrapy's own storages.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from scrapy.http import Headers, HtmlResponse, JsonResponse, Response, TextResponse, XmlResponse
from scrapy.responsetypes import responsetypes

from scrapy_polite.serializer import from_json_value, to_json_value

__all__ = ["MAGIC", "CacheEntry", "CacheEntryError", "decode_entry", "encode_entry"]

#: The first bytes of every entry: the format's name and version.
MAGIC = b"SPHC/1\n"

# The short class names of entries written before 0.2 (a dotted path since).
_SHORT_NAMES: dict[str, type[Response]] = {
    "response": Response,
    "text": TextResponse,
    "html": HtmlResponse,
    "xml": XmlResponse,
    "json": JsonResponse,
}
# The attributes every entry stores in fields of its own; a subclass's other
# ``attributes`` go in "attrs". A request and a certificate belong to one crawl.
_OWN_FIELDS = frozenset(
    ("url", "headers", "body", "flags", "status", "ip_address", "protocol", "encoding")
)
_NOT_STORED = frozenset(("request", "certificate"))
_CACHED_FLAG = "cached"  # HttpCacheMiddleware's, added again on every hit

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
    response_class: str | None = None  # a dotted path (or a short name before 0.2)
    protocol: str | None = None
    ip_address: str | None = None
    encoding: str | None = None  # a text response's declared encoding
    flags: tuple[str, ...] = ()
    attributes: dict[str, Any] | None = None  # a subclass's own, as JSON data

    def response(self) -> Response:
        """The response, of its class; :class:`CacheEntryError` if that cannot be."""
        headers: dict[bytes, list[bytes]] = {}  # the response makes it Headers, once
        for name, value in self.headers:
            headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
        if self.response_class is None:
            cls = responsetypes.from_args(headers=Headers(headers), url=self.url, body=self.body)
        else:
            cls = _response_class(self.response_class)
        fields: dict[str, Any] = {
            "url": self.url,
            "status": self.status,
            "headers": headers,
            "body": self.body,
            "flags": list(self.flags),
            "protocol": self.protocol,
            "ip_address": ip_address(self.ip_address) if self.ip_address else None,
        }
        if self.encoding is not None and issubclass(cls, TextResponse):
            fields["encoding"] = self.encoding
        if self.attributes:
            fields.update(from_json_value(self.attributes))
        try:
            from_dict = getattr(cls, "from_dict", None)  # Scrapy 2.19 on
            return from_dict(fields) if from_dict is not None else cls(**fields)
        except (TypeError, ValueError) as exc:
            raise CacheEntryError(f"{cls.__name__} cannot be rebuilt: {exc}") from None


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
    cls = type(response)
    if cls is not Response:  # a plain Response comes back as the downloader would build it
        header["class"] = f"{cls.__module__}.{cls.__name__}"
    if response.protocol:
        header["protocol"] = response.protocol
    if response.ip_address is not None:
        header["ip"] = str(response.ip_address)
    # Only an encoding given to the constructor: one read from the headers or the
    # body is found again from the same headers and body.
    declared = getattr(response, "_encoding", None) if isinstance(response, TextResponse) else None
    if declared:
        header["encoding"] = declared
    flags = [flag for flag in response.flags if flag != _CACHED_FLAG]
    if flags:
        header["flags"] = to_json_value(flags, "flags")
    extra = [name for name in cls.attributes if name not in _OWN_FIELDS and name not in _NOT_STORED]
    if extra:
        header["attrs"] = to_json_value(
            {name: getattr(response, name) for name in extra}, f"{cls.__name__} attribute"
        )
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
            encoding=_typed(header.get("encoding"), (str, type(None))),
            flags=tuple(_flags(header.get("flags", []))),
            attributes=_typed(header.get("attrs"), (dict, type(None))),
        )
    except CacheEntryError:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CacheEntryError(f"bad header: {exc}") from None
    if not 100 <= entry.status <= 999:
        raise CacheEntryError(f"bad status {entry.status}")
    return entry


def _response_class(name: str) -> type[Response]:
    """The class an entry names, if it is a loaded ``Response`` subclass.

    Looked up in ``sys.modules`` and the module's namespace only: no import, no
    module ``__getattr__``, no call. Anything else is a :class:`CacheEntryError`.
    """
    short = _SHORT_NAMES.get(name)
    if short is not None:
        return short
    module_name, _, class_name = name.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        raise CacheEntryError(f"class {name!r}: module {module_name!r} is not loaded")
    cls = vars(module).get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, Response)):
        raise CacheEntryError(f"{name!r} is not a Response class")
    return cls


def _flags(value: Any) -> list[str]:
    flags: list[str] = _typed(value, list)
    if not all(type(flag) is str for flag in flags):
        raise CacheEntryError("flags are not text")
    return flags


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
