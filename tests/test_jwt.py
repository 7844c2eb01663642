"""JWT callers against a real OIDC issuer: OpenBao's identity tokens.

OpenBao serves the discovery document and the JWKS itself; a role's `client_id` is
the audience and a userpass entity's id is the `sub` that names the caller.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from .helpers import Proxy, ProxyFactory, assert_error, bearer, get, metric
from .openbao import OpenBao, running_openbao, unique

AUDIENCE = "invoice-proxy"


@dataclass
class Issuer:
    """OpenBao set up as an OIDC issuer: one key, roles, an entity that may ask for tokens."""

    bao: OpenBao
    key: str
    role: str
    other_role: str
    short_role: str
    entity_token: str
    entity_id: str
    iss: str

    def token(self, role: str | None = None) -> str:
        answer = self.bao.api(
            "GET", f"identity/oidc/token/{role or self.role}", token=self.entity_token
        )
        return str(answer["data"]["token"])

    async def atoken(self, role: str | None = None) -> str:
        return await asyncio.to_thread(self.token, role)


def set_up_issuer(bao: OpenBao) -> Issuer:
    key = unique("key")
    bao.api(
        "POST",
        f"identity/oidc/key/{key}",
        {"algorithm": "RS256", "allowed_client_ids": ["*"], "verification_ttl": "2h"},
    )
    roles = {}
    for name, client_id, ttl in (
        ("role", AUDIENCE, "1h"),
        ("other", "another-service", "1h"),
        ("short", AUDIENCE, "1s"),
    ):
        roles[name] = unique(name)
        bao.api(
            "POST",
            f"identity/oidc/role/{roles[name]}",
            {"key": key, "ttl": ttl, "client_id": client_id},
        )
    policy = unique("oidc")
    hcl = "".join(
        f'path "identity/oidc/token/{r}" {{ capabilities = ["read"] }}\n' for r in roles.values()
    )
    bao.api("PUT", f"sys/policies/acl/{policy}", {"policy": hcl})
    mount = bao.enable_auth("userpass")
    bao.api(
        "POST",
        f"auth/{mount}/users/billing",
        {"password": "pw-billing-1", "token_policies": [policy]},
    )
    login = bao.api("POST", f"auth/{mount}/login/billing", {"password": "pw-billing-1"}, token="")
    entity_token = str(login["auth"]["client_token"])
    entity_id = str(login["auth"]["entity_id"])
    discovery = bao.api("GET", "identity/oidc/.well-known/openid-configuration", token="")
    return Issuer(
        bao, key, roles["role"], roles["other"], roles["short"], entity_token, entity_id,
        str(discovery["issuer"]),
    )  # fmt: skip


@pytest.fixture(scope="module")
def module_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    with running_openbao(tmp_path_factory.mktemp("bao")) as bao:
        yield set_up_issuer(bao)


@pytest.fixture
def own_issuer(tmp_path: Path) -> Iterator[Issuer]:
    """An OpenBao of the test's own, which the test may stop."""
    with running_openbao(tmp_path / "bao") as bao:
        yield set_up_issuer(bao)


def issuer_table(issuer: Issuer, **extra: Any) -> dict[str, Any]:
    return {
        "name": "openbao",
        "issuer": issuer.iss,
        "audiences": [AUDIENCE],
        "min_refresh_interval_s": 0.2,
        "timeout_s": 2.0,
        "leeway_s": 0.0,
        **extra,
    }


async def jwt_proxy(make_proxy: ProxyFactory, issuer: Issuer, **extra: Any) -> Proxy:
    callers = [
        {"name": "billing-service", "organizations": ["acme"], "jwt_subjects": [issuer.entity_id]},
    ]
    proxy = await make_proxy(issuers=[issuer_table(issuer, **extra)], callers=callers)
    return proxy


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


async def test_a_token_from_the_issuer_names_the_caller(
    make_proxy: ProxyFactory, module_issuer: Issuer
) -> None:
    proxy = await jwt_proxy(make_proxy, module_issuer)
    token = await module_issuer.atoken()
    with capture_logs() as logs:
        first = await get(proxy, headers=bearer(token))
        second = await get(proxy, headers=bearer(token))
    assert first.status == 200 and second.status == 200
    assert second.headers["X-Cache"] == "HIT"
    lines = [line for line in logs if line["event"] == "request"]
    assert [(line["caller"], line["auth"]) for line in lines] == [("billing-service", "jwt")] * 2
    assert (
        metric(proxy.app, "invoice_proxy_requests_total", caller="billing-service", code="200") == 2
    )
    assert token not in str(logs)
    # The caller's organizations still apply.
    await assert_error(await get(proxy, org="globex", headers=bearer(token)), 403, "forbidden")


async def test_a_key_caller_keeps_working_beside_jwt_callers(
    make_proxy: ProxyFactory, module_issuer: Issuer
) -> None:
    from proxy.auth import key_digest

    from .helpers import BILLING_KEY

    callers = [
        {
            "name": "billing-service",
            "organizations": ["acme"],
            "key_sha256": [key_digest(BILLING_KEY)],
            "jwt_subjects": [module_issuer.entity_id],
        }
    ]
    proxy = await make_proxy(issuers=[issuer_table(module_issuer)], callers=callers)
    with capture_logs() as logs:
        assert (await get(proxy)).status == 200
    assert [line["auth"] for line in logs if line["event"] == "request"] == ["key"]


def _forged_rs256(claims: dict[str, Any], kid: str) -> str:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


def _refused_token(issuer: Issuer, kind: str) -> str:
    if kind == "other_audience":
        return issuer.token(issuer.other_role)
    if kind == "expired":
        token = issuer.token(issuer.short_role)
        time.sleep(2.1)  # the role's tokens live 1 s; the proxy allows no leeway here
        return token
    token = issuer.token()
    header, claims = _parts(token)
    head, body, signature = token.split(".")
    if kind == "tampered":
        flipped = bytearray(base64.urlsafe_b64decode(signature + "=="))
        flipped[10] ^= 0x01
        return f"{head}.{body}.{_b64(bytes(flipped))}"
    if kind == "tampered_claims":
        claims["sub"] = claims["sub"] + "x"
        return f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"
    if kind == "alg_none":
        none_head = _b64(json.dumps({**header, "alg": "none"}).encode())
        return f"{none_head}.{body}."
    if kind == "hs256_public_key":
        jwks = issuer.bao.api("GET", "identity/oidc/.well-known/keys", token="")
        jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
        pem = jwt.PyJWK(jwk).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        hs_head = _b64(json.dumps({**header, "alg": "HS256"}).encode())
        mac = hmac.new(pem, f"{hs_head}.{body}".encode(), hashlib.sha256).digest()
        return f"{hs_head}.{body}.{_b64(mac)}"
    if kind == "unknown_issuer":
        return _forged_rs256({**claims, "iss": "https://issuer.invalid"}, header["kid"])
    if kind == "forged_key":
        return _forged_rs256(claims, header["kid"])
    raise AssertionError(kind)


REFUSED = {
    "other_audience": "audience",
    "expired": "expired",
    "tampered": "signature",
    "tampered_claims": "signature",
    "alg_none": "algorithm",
    "hs256_public_key": "algorithm",
    "unknown_issuer": "unknown_issuer",
    "forged_key": "signature",
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
async def test_a_token_that_does_not_verify_is_refused(
    make_proxy: ProxyFactory, module_issuer: Issuer, kind: str
) -> None:
    proxy = await jwt_proxy(make_proxy, module_issuer)
    token = await asyncio.to_thread(_refused_token, module_issuer, kind)
    with capture_logs() as logs:
        response = await get(proxy, headers=bearer(token))
    await assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert module_issuer.bao is not None
    assert metric(proxy.app, "invoice_proxy_jwt_refusals_total", reason=REFUSED[kind]) == 1
    assert token not in str(logs) and token.split(".")[1] not in str(logs)
    assert proxy.app is not None
    assert (await get(proxy, headers=bearer(await module_issuer.atoken()))).status == 200


async def test_a_subject_no_caller_lists_is_refused(
    make_proxy: ProxyFactory, module_issuer: Issuer
) -> None:
    callers = [{"name": "billing-service", "organizations": ["acme"], "jwt_subjects": ["someone"]}]
    proxy = await make_proxy(issuers=[issuer_table(module_issuer)], callers=callers)
    response = await get(proxy, headers=bearer(await module_issuer.atoken()))
    await assert_error(response, 401, "unauthorized")
    assert metric(proxy.app, "invoice_proxy_jwt_refusals_total", reason="unknown_subject") == 1


async def test_forged_kids_fetch_the_jwks_at_most_once_per_interval(
    make_proxy: ProxyFactory, module_issuer: Issuer
) -> None:
    proxy = await jwt_proxy(make_proxy, module_issuer, min_refresh_interval_s=60.0)
    token = await module_issuer.atoken()
    assert (await get(proxy, headers=bearer(token))).status == 200
    before = metric(proxy.app, "invoice_proxy_jwks_refreshes_total", issuer="openbao", result="ok")
    _, claims = _parts(token)
    for i in range(30):
        forged = _forged_rs256(claims, f"forged-{i}")
        await assert_error(await get(proxy, headers=bearer(forged)), 401, "unauthorized")
    after = metric(proxy.app, "invoice_proxy_jwks_refreshes_total", issuer="openbao", result="ok")
    assert after - before <= 1
    assert metric(proxy.app, "invoice_proxy_jwt_refusals_total", reason="unknown_key") >= 29


async def test_a_key_rotation_is_followed_without_a_restart(
    make_proxy: ProxyFactory, own_issuer: Issuer
) -> None:
    proxy = await jwt_proxy(make_proxy, own_issuer)
    old = await own_issuer.atoken()
    assert (await get(proxy, headers=bearer(old))).status == 200
    await own_issuer.bao.aapi("POST", f"identity/oidc/key/{own_issuer.key}/rotate", {})
    new = await own_issuer.atoken()
    assert _parts(new)[0]["kid"] != _parts(old)[0]["kid"]
    await asyncio.sleep(0.25)  # past min_refresh_interval_s since the start-up fetch
    response = await get(proxy, headers=bearer(new))
    assert response.status == 200
    assert (await get(proxy, headers=bearer(old))).status == 200  # still published


async def test_with_the_issuer_stopped_known_keys_still_pass(
    make_proxy: ProxyFactory, own_issuer: Issuer
) -> None:
    proxy = await jwt_proxy(make_proxy, own_issuer, refresh_interval_s=1.0)
    seen = await own_issuer.atoken()
    fresh = await own_issuer.atoken()  # minted now, first shown when the issuer is gone
    assert (await get(proxy, headers=bearer(seen))).status == 200
    own_issuer.bao.stop()
    await asyncio.sleep(1.5)  # a periodic refresh fails meanwhile
    assert (
        metric(proxy.app, "invoice_proxy_jwks_refreshes_total", issuer="openbao", result="failed")
        >= 1
    )
    assert (await get(proxy, headers=bearer(fresh))).status == 200
    assert (await get(proxy, headers=bearer(seen))).status == 200
    assert (
        metric(proxy.app, "invoice_proxy_background_task_failures_total", task="jwks_refresher")
        == 0
    )
