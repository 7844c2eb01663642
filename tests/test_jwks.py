"""An issuer's JWKS endpoint as the Kubernetes API server has it: HTTPS with a private
CA (`ca_file`), a bearer token wanted (`token_file`), and a `jwks_url` given outright.

The endpoint is a small aiohttp server on 127.0.0.1 with a certificate the test makes;
it serves only its JWKS path (no discovery document) and answers 401 to a request
without the token it expects. Tokens are signed by the test's own RSA keys.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from .certificates import issue, make_ca
from .helpers import ProxyFactory, assert_error, bearer, get, metric

ISSUER = "https://issuer.test"  # never resolved: jwks_url is given, discovery is not used
AUDIENCE = "invoice-proxy"
SUBJECT = "system:serviceaccount:billing:billing-service"
JWKS_PATH = "/openid/v1/jwks"


@dataclass
class JwksEndpoint:
    """The endpoint: its signing keys by kid, the bearer token it wants, what it saw."""

    url: str
    ca_file: Path
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    wanted_token: str | None = None
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": [AUDIENCE], "sub": SUBJECT, "iat": now, "exp": now + 600}
        return jwt.encode({**body, **claims}, self.keys[kid], "RS256", headers={"kid": kid})

    async def handle(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        self.seen.append((request.path, authorization))
        if self.wanted_token is not None and authorization != f"Bearer {self.wanted_token}":
            return web.json_response({"message": "Unauthorized"}, status=401)
        jwks = []
        for kid, key in self.keys.items():
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwks.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return web.json_response({"keys": jwks})


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[JwksEndpoint]:
    ca = make_ca("cluster-ca")
    cert, key, _ = issue(ca, "kubernetes")
    for name, data in (("ca.crt", ca.pem()), ("tls.crt", cert), ("tls.key", key)):
        (tmp_path / name).write_bytes(data)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    app = web.Application()
    endpoint = JwksEndpoint("", tmp_path / "ca.crt")
    endpoint.add_key("k1")
    app.router.add_get(JWKS_PATH, endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        endpoint.url = f"https://127.0.0.1:{port}{JWKS_PATH}"
        yield endpoint
    finally:
        await runner.cleanup()


async def endpoint_proxy(make_proxy: ProxyFactory, endpoint: JwksEndpoint, **extra: Any) -> Any:
    issuer = {
        "name": "cluster",
        "issuer": ISSUER,
        "jwks_url": endpoint.url,
        "audiences": [AUDIENCE],
        "ca_file": str(endpoint.ca_file),
        "min_refresh_interval_s": 0.2,
        "timeout_s": 2.0,
        **extra,
    }
    issuer = {k: v for k, v in issuer.items() if v is not None}
    callers = [{"name": "billing-service", "organizations": ["acme"], "jwt_subjects": [SUBJECT]}]
    return await make_proxy(issuers=[issuer], callers=callers)


async def test_jwks_url_over_https_with_a_private_ca_is_used_without_discovery(
    make_proxy: ProxyFactory, endpoint: JwksEndpoint
) -> None:
    proxy = await endpoint_proxy(make_proxy, endpoint)
    with capture_logs() as logs:
        response = await get(proxy, headers=bearer(endpoint.token("k1")))
    assert response.status == 200
    line = next(line for line in logs if line["event"] == "request")
    assert (line["caller"], line["auth"]) == ("billing-service", "jwt")
    # Only the JWKS was asked for: no discovery document (this server has none).
    assert endpoint.seen and {path for path, _ in endpoint.seen} == {JWKS_PATH}
    assert metric(proxy.app, "invoice_proxy_jwks_keys", issuer="cluster") == 1
    assert (
        metric(proxy.app, "invoice_proxy_jwks_refreshes_total", issuer="cluster", result="ok") >= 1
    )


async def test_without_the_private_ca_the_endpoint_is_not_trusted(
    make_proxy: ProxyFactory, endpoint: JwksEndpoint
) -> None:
    proxy = await endpoint_proxy(make_proxy, endpoint, ca_file=None)  # the system's roots
    with capture_logs() as logs:
        response = await get(proxy, headers=bearer(endpoint.token("k1")))
    await assert_error(response, 401, "unauthorized")
    assert not endpoint.seen, "no request got past the TLS handshake"
    assert metric(proxy.app, "invoice_proxy_jwt_refusals_total", reason="unknown_key") == 1
    failed = metric(
        proxy.app, "invoice_proxy_jwks_refreshes_total", issuer="cluster", result="failed"
    )
    assert failed >= 1
    failure = next(line for line in logs if line["event"] == "jwks_refresh_failed")
    assert failure["issuer"] == "cluster" and "ClientConnectorCertificateError" in failure["reason"]


async def test_token_file_is_sent_to_the_jwks_endpoint_and_read_again_when_it_changes(
    make_proxy: ProxyFactory, endpoint: JwksEndpoint, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-projected-token\n")
    endpoint.wanted_token = "first-projected-token"
    proxy = await endpoint_proxy(make_proxy, endpoint, token_file=str(token_file))
    with capture_logs() as logs:
        assert (await get(proxy, headers=bearer(endpoint.token("k1")))).status == 200
        assert endpoint.seen[-1] == (JWKS_PATH, "Bearer first-projected-token")

        # The kubelet rotates the token; the endpoint wants the new one from now on. Until
        # the file changes, a new key cannot be fetched; the known key keeps working.
        endpoint.wanted_token = "second-projected-token"
        endpoint.add_key("k2")
        await _past_min_refresh_interval()
        refused = await get(proxy, headers=bearer(endpoint.token("k2")))
        await assert_error(refused, 401, "unauthorized")
        assert endpoint.seen[-1] == (JWKS_PATH, "Bearer first-projected-token")
        assert (await get(proxy, headers=bearer(endpoint.token("k1", jti="b")))).status == 200

        token_file.write_text("second-projected-token\n")
        await _past_min_refresh_interval()
        assert (await get(proxy, headers=bearer(endpoint.token("k2", jti="c")))).status == 200
        assert endpoint.seen[-1] == (JWKS_PATH, "Bearer second-projected-token")
    failure = next(line for line in logs if line["event"] == "jwks_refresh_failed")
    assert failure["reason"] == "the JWKS request answered HTTP 401"
    assert "projected-token" not in str(logs)


async def test_an_endpoint_that_wants_a_token_refuses_a_proxy_without_token_file(
    make_proxy: ProxyFactory, endpoint: JwksEndpoint
) -> None:
    endpoint.wanted_token = "projected-token"
    proxy = await endpoint_proxy(make_proxy, endpoint)
    response = await get(proxy, headers=bearer(endpoint.token("k1")))
    await assert_error(response, 401, "unauthorized")
    assert endpoint.seen and all(auth is None for _, auth in endpoint.seen)
    assert metric(proxy.app, "invoice_proxy_jwks_keys", issuer="cluster") == 0


async def _past_min_refresh_interval() -> None:
    await asyncio.sleep(0.25)  # min_refresh_interval_s is 0.2 s
