"""RFC 9309's rules, free of Scrapy's engine and of Redis.

- :func:`product_token`: the name a crawler matches robots.txt groups by;
- :class:`RobotsRules`: one file's rules, groups matched by exact product
  token, behind Scrapy's :class:`~scrapy.robotstxt.RobotParser` contract (what
  the ``robots_parsed`` signal carries);
- :func:`decode_body`: the text of a body, cut to its first 500 KiB;
- :class:`Outcome` and :func:`outcome_of_status`: what one fetch of robots.txt
  means (section 2.3.1): a file to obey, "unavailable" (allow all) or
  "unreachable" (disallow all, for now).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from protego import Protego
from scrapy.robotstxt import RobotParser

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from typing_extensions import Self

__all__ = [
    "MAX_REDIRECTS",
    "MAX_SIZE",
    "REDIRECT_STATUSES",
    "Outcome",
    "RobotsRules",
    "decode_body",
    "outcome_of_status",
    "product_token",
]

logger = logging.getLogger(__name__)

MAX_SIZE = 500 * 1024  # RFC 9309: parse at least the first 500 KiB
MAX_REDIRECTS = 5  # RFC 9309: follow at least five consecutive redirects
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_TOKEN = re.compile(r"[A-Za-z_-]+")
_COMPATIBLE = re.compile(r"\(compatible;\s*([A-Za-z_-]+)", re.IGNORECASE)
# A superset of the user-agent lines Protego recognises ("User-agent: x",
# "useragent x", "User agent: x", ...), comments already removed.
_USER_AGENT_LINE = re.compile(r"^\s*user(?:-|\s*)agent\s*(?::|\s)\s*(?P<value>.*)$", re.IGNORECASE)
# Stands for every group that is not ours: "." and digits never occur in a
# product token, so Protego can never match it.
_OTHER_GROUP = "other.agent.0"


def product_token(user_agent: str | bytes) -> str | None:
    """The product token of a user agent string, as RFC 9309 matches it.

    ``"MyBot/1.0 (+https://example.com/bot)"`` gives ``"MyBot"``; a browser-like
    ``"Mozilla/5.0 (compatible; MyBot/1.0; ...)"`` gives ``"MyBot"``. ``None``
    when the string does not start with one (letters, ``-`` and ``_`` only).
    """
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    user_agent = user_agent.strip()
    if user_agent.lower().startswith("mozilla/"):
        compatible = _COMPATIBLE.search(user_agent)
        if compatible:
            return compatible.group(1)
    match = _TOKEN.match(user_agent)
    return match.group(0) if match else None


@dataclass(frozen=True)
class Outcome:
    """What one load of an origin's robots.txt gave."""

    kind: Literal["rules", "unavailable", "unreachable"]
    detail: str  # the status code, exception name or reason, for logs
    text: str = ""  # the file, when kind is "rules"
    ttl: float | None = None  # seconds left, when read from a shared store
    retry_in: float | None = None  # when another crawler saw it unreachable
    truncated: bool = False  # the file was over MAX_SIZE and was cut


def outcome_of_status(status: int, body: bytes) -> Outcome | None:
    """The meaning of a final (non-redirect) answer; ``None`` for a redirect.

    2xx is a file; 5xx, and 429 (Google's reading: the server asks to slow
    down), leave the origin unreachable; every other 4xx (and a 1xx or 3xx
    that is not followed) is unavailable: everything may be crawled.
    """
    if status in REDIRECT_STATUSES:
        return None
    if 200 <= status < 300:
        text, truncated = decode_body(body)
        return Outcome("rules", str(status), text, truncated=truncated)
    if status >= 500 or status == 429:
        return Outcome("unreachable", str(status))
    return Outcome("unavailable", str(status))


def decode_body(body: bytes) -> tuple[str, bool]:
    """The text of a robots.txt body cut to its first 500 KiB (whole lines), and
    whether it was cut. Undecodable bytes become U+FFFD: a garbage file is read,
    not rejected."""
    truncated = len(body) > MAX_SIZE
    if truncated:
        body = body[:MAX_SIZE]
        cut = max(body.rfind(b"\n"), body.rfind(b"\r"))
        if cut > 0:
            body = body[:cut]
    return body.decode("utf-8-sig", errors="replace"), truncated


class RobotsRules(RobotParser):
    """One origin's robots.txt, parsed by Protego, groups matched by exact product token.

    Protego matches a group whose name occurs at a word start of the user agent
    (``User-agent: my`` would apply to ``MyBot``), so each token gets its own
    Protego parse of the text in which every group name but ``*`` and that
    token is replaced by one that matches nothing. The methods take a full user
    agent string (or a bare token) and extract its product token.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._parsers: dict[str, Protego] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler, robotstxt_body: bytes) -> Self:
        """Scrapy's ``RobotParser`` constructor: ``ROBOTSTXT_PARSER`` can name this class."""
        return cls(decode_body(robotstxt_body)[0])

    def allowed(self, url: str | bytes, user_agent: str | bytes) -> bool:
        """Scrapy's ``RobotParser.allowed``."""
        if isinstance(url, bytes):
            url = url.decode("utf-8")
        name = self._agent(user_agent)
        return bool(self._parser(name).can_fetch(url, name))

    def crawl_delay(self, user_agent: str | bytes) -> float | None:
        """Seconds between two requests: the larger of ``Crawl-delay`` and
        ``Request-rate`` (seconds / requests) of the matching group, or ``None``."""
        name = self._agent(user_agent)
        parser = self._parser(name)
        delays = [parser.crawl_delay(name)]
        rate = parser.request_rate(name)
        if rate is not None and rate.requests:
            delays.append(rate.seconds / rate.requests)
        found = [float(d) for d in delays if d is not None]
        return max(found) if found else None

    @property
    def sitemaps(self) -> list[str]:
        """The ``Sitemap:`` URLs (site-wide: the same whatever the user agent)."""
        parser = next(iter(self._parsers.values()), None) or self._parser("*")
        return list(parser.sitemaps)

    def prepare(self, user_agent: str | bytes) -> Self:
        """Parse now for *user_agent* (meant to run in a thread for big files)."""
        self._parser(self._agent(user_agent))
        return self

    def _agent(self, user_agent: str | bytes) -> str:
        token = product_token(user_agent)
        return token.lower() if token else "*"

    def _parser(self, name: str) -> Protego:
        parser = self._parsers.get(name)
        if parser is None:
            parser = self._parsers[name] = _parse(_only_group(self.text, name))
        return parser


def _only_group(text: str, name: str) -> str:
    """*text* with every group name but ``*`` and *name* made unmatchable."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _USER_AGENT_LINE.match(line.split("#", 1)[0])
        if match is None:
            continue
        value = match.group("value").strip()
        if not value:
            continue
        if value == "*" or (value.startswith("*") and value[1].isspace()):
            lines[i] = "User-agent: *"
            continue
        token = _TOKEN.match(value)
        same = token is not None and token.group(0).lower() == name
        lines[i] = f"User-agent: {name if same else _OTHER_GROUP}"
    return "\n".join(lines)


def _parse(text: str) -> Protego:
    try:
        return Protego.parse(text)
    except Exception:  # Protego is lenient; whatever it cannot read allows everything
        logger.warning("Could not parse a robots.txt file; treating it as empty", exc_info=True)
        return Protego.parse("")
