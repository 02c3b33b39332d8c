"""A local multi-host web site for tests, benchmarks and the demo.

One HTTP server thread per loopback address (127.0.0.2, 127.0.0.3, ...), all on
one port, so each address is a distinct host to Scrapy (a distinct download
slot). Every host serves generated pages by default:

- ``/`` (or ``/?n=N``): an index linking to ``/p/0`` ... ``/p/N-1`` (N defaults
  to the host's ``pages``);
- ``/p/<i>``: an HTML page of about 2 KB with a title and some text;
- ``/robots.txt``: 404 unless routed.

A test overrides any path of any host with :meth:`Site.route`, giving a
sequence of :class:`Reply` objects (served in turn, the last one repeating) or
a function of the :class:`Hit` that returns a ``Reply``. Every request is
recorded as a :class:`Hit` with its arrival time and the number of requests to
that host in flight at that moment, so tests assert on what the site saw.

Run as ``python -m scrapy_polite.testing.site`` to serve the generated pages until interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from scrapy_polite.testing import free_port

__all__ = ["HOSTS", "Hit", "Reply", "Site", "index_body", "page_body"]

# Linux's socket option for nanosecond receive timestamps (not in the socket module).
_SO_TIMESTAMPNS = 35

HOSTS: tuple[str, ...] = tuple(f"127.0.0.{i}" for i in range(2, 10))

_WORDS = [
    "polite",
    "crawler",
    "visits",
    "every",
    "domain",
    "with",
    "a",
    "random",
    "delay",
    "and",
    "reads",
    "robots",
    "before",
    "fetching",
    "pages",
    "from",
    "the",
    "local",
    "test",
    "site",
    "while",
    "redis",
    "keeps",
    "cached",
    "responses",
    "for",
    "the",
    "next",
    "run",
    "of",
    "the",
    "spider",
]


@dataclass(frozen=True)
class Reply:
    """What the site answers: status, headers, body, and an optional wait."""

    status: int = 200
    body: bytes | str = b""
    headers: Sequence[tuple[str, str]] = ()
    delay: float = 0.0
    close: bool = False  # drop the connection without answering
    drip: float = 0.0  # send the body one byte every this many seconds, never ending

    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


@dataclass(frozen=True)
class Hit:
    """One request as the site saw it."""

    host: str
    path: str
    method: str
    time: float  # time.monotonic() at arrival
    in_flight: int  # requests to this host being served at arrival, this one included
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Hit], Reply]


def page_body(host: str, index: int, size: int = 2000) -> bytes:
    """The generated page ``/p/<index>`` of *host*: deterministic text."""
    words = itertools.islice(
        itertools.cycle(_WORDS[index % len(_WORDS) :] + _WORDS[: index % len(_WORDS)]),
        size // 7,
    )
    text = " ".join(words)
    return (
        f"<html><head><title>{host} page {index}</title></head>"
        f"<body><h1>Page {index}</h1><p>{text}</p></body></html>"
    ).encode()


def index_body(count: int) -> bytes:
    links = "".join(f'<a href="/p/{i}">page {i}</a>\n' for i in range(count))
    return f"<html><head><title>index</title></head><body>{links}</body></html>".encode()


class Site:
    """The multi-host site; use as a context manager or call start()/stop()."""

    def __init__(self, hosts: Sequence[str] = HOSTS, port: int = 0, pages: int = 20) -> None:
        self.hosts = tuple(hosts)
        self.port = port
        self.default_pages = pages
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], Handler] = {}
        self._pages: dict[str, int] = {}
        self._latency: dict[str, float] = {}
        self._hits: list[Hit] = []
        self._in_flight: dict[str, int] = {}
        self._servers: list[ThreadingHTTPServer] = []

    # -- life cycle -------------------------------------------------------------
    def __enter__(self) -> Site:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for attempt in range(20):
            try:
                self._bind_all()
                break
            except OSError:
                self._close_servers()
                if attempt == 19 or self.port:
                    raise
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._close_servers()

    def _bind_all(self) -> None:
        port = self.port or free_port(self.hosts[0])
        for host in self.hosts:
            server = _Server((host, port), _RequestHandler)
            server.site = self
            self._servers.append(server)
        self.port = port

    def _close_servers(self) -> None:
        for server in self._servers:
            server.server_close()
        self._servers = []

    # -- configuration ----------------------------------------------------------
    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, host: str, path: str, *replies: Reply | Handler) -> None:
        """Answer *path* on *host* with *replies* in turn (the last repeats)."""
        if len(replies) == 1 and callable(replies[0]) and not isinstance(replies[0], Reply):
            self._routes[(host, path)] = replies[0]
            return
        queue = list(replies)
        if not queue or not all(isinstance(r, Reply) for r in queue):
            raise ValueError("route() takes Reply objects or one handler function")

        def next_reply(hit: Hit) -> Reply:
            with self._lock:
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
            assert isinstance(reply, Reply)
            return reply

        self._routes[(host, path)] = next_reply

    def set_pages(self, host: str, count: int) -> None:
        """Make the index of *host* link to *count* generated pages."""
        self._pages[host] = count

    def set_latency(self, host: str, seconds: float) -> None:
        """Make the generated pages of *host* answer after *seconds*."""
        self._latency[host] = seconds

    def reset(self) -> None:
        """Forget routes, page counts, latencies and hits."""
        with self._lock:
            self._routes.clear()
            self._pages.clear()
            self._latency.clear()
            self._hits.clear()

    # -- what the site saw ------------------------------------------------------
    def hits(self, host: str | None = None, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [
                h
                for h in self._hits
                if (host is None or h.host == host) and (path is None or h.path == path)
            ]

    def page_hits(self, host: str | None = None) -> list[Hit]:
        """Hits on anything but /robots.txt."""
        return [h for h in self.hits(host) if h.path != "/robots.txt"]

    def gaps(self, host: str, *, include_robots: bool = True) -> list[float]:
        """Seconds between consecutive request arrivals at *host*."""
        hits = self.hits(host) if include_robots else self.page_hits(host)
        times = sorted(h.time for h in hits)
        return [b - a for a, b in itertools.pairwise(times)]

    def max_in_flight(self, host: str) -> int:
        return max((h.in_flight for h in self.hits(host)), default=0)

    # -- serving ----------------------------------------------------------------
    def _arrive(
        self, host: str, path: str, method: str, headers: dict[str, str], arrived: float
    ) -> Hit:
        with self._lock:
            self._in_flight[host] = self._in_flight.get(host, 0) + 1
            hit = Hit(host, path, method, arrived, self._in_flight[host], headers)
            self._hits.append(hit)
        return hit

    def _leave(self, host: str) -> None:
        with self._lock:
            self._in_flight[host] -= 1

    def _reply(self, hit: Hit) -> Reply:
        route = self._routes.get((hit.host, hit.path)) or self._routes.get(
            (hit.host, urlsplit(hit.path).path)
        )
        if route is not None:
            return route(hit)
        return self._generated(hit)

    def _generated(self, hit: Hit) -> Reply:
        parts = urlsplit(hit.path)
        html = (("Content-Type", "text/html; charset=utf-8"),)
        latency = self._latency.get(hit.host, 0.0)
        if parts.path == "/":
            count = self._pages.get(hit.host, self.default_pages)
            query = parse_qs(parts.query)
            if "n" in query:
                count = int(query["n"][0])
            return Reply(200, index_body(count), html, latency)
        if parts.path.startswith("/p/") and parts.path[3:].isdigit():
            return Reply(200, page_body(hit.host, int(parts.path[3:])), html, latency)
        return Reply(404, b"not found", (("Content-Type", "text/plain"),))


# A dripping reply ends after this many seconds if the client never gives up.
_DRIP_MAX = 60.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    site: Site

    def server_bind(self) -> None:
        # Ask the kernel to stamp incoming data (accepted sockets inherit it): a
        # request's arrival time is then when its bytes came in, however late
        # the server's thread gets to run on a busy machine.
        self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        super().server_bind()


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def handle_one_request(self) -> None:
        self._arrived = _arrival_time(self.connection)
        super().handle_one_request()

    def _serve(self, *, send_body: bool) -> None:
        site = self.server.site
        host = self.server.server_address[0]
        assert isinstance(host, str)
        headers = {k.lower(): v for k, v in self.headers.items()}
        hit = site._arrive(host, self.path, self.command, headers, self._arrived)
        try:
            reply = site._reply(hit)
            if reply.delay:
                time.sleep(reply.delay)  # a slow site, in the site's own thread
            if reply.close:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.drip:
                self._drip(reply)
                return
            body = reply.body_bytes()
            self.send_response(reply.status)
            names = {name.lower() for name, _ in reply.headers}
            for name, value in reply.headers:
                self.send_header(name, value)
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body and reply.status not in (204, 304):
                self.wfile.write(body)
        finally:
            site._leave(host)

    def _drip(self, reply: Reply) -> None:
        """Announce a large body, then send a byte at a time until the client gives up."""
        self.close_connection = True
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(10**6))
        self.end_headers()
        deadline = time.monotonic() + _DRIP_MAX
        try:
            while time.monotonic() < deadline:
                self.wfile.write(b"#")
                self.wfile.flush()
                time.sleep(reply.drip)
        except OSError:
            return  # the client gave up


def _arrival_time(connection: socket.socket) -> float:
    """When the next request's first byte reached the kernel, on the monotonic clock.

    Waits for that byte (without reading it) like the request parser would.
    Falls back to now where the kernel gives no timestamp (or the peer left).
    """
    try:
        _, ancillary, _, _ = connection.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
    except OSError:
        return time.monotonic()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return float(seconds + nanoseconds / 1e9 - _wall_minus_monotonic())
    return time.monotonic()


def _wall_minus_monotonic() -> float:
    """``time.time() - time.monotonic()``, read so that no thread switch skews it.

    Another thread can run between two clock reads (the GIL changes hands every
    few ms on a busy machine), which would move an arrival time by as much: of
    three bracketed reads, the tightest is kept.
    """
    best_width, best = float("inf"), 0.0
    for _ in range(3):
        before = time.monotonic()
        wall = time.time()
        after = time.monotonic()
        if after - before < best_width:
            best_width, best = after - before, wall - (before + after) / 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--hosts", nargs="*", default=list(HOSTS[:4]))
    parser.add_argument("--pages", type=int, default=20)
    args = parser.parse_args()
    with Site(args.hosts, args.port, args.pages) as site:
        print("serving", " ".join(site.url(h) for h in site.hosts), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
