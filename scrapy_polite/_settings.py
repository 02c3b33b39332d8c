"""Typed, validated reads of ``POLITE_*`` settings.

Every component gathers its settings once, in ``from_crawler``, through these
getters. A value that cannot be used raises :class:`PoliteSettingError`, whose
message names the setting and the value, so a crawl with a bad setting stops at
start-up instead of misbehaving later.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from scrapy_polite._robots_rules import product_token

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

__all__ = [
    "PoliteSettingError",
    "as_list",
    "get_bool",
    "get_choice",
    "get_dict",
    "get_float",
    "get_int",
    "get_str",
    "robots_user_agent",
]


class PoliteSettingError(ValueError):
    """A ``POLITE_*`` (or related) setting has a value that cannot be used."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"Invalid setting {name}={value!r}: expected {expected}.")
        self.name = name
        self.value = value


def get_float(
    settings: BaseSettings,
    name: str,
    default: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Read *name* as a float within ``[minimum, maximum]``."""
    raw = settings.get(name, default)
    expected = _range_text("a number", minimum, maximum)
    if isinstance(raw, bool):
        raise PoliteSettingError(name, raw, expected)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise PoliteSettingError(name, raw, expected) from None
    if (
        value != value
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise PoliteSettingError(name, raw, expected)
    return value


def get_int(
    settings: BaseSettings,
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """Read *name* as an integer within ``[minimum, maximum]``."""
    raw = settings.get(name, default)
    expected = _range_text("a whole number", minimum, maximum)
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise PoliteSettingError(name, raw, expected)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise PoliteSettingError(name, raw, expected) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise PoliteSettingError(name, raw, expected)
    return value


def get_bool(settings: BaseSettings, name: str, default: bool) -> bool:
    """Read *name* as a boolean (``True``/``False``, 1/0, ``"true"``/``"false"``)."""
    raw = settings.get(name, default)
    try:
        return settings.getbool(name, default)
    except ValueError:
        raise PoliteSettingError(name, raw, "true or false") from None


def get_choice(settings: BaseSettings, name: str, default: str, choices: tuple[str, ...]) -> str:
    """Read *name* as one of *choices*."""
    raw = settings.get(name, default)
    if raw not in choices:
        raise PoliteSettingError(name, raw, "one of " + ", ".join(repr(c) for c in choices))
    return str(raw)


def get_str(
    settings: BaseSettings, name: str, default: str | None, *, allow_none: bool = False
) -> str | None:
    """Read *name* as a non-empty string."""
    raw = settings.get(name, default)
    if raw is None and allow_none:
        return None
    if not isinstance(raw, str) or not raw:
        raise PoliteSettingError(name, raw, "a non-empty string")
    return raw


def as_list(name: str, raw: Any, expected: str) -> list[Any]:
    """*raw* as a list, in every form a Scrapy user writes one.

    A list or tuple; one number (``-s POLITE_DELAY=2``); a JSON list
    (``-s 'POLITE_DELAY=[0.3, 0.6]'``); a comma-separated string, as Scrapy's
    ``getlist`` reads one (``-s POLITE_DELAY=0.3,0.6``); or, for the few that
    are ranges, ``"0.3-0.6"`` or ``"0.3 0.6"``. Anything else raises
    :class:`PoliteSettingError` with *expected*.
    """
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [raw]
    if not isinstance(raw, str) or not raw.strip():
        raise PoliteSettingError(name, raw, expected)
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise PoliteSettingError(name, raw, expected) from None
        if not isinstance(value, list):
            raise PoliteSettingError(name, raw, expected)
        return value
    if "," in text:
        return [part.strip() for part in text.split(",")]
    return text.replace("-", " ").split()


def get_dict(settings: BaseSettings, name: str) -> dict[str, Any]:
    """Read *name* as a dict: a dict, or a JSON object (``-s 'NAME={...}'``)."""
    raw = settings.get(name)
    try:
        return dict(settings.getdict(name))
    except (ValueError, TypeError):
        raise PoliteSettingError(name, raw, "a dict, or a JSON object") from None


def robots_user_agent(settings: BaseSettings) -> tuple[str, str]:
    """The user agent robots.txt is read for, and its product token.

    The first of ``POLITE_ROBOTS_USER_AGENT``, ``ROBOTSTXT_USER_AGENT`` and
    ``USER_AGENT`` that is set; one without a product token (RFC 9309 matches
    groups by it) is an error naming that setting.
    """
    for name in ("POLITE_ROBOTS_USER_AGENT", "ROBOTSTXT_USER_AGENT", "USER_AGENT"):
        user_agent = settings.get(name)
        if user_agent:
            break
    else:
        name, user_agent = "USER_AGENT", settings.get("USER_AGENT")
    token = product_token(user_agent) if isinstance(user_agent, (str, bytes)) else None
    if token is None:
        raise PoliteSettingError(
            name, user_agent, "a user agent that starts with a product token, like 'MyBot/1.0'"
        )
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    return str(user_agent), token


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} from {minimum} to {maximum}"
    if minimum is not None:
        return f"{kind} of at least {minimum}"
    if maximum is not None:
        return f"{kind} of at most {maximum}"
    return kind
