"""Placeholder: implemented in its own issue."""

from __future__ import annotations

from typing import Any

from scrapy.exceptions import NotConfigured


class RedisCacheStorage:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotConfigured("RedisCacheStorage is not implemented yet")
