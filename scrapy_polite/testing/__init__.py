"""Test support shared by scrapy-polite's tests, benchmarks and demo.

- :mod:`~scrapy_polite.testing.site`: a local web site serving many loopback
  addresses (127.0.0.2, 127.0.0.3, ...) as distinct hosts, recording what it saw;
- :mod:`~scrapy_polite.testing.redis_server`: a throw-away ``redis-server`` on a
  free port (never the user's 6379);
- :mod:`~scrapy_polite.testing.crawl`: a real Scrapy crawl in a child process,
  with its items and stats read back;
- :mod:`~scrapy_polite.testing.proxy`: a TCP proxy that delays every chunk, for a
  Redis "1 ms away" in the benchmarks.

Users may run them against their own settings too. Nothing here is imported by
the components themselves.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on *host* that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
