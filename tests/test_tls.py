"""HTTPS on the listener, a pair rotated on disk, and client certificates as callers.

Certificates are made by the tests (tests/certificates.py).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from structlog.testing import capture_logs

from proxy.app import ADMIN_APP, LANE, TLS, init_app
from proxy.config import parse_config
from proxy.server import ProxyRunner

from .certificates import Authority, issue, make_ca
from .helpers import BILLING, BILLING_KEY, Upstream, config_dict, invoice_path, metric, wait_until

REQUEST = "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{close}\r\n"
SPIFFE = "spiffe://cluster.local/ns/billing/sa/billing-service"


def write_pair(directory: Path, cert: bytes, key: bytes) -> None:
    """As a Kubernetes Secret volume does: a new `..data` directory swapped in by rename."""
    stamp = f"..{os.urandom(4).hex()}"
    (directory / stamp).mkdir()
    (directory / stamp / "tls.crt").write_bytes(cert)
    (directory / stamp / "tls.key").write_bytes(key)
    link = directory / "..data_tmp"
    link.symlink_to(stamp)
    os.replace(link, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


@dataclass
class Served:
    port: int
    admin_port: int
    app: Any
    ca: Authority

    def client_context(
        self, cert: tuple[bytes, bytes] | None = None, tmp: Path | None = None
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca.pem().decode())
        if cert is not None:
            assert tmp is not None
            (tmp / "client.crt").write_bytes(cert[0])
            (tmp / "client.key").write_bytes(cert[1])
            context.load_cert_chain(tmp / "client.crt", tmp / "client.key")
        return context


@asynccontextmanager
async def serving(
    upstream: Upstream, credential_file: Path, tmp_path: Path, ca: Authority, **tls: Any
) -> AsyncIterator[Served]:
    certs = tmp_path / "tls"
    certs.mkdir(exist_ok=True)
    cert, key, _ = issue(ca, "invoice-proxy")
    write_pair(certs, cert, key)
    extra_callers: list[dict[str, Any]] = tls.pop("callers", [])
    data = config_dict(upstream.base_url, credential_file)
    data["server"]["tls"] = {
        "cert_file": str(certs / "tls.crt"),
        "key_file": str(certs / "tls.key"),
        "poll_interval_s": 0.05,
        **tls,
    }
    data["callers"] += extra_callers
    config = parse_config(data)
    app = init_app(config)
    api_runner = ProxyRunner(app, config.server, app.get(LANE))
    admin_runner = ProxyRunner(app[ADMIN_APP], config.server)
    await api_runner.setup()
    try:
        await admin_runner.setup()
        context = app[TLS].context
        port = await api_runner.listen("127.0.0.1", 0, ssl_context=context)
        admin_port = await admin_runner.listen(
            "127.0.0.1",
            0,
            ssl_context=context if config.server.tls and config.server.tls.admin else None,
        )
        yield Served(port, admin_port, app, ca)
    finally:
        await api_runner.cleanup()
        await admin_runner.cleanup()


async def https_get(
    port: int, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.get(
            f"https://127.0.0.1:{port}{invoice_path()}", headers=headers or {}, ssl=context
        )
        await response.read()
        return response


async def served_certificate(port: int, ca: Authority) -> x509.Certificate:
    context = ssl.create_default_context(cadata=ca.pem().decode())
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def ca() -> Authority:
    return make_ca("test-ca")


async def test_https_serves_invoices_and_plain_http_gets_none(
    upstream: Upstream, credential_file: Path, tmp_path: Path, ca: Authority
) -> None:
    async with serving(upstream, credential_file, tmp_path, ca) as served:
        response = await https_get(served.port, served.client_context(), BILLING)
        assert response.status == 200
        assert (await response.json())["id"] == "inv_2025_01"
        # Plain HTTP to the TLS port: no invoice, whatever the server writes back.
        request = REQUEST.format(path=invoice_path(), key=BILLING_KEY, close="")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(request.encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=5)
        writer.close()
        assert b"inv_2025_01" not in answer and b"200 OK" not in answer
        # TLS 1.2 at least (older versions are also off in this OpenSSL's defaults).
        assert served.app[TLS].context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_rewritten_pair_reaches_new_handshakes_and_a_mismatched_one_keeps_the_old(
    upstream: Upstream, credential_file: Path, tmp_path: Path, ca: Authority
) -> None:
    async with serving(upstream, credential_file, tmp_path, ca) as served:
        first = await served_certificate(served.port, ca)
        expiry = metric(served.app, "invoice_proxy_tls_certificate_expiry_timestamp_seconds")
        assert expiry == first.not_valid_after_utc.timestamp()
        # An open connection keeps its pair across the rotation.
        context = served.client_context()
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port, ssl=context)
        cert, key, rotated = issue(ca, "invoice-proxy-rotated", days=60)
        write_pair(tmp_path / "tls", cert, key)

        async def serves_rotated() -> bool:
            return (
                await served_certificate(served.port, ca)
            ).serial_number == rotated.serial_number

        for _ in range(100):  # the poll interval is 0.05 s
            if await serves_rotated():
                break
            await asyncio.sleep(0.02)
        assert await serves_rotated()
        assert metric(served.app, "invoice_proxy_tls_certificate_expiry_timestamp_seconds") == (
            rotated.not_valid_after_utc.timestamp()
        )
        held = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert x509.load_der_x509_certificate(held).serial_number == first.serial_number
        writer.write(
            REQUEST.format(
                path=invoice_path(), key=BILLING_KEY, close="Connection: close\r\n"
            ).encode()
        )
        assert (await asyncio.wait_for(reader.read(), timeout=5)).startswith(b"HTTP/1.1 200")
        writer.close()

        # A certificate with another pair's key: refused, counted, the rotated pair kept.
        other_cert, _, _ = issue(ca, "mismatch")
        _, other_key, _ = issue(ca, "mismatch-key")
        with capture_logs() as logs:
            write_pair(tmp_path / "tls", other_cert, other_key)
            await wait_until(
                lambda: (
                    metric(served.app, "invoice_proxy_tls_reloads_total", result="failure") == 1
                ),
                "the failed reload",
            )
        assert [line["event"] for line in logs] == ["tls_reload_failed"]
        assert "PRIVATE KEY" not in str(logs)
        assert await serves_rotated()
        assert (await https_get(served.port, served.client_context(), BILLING)).status == 200


async def test_a_client_certificate_with_a_mapped_uri_is_a_caller(
    upstream: Upstream, credential_file: Path, tmp_path: Path, ca: Authority
) -> None:
    clients = make_ca("clients-ca")
    (tmp_path / "clients-ca.pem").write_bytes(clients.pem())
    caller = {"name": "spiffe-billing", "organizations": ["acme"], "certificate_uris": [SPIFFE]}
    async with serving(
        upstream, credential_file, tmp_path, ca,
        client_ca_file=str(tmp_path / "clients-ca.pem"), callers=[caller],
    ) as served:  # fmt: skip
        cert, key, _ = issue(clients, "billing", uri=SPIFFE, server=False)
        with capture_logs() as logs:
            response = await https_get(served.port, served.client_context((cert, key), tmp_path))
        assert response.status == 200
        line = next(line for line in logs if line["event"] == "request")
        assert (line["caller"], line["auth"]) == ("spiffe-billing", "certificate")

        # A verified certificate whose URI no caller lists: 401.
        unmapped = issue(clients, "other", uri="spiffe://cluster.local/ns/x/sa/y", server=False)
        response = await https_get(served.port, served.client_context(unmapped[:2], tmp_path))
        assert response.status == 401

        # The same URI from another CA: never a caller (the handshake fails).
        rogue = make_ca("rogue-ca")
        forged = issue(rogue, "billing", uri=SPIFFE, server=False)
        try:
            response = await https_get(served.port, served.client_context(forged[:2], tmp_path))
        except (ssl.SSLError, aiohttp.ClientError):
            pass
        else:
            assert response.status == 401
        # No certificate and no header: 401; a key caller still works over TLS.
        assert (await https_get(served.port, served.client_context())).status == 401
        assert (await https_get(served.port, served.client_context(), BILLING)).status == 200


async def test_the_admin_listener_serves_https_with_admin_true(
    upstream: Upstream, credential_file: Path, tmp_path: Path, ca: Authority
) -> None:
    async with serving(upstream, credential_file, tmp_path, ca, admin=True) as served:
        async with aiohttp.ClientSession() as session:
            response = await session.get(
                f"https://127.0.0.1:{served.admin_port}/metrics", ssl=served.client_context()
            )
            text = await response.text()
        assert response.status == 200
        assert "invoice_proxy_tls_certificate_expiry_timestamp_seconds" in text


def test_check_config_names_an_unreadable_pair(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .helpers import to_toml

    data = config_dict("http://127.0.0.1:1/v1", tmp_path / "cred.json")
    data["server"]["tls"] = {
        "cert_file": str(tmp_path / "missing.crt"),
        "key_file": str(tmp_path / "k"),
    }
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "server.tls:" in result.stdout and "missing.crt: no such file" in result.stdout
