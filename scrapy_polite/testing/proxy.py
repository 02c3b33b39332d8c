"""A TCP proxy that delays every chunk: a Redis "1 ms away" on this machine.

``DelayProxy(("127.0.0.1", redis_port), 0.0005)`` listens on a free port and
holds every chunk 0.5 ms in each direction before passing it on, so a round
trip through it costs 1 ms more, as when Redis runs on another machine. The
benchmarks use it; it is not fit for tests that assert timings.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import threading
import time

from scrapy_polite.testing import free_port

__all__ = ["DelayProxy"]


class DelayProxy:
    """A TCP proxy that holds every chunk ``delay`` seconds before passing it on.

    It runs in a process of its own, so the site's threads in this one cannot slow it.
    """

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=_serve_proxy, args=(target, delay, self.port))
        self._process.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the delaying proxy did not start")

    def close(self) -> None:
        self._process.terminate()
        self._process.join(10)


def _serve_proxy(target: tuple[str, int], delay: float, port: int) -> None:
    _Proxy(target, delay, port).serve()


class _Proxy:
    def __init__(self, target: tuple[str, int], delay: float, port: int) -> None:
        self.target = target
        self.delay = delay
        self._server = socket.create_server(("127.0.0.1", port))

    def serve(self) -> None:
        self._accept()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
