"""Typed, validated reads of ``POLITE_*`` settings.

Every component gathers its settings once, in ``from_crawler``, through these
getters. A value that cannot be used raises :class:`PoliteSettingError`, whose
message names the setting and the value, so a crawl with a bad setting stops at
start-up instead of misbehaving later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings


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


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} from {minimum} to {maximum}"
    if minimum is not None:
        return f"{kind} of at least {minimum}"
    if maximum is not None:
        return f"{kind} of at most {maximum}"
    return kind
