"""robots.txt results shared through Redis, so a cluster fetches each file once.

For an origin ``scheme://host:port`` three keys of the host
(:func:`~scrapy_polite._redis.domain_key`, one hash slot per host):

- ``polite:{host}:robots:<origin>``: the result, JSON (never pickle), with a
  TTL equal to ``POLITE_ROBOTS_EXPIRY``: a file (``"rules"``) or
  ``"unavailable"``;
- ``...:down``: a short marker that the origin was found unreachable, so the
  other crawlers wait out the same back-off instead of fetching too;
- ``...:lock``: held by the one crawler fetching the file (``SET NX PX``).

:meth:`RobotsStore.claim` is one atomic script: the stored result, the down
marker, or the lock, in one round trip.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from scrapy_polite._redis import domain_key
from scrapy_polite._robots_rules import MAX_SIZE, Outcome

if TYPE_CHECKING:
    from scrapy_polite._redis import RedisLink

__all__ = ["COMPONENT", "Claim", "RobotsStore"]

logger = logging.getLogger(__name__)

COMPONENT = "robots"
FORMAT = 1

_CLAIM = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry, redis.call('PTTL', KEYS[1])} end
local down = redis.call('GET', KEYS[2])
if down then return {2, down, redis.call('PTTL', KEYS[2])} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {3} end
return {0}
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


@dataclass(frozen=True)
class Claim:
    """What :meth:`RobotsStore.claim` found."""

    outcome: Outcome | None = None  # a result another crawler stored
    lock: str | None = None  # we fetch, holding this lock token
    # Neither: another crawler is fetching; look again shortly.


class RobotsStore:
    """The shared results, through the crawler's :class:`~scrapy_polite._redis.RedisLink`.

    Every method may raise :class:`~scrapy_polite._redis.RedisUnavailable`;
    the middleware then goes on with what this process knows.
    """

    def __init__(self, link: RedisLink, expiry: float, lock_ttl: float) -> None:
        self.link = link
        self.expiry = expiry
        self.lock_ttl = lock_ttl

    async def claim(self, host: str, origin: str) -> Claim:
        """A stored result, or the fetch lock, or neither (someone else fetches)."""
        token = secrets.token_hex(8)
        key = _key(host, origin)
        keys = (key, key + ":down", key + ":lock")
        lock_ms = max(1, int(self.lock_ttl * 1000))
        (reply,) = await self.link.call(
            COMPONENT, ("EVAL", _CLAIM, len(keys), *keys, token, lock_ms)
        )
        if isinstance(reply, Exception):
            raise reply
        found, *rest = reply
        if found == 1:
            outcome = _read_entry(origin, rest[0], rest[1], self.expiry)
            # An entry we cannot read is fetched again, and overwritten.
            return Claim(outcome=outcome) if outcome is not None else Claim(lock=token)
        if found == 2:
            reason = _read_down(rest[0])
            retry_in = max(0.001, int(rest[1]) / 1000)
            detail = f"{reason}, seen by another crawler"
            return Claim(Outcome("unreachable", detail, retry_in=retry_in))
        return Claim(lock=token) if found == 3 else Claim()

    async def publish(
        self, host: str, origin: str, token: str, outcome: Outcome, retry_in: float
    ) -> None:
        """Store what our fetch found, and give the lock back."""
        key = _key(host, origin)
        entry: dict[str, Any]
        if outcome.kind == "unreachable":
            entry = {"v": FORMAT, "reason": outcome.detail, "at": time.time()}
            store = ("SET", key + ":down", json.dumps(entry), "PX", max(1, int(retry_in * 1000)))
        else:
            entry = {
                "v": FORMAT,
                "kind": outcome.kind,
                "detail": outcome.detail,
                "body": outcome.text,
                "fetched_at": time.time(),
            }
            store = ("SET", key, json.dumps(entry), "PX", max(1, int(self.expiry * 1000)))
        await self.link.call(COMPONENT, store, ("EVAL", _RELEASE, 1, key + ":lock", token))


def _key(host: str, origin: str) -> str:
    return domain_key(host, "robots", origin)


def _read_entry(origin: str, raw: bytes, ttl_ms: Any, expiry: float) -> Outcome | None:
    """The stored JSON entry, or ``None`` (read as a miss) if it is not ours."""
    try:
        entry = json.loads(raw)
        kind: Literal["rules", "unavailable"] = entry["kind"]
        body = entry["body"]
        if entry["v"] != FORMAT or kind not in ("rules", "unavailable"):
            raise ValueError(f"unknown entry version or kind: {entry['v']!r}, {kind!r}")
        if not isinstance(body, str):
            raise TypeError("body is not a string")
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("Ignoring an unreadable robots.txt entry for %s in Redis: %s", origin, exc)
        return None
    ttl = int(ttl_ms) / 1000 if int(ttl_ms) > 0 else expiry
    detail = f"{entry.get('detail', '')}, from Redis"
    return Outcome(kind, detail, body[:MAX_SIZE], ttl=ttl)


def _read_down(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["reason"])
    except (ValueError, TypeError, KeyError):
        return "unreachable"
