"""Placeholder: implemented in its own issue."""

from __future__ import annotations

from typing import Any

from scrapy.exceptions import NotConfigured


class ProcessPipeline:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotConfigured("ProcessPipeline is not implemented yet")
