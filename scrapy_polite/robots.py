"""Placeholder: implemented in its own issue."""

from __future__ import annotations

from typing import Any

from scrapy.exceptions import NotConfigured


class PoliteRobotsTxtMiddleware:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotConfigured("PoliteRobotsTxtMiddleware is not implemented yet")
