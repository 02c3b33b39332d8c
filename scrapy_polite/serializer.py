"""A request serializer for scrapy-redis that never unpickles: JSON, with bytes spelled out.

``SCHEDULER_SERIALIZER = "scrapy_polite.serializer"`` (the add-on sets it in
cluster mode). scrapy-redis stores requests pickled by default, so anyone who
can write to that Redis runs code in every worker; JSON read back runs nothing.

scrapy-redis hands :func:`dumps` the dict of ``Request.to_dict()``: bytes (the
body, header names and values) are written as ``{"$b": "<base64>"}``, tuples
as lists. A value JSON cannot hold (a set, an object, a function in ``meta`` or
``cb_kwargs``) fails at once, when the request is scheduled, with a
:class:`TypeError` naming its place (``meta['item']``), instead of losing the
request later.
"""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["dumps", "from_json_value", "loads", "to_json_value"]

_BYTES = "$b"


def dumps(obj: dict[str, Any]) -> bytes:
    """The JSON bytes of a request dict; :class:`TypeError` names what cannot be stored."""
    return json.dumps(_encode(obj, "request"), separators=(",", ":")).encode()


def loads(data: bytes | str) -> dict[str, Any]:
    """The request dict back from :func:`dumps`'s bytes."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a serialized request")
    decoded: dict[str, Any] = _decode(value)
    return decoded


def to_json_value(value: Any, where: str) -> Any:
    """*value* as plain JSON data, bytes tagged; :class:`TypeError` names *where* it fails."""
    return _encode(value, where)


def from_json_value(value: Any) -> Any:
    """The value :func:`to_json_value` was given, back from its JSON data."""
    return _decode(value)


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = key.decode("latin-1") if isinstance(key, bytes) else key
            if not isinstance(name, str):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}: "
                    "the shared queue stores requests as JSON, whose keys are strings"
                )
            if name == _BYTES:
                raise TypeError(f"{where} has a key {_BYTES!r}, which the serializer reserves")
            out[name] = _encode(item, f"{where}[{name!r}]" if where != "request" else name)
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r:.80}): the shared queue stores requests "
        "as JSON (no pickle); put plain data there (str, int, float, bool, None, bytes, "
        "lists and dicts)"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            return base64.b64decode(value[_BYTES])
        return {k: _decode(v) for k, v in value.items()}
    return value
