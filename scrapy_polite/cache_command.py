"""``scrapy polite-cache``: see and clear the Redis HTTP cache without Redis commands.

Registered through the ``scrapy.commands`` entry point, so it is available
wherever scrapy-polite is installed, inside a project (whose settings give the
Redis URL and key prefix) or outside one (pass ``-s POLITE_REDIS_URL=...`` or
``--redis-url``)::

    scrapy polite-cache stats                      # entries and bytes per namespace
    scrapy polite-cache stats --namespace myspider
    scrapy polite-cache clear --namespace myspider # delete one namespace
    scrapy polite-cache clear --all                # delete every namespace
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import redis
from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from scrapy_polite._redis import RedisLink, command_redis_url, redact
from scrapy_polite._settings import get_str
from scrapy_polite.httpcache import (
    DEFAULT_PREFIX,
    URL_SETTING,
    cache_usage,
    clear_namespace,
)

if TYPE_CHECKING:
    import argparse

__all__ = ["PoliteCacheCommand"]

ACTIONS = ("stats", "clear")


class PoliteCacheCommand(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings: ClassVar[dict[str, Any]] = {"LOG_ENABLED": False}

    def syntax(self) -> str:
        return "stats|clear [--namespace NAME | --all] [--redis-url URL]"

    def short_desc(self) -> str:
        return "Show or clear scrapy-polite's Redis HTTP cache"

    def long_desc(self) -> str:
        return (
            "stats: entries and bytes per namespace (a spider's name, or "
            "POLITE_HTTPCACHE_NAMESPACE). clear: delete the entries of one namespace "
            "(--namespace) or of all (--all). The Redis URL and key prefix come from "
            "the project's settings (POLITE_HTTPCACHE_REDIS_URL, POLITE_REDIS_URL, "
            "REDIS_URL; POLITE_HTTPCACHE_PREFIX), -s, or --redis-url."
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument("--namespace", metavar="NAME", help="only this namespace")
        parser.add_argument("--all", action="store_true", help="clear: every namespace")
        parser.add_argument("--redis-url", metavar="URL", help="the cache's Redis")

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        assert self.settings is not None
        if len(args) != 1 or args[0] not in ACTIONS:
            raise UsageError("say what to do: stats or clear", print_help=False)
        url = command_redis_url(self.settings, URL_SETTING, opts.redis_url)
        prefix = get_str(self.settings, "POLITE_HTTPCACHE_PREFIX", DEFAULT_PREFIX)
        assert prefix is not None
        link = RedisLink.standalone(self.settings, url)
        client = link.client
        try:
            if args[0] == "stats":
                self._stats(client, url, prefix, opts.namespace)
            else:
                self._clear(client, prefix, opts.namespace, everything=opts.all)
        except redis.RedisError as exc:
            print(f"Redis at {redact(url)}: {type(exc).__name__}: {exc}")
            self.exitcode = 1
        finally:
            link.release()

    def _stats(self, client: redis.Redis, url: str, prefix: str, namespace: str | None) -> None:
        usage = cache_usage(client, prefix)
        if namespace is not None:
            usage = {ns: u for ns, u in usage.items() if ns == namespace}
        print(f"Redis HTTP cache at {redact(url)}, keys {prefix}:<namespace>:<fingerprint>")
        width = max([len("namespace"), *(len(ns) for ns in usage)])
        print(f"{'namespace':<{width}}  {'entries':>9}  {'bytes':>13}")
        for ns, u in usage.items():
            print(f"{ns:<{width}}  {u.entries:>9}  {u.bytes:>13}")
        if len(usage) != 1:
            entries = sum(u.entries for u in usage.values())
            size = sum(u.bytes for u in usage.values())
            print(f"{'(total)':<{width}}  {entries:>9}  {size:>13}")

    def _clear(
        self, client: redis.Redis, prefix: str, namespace: str | None, *, everything: bool
    ) -> None:
        if (namespace is None) == (not everything):
            raise UsageError("clear needs --namespace NAME or --all (not both)", print_help=False)
        namespaces = [namespace] if namespace is not None else list(cache_usage(client, prefix))
        for ns in namespaces:
            deleted = clear_namespace(client, ns, prefix)
            print(f"namespace {ns}: {deleted} entries deleted")
