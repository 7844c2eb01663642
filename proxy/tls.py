"""TLS on the listeners: the server context, the pair re-read when its files change,
and the URIs of a verified client certificate.

The context handed to the listener (`ServerTls.context`) never changes; its SNI
callback, which OpenSSL calls for every handshake (with or without a server name),
points the new connection at the context of the current pair. A connection keeps the
pair it shook hands with; the next handshake gets the pair loaded last.

`poll()` compares the files' `stat` (which follows symlinks, so a Kubernetes Secret's
`..data` swap counts as a change) and loads a changed pair into a fresh context; a
pair that does not load (unreadable, not PEM, a key that does not match) keeps the
last good one, logged and counted. TLS 1.2 at least, and Python's default ciphers.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import structlog
from cryptography import x509

from .config import TlsConfig
from .metrics import Metrics
from .tasks import Sleep, start, stop, supervise

log = structlog.get_logger("proxy.tls")


class TlsError(Exception):
    """The pair cannot be used; the message names the file and the reason, no content."""


Signature = tuple[tuple[int, int, int, int] | None, ...]


def _signature(*paths: str) -> Signature:
    found: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: the ..data swap changes the target
        except OSError:
            found.append(None)
        else:
            found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def load_context(config: TlsConfig) -> tuple[ssl.SSLContext, float]:
    """A server context for the pair (and the client CA), and the certificate's expiry."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (config.cert_file, config.key_file, config.client_ca_file):
        if path:
            _readable(path)
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        raise TlsError(
            f"cert_file and key_file do not load as a matching PEM pair ({exc.reason or 'ssl'})"
        ) from None
    except OSError as exc:
        raise TlsError(f"the pair cannot be read ({exc.strerror})") from None
    if config.client_ca_file:
        try:
            context.load_verify_locations(cafile=config.client_ca_file)
        except FileNotFoundError:
            raise TlsError(f"{config.client_ca_file}: no such file") from None
        except (ssl.SSLError, OSError):
            raise TlsError(f"{config.client_ca_file}: not a readable PEM CA bundle") from None
        # Optional: a caller may authenticate with a header instead. A certificate that
        # is presented must verify, or the handshake fails.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context, _expiry(config.cert_file)


def _readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TlsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TlsError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise TlsError(f"{path}: cannot be read ({exc.strerror})") from None


def _expiry(cert_file: str) -> float:
    try:
        with open(cert_file, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read(1024 * 1024))
    except (OSError, ValueError):
        raise TlsError(f"{cert_file}: not a PEM certificate") from None
    return certificate.not_valid_after_utc.timestamp()


def check_files(config: TlsConfig) -> list[str]:
    """Problems with the pair and CA files, as `check-config` prints them."""
    try:
        load_context(config)
    except TlsError as exc:
        return [f"server.tls: {exc}"]
    return []


class ServerTls:
    """The listeners' TLS: a fixed context whose handshakes get the current pair."""

    def __init__(self, config: TlsConfig, metrics: Metrics) -> None:
        self.config = config
        self._metrics = metrics
        self._signature = _signature(config.cert_file, config.key_file)
        # Start-up: a bad pair is fatal. The pair loaded now is the first current one,
        # and the listener's fixed context is the same object.
        self.context, expiry = load_context(config)
        self.context.sni_callback = self._choose
        self._current = self.context
        metrics.tls_certificate_expiry.set(expiry)
        metrics.tls_reloads.labels(result="success").inc()
        self.expires = expiry

    def _choose(self, connection: Any, _server_name: str | None, _context: Any) -> None:
        connection.context = self._current
        return None

    def poll(self) -> bool:
        """Load the pair again if a file changed; True when a new pair is in use."""
        signature = _signature(self.config.cert_file, self.config.key_file)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            context, expiry = load_context(self.config)
        except TlsError as exc:
            self._metrics.tls_reloads.labels(result="failure").inc()
            log.error("tls_reload_failed", reason=str(exc), keeping="the last good pair")
            return False
        self._current = context
        self.expires = expiry
        self._metrics.tls_certificate_expiry.set(expiry)
        self._metrics.tls_reloads.labels(result="success").inc()
        log.info(
            "tls_reloaded",
            expires=datetime.fromtimestamp(expiry, UTC).isoformat(),
        )
        return True


@asynccontextmanager
async def watching(
    tls: ServerTls, metrics: Metrics, sleep: Sleep = asyncio.sleep
) -> AsyncIterator[ServerTls]:
    """The supervised task that polls the pair's files, until the block ends."""

    async def step() -> None:
        await sleep(tls.config.poll_interval_s)
        tls.poll()

    task = start("tls_watcher", supervise("tls_watcher", step, metrics, sleep=sleep))
    try:
        yield tls
    finally:
        await stop(task)


def certificate_uris(peercert: dict[str, Any] | None) -> list[str]:
    """The URI SANs of a peer certificate that verified (`getpeercert()`'s dict)."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
