"""The Vault/OpenBao credential source, against a real OpenBao dev server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from proxy.app import CREDENTIALS
from proxy.config import UpstreamConfig, VaultConfig, parse_config
from proxy.credential import Credential, CredentialError, CredentialStore, running
from proxy.metrics import Metrics
from proxy.vault import VaultSource

from .helpers import (
    BILLING,
    FakeClock,
    ProxyFactory,
    Upstream,
    config_dict,
    invoice_path,
    metric,
    scraped,
    wait_until,
)
from .openbao import (
    OpenBao,
    TokenReviewStandIn,
    configure_kubernetes,
    free_port,
    running_openbao,
    running_tokenreview,
    unique,
)

# OpenBao service tokens ("s.", Vault 1.10+ "hvs."), batch tokens ("b.", "hvb.").
VAULT_TOKEN = re.compile(r"\b(?:hv)?[sb]\.[A-Za-z0-9_-]{20,}")
WAIT_S = 10.0  # upper bound for anything a test waits for


class CountingVaultSource(VaultSource):
    """A VaultSource that counts its fetches (each one is one read of the secret)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetches = 0

    async def fetch(self, force: bool) -> Credential:
        self.fetches += 1
        return await super().fetch(force)


def planetscale_token() -> dict[str, str]:
    return {"token_id": secrets.token_hex(6), "token": "pscale_tkn_" + secrets.token_hex(16)}


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One OpenBao dev server for the whole session; tests use their own paths and mounts."""
    with running_openbao(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture
async def tokenreview() -> AsyncIterator[TokenReviewStandIn]:
    async with running_tokenreview() as standin:
        yield standin


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def seeded(openbao: OpenBao) -> tuple[str, dict[str, str], str]:
    """A fresh secret path with version 1 written, and a policy reading only it."""
    path = unique("planetscale/invoice-proxy")
    token = planetscale_token()
    openbao.write_secret("secret", path, token)
    return path, token, openbao.read_only_policy("secret", path)


def config_for(bao: OpenBao, path: str, **overrides: Any) -> VaultConfig:
    base = VaultConfig(
        address=bao.address,
        mount="secret",
        path=path,
        auth="token",
        token_env="",
        refresh_interval_s=30.0,
        timeout_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


def token_config(bao: OpenBao, tmp_path: Path, path: str, policy: str) -> VaultConfig:
    token_file = tmp_path / "vault-token"
    token_file.write_text(bao.create_token([policy]) + "\n")
    return config_for(bao, path, auth="token", token_file=str(token_file))


def approle_config(
    bao: OpenBao, tmp_path: Path, path: str, policy: str, **role: str
) -> tuple[VaultConfig, str]:
    mount = bao.enable_auth("approle")
    role_id, secret_id = bao.approle(mount, [policy], **role)
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text(secret_id)
    config = config_for(
        bao,
        path,
        auth="approle",
        approle_mount=mount,
        role_id=role_id,
        secret_id_file=str(secret_id_file),
    )
    return config, secret_id


def assert_no_secrets(texts: list[str], known: list[str]) -> None:
    """No known secret, and nothing shaped like a Vault token, in any of `texts`."""
    assert texts, "nothing to check"
    for text in texts:
        for secret in known:
            assert secret not in text
        assert not VAULT_TOKEN.search(text), text


def log_texts(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [repr(entry) for entry in logs]


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def version_of(store: CredentialStore) -> int | None:
    return None if store.current is None else store.current.version


async def wait_for_version(store: CredentialStore, version: int) -> None:
    await wait_until(lambda: version_of(store) == version, f"version {version} in use", WAIT_S)


# -- reading and rotation ---------------------------------------------------------------


async def test_reads_the_secret_fields_and_kv_version(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    path, token, policy = seeded
    source = VaultSource(token_config(openbao, tmp_path, path, policy))
    try:
        credential = await source.fetch(force=True)
    finally:
        await source.aclose()
    assert credential.token_id == token["token_id"]
    assert credential.token == token["token"]
    assert credential.version == 1
    assert credential.header == f"{token['token_id']}:{token['token']}"


async def test_field_names_are_configurable(
    openbao: OpenBao, tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    path = unique("planetscale/custom")
    openbao.write_secret("secret", path, {"id": "abc123", "secret": "pscale_tkn_custom"})
    policy = openbao.read_only_policy("secret", path)
    config = dataclasses.replace(
        token_config(openbao, tmp_path, path, policy), token_id_field="id", token_field="secret"
    )
    source = VaultSource(config)
    try:
        credential = await source.fetch(force=True)
    finally:
        await source.aclose()
    assert (credential.token_id, credential.token) == ("abc123", "pscale_tkn_custom")


async def test_a_new_version_is_picked_up_at_the_next_refresh(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, first, policy = seeded
    metrics = Metrics()
    store = CredentialStore(VaultSource(token_config(openbao, tmp_path, path, policy)), metrics)
    try:
        assert await store.refresh(force=True)
        assert store.current is not None and store.current.version == 1
        assert metric(metrics, "invoice_proxy_credential_version") == 1

        second = planetscale_token()
        assert openbao.write_secret("secret", path, second) == 2
        assert await store.refresh()
    finally:
        await store.source.aclose()
    assert store.current is not None
    assert (store.current.token, store.current.version) == (second["token"], 2)
    assert metric(metrics, "invoice_proxy_credential_version") == 2
    assert metric(metrics, "invoice_proxy_credential_loaded") == 1
    reloaded = events(logs, "credential_reloaded")
    assert [(e["version"], e["previous_version"]) for e in reloaded] == [(1, None), (2, 1)]
    assert_no_secrets(log_texts(logs), [first["token"], second["token"], openbao.root_token])


async def test_the_refresher_follows_rotations_by_itself(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    path, _, policy = seeded
    config = dataclasses.replace(
        token_config(openbao, tmp_path, path, policy), refresh_interval_s=0.1
    )
    store = CredentialStore(VaultSource(config), Metrics())
    async with running(store):
        for version in (2, 3):
            await openbao.awrite_secret("secret", path, planetscale_token())
            await wait_for_version(store, version)


async def test_a_deleted_latest_version_is_an_error_that_keeps_the_last_credential(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    path, token, policy = seeded
    store = CredentialStore(VaultSource(token_config(openbao, tmp_path, path, policy)), Metrics())
    try:
        assert await store.refresh(force=True)
        openbao.api("DELETE", f"secret/data/{path}")
        with pytest.raises(CredentialError, match="version 1 is deleted"):
            await store.source.fetch(force=True)
        assert not await store.refresh(force=True)
    finally:
        await store.source.aclose()
    assert store.current is not None and store.current.token == token["token"]


# -- auth methods -----------------------------------------------------------------------


async def test_token_auth_rereads_the_token_file_when_it_changes(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, _, policy = seeded
    config = token_config(openbao, tmp_path, path, policy)
    old = (tmp_path / "vault-token").read_text().strip()
    source = VaultSource(config)
    try:
        assert (await source.fetch(force=False)).version == 1
        # Vault Agent writes a new token and the old one is revoked.
        new = openbao.create_token([policy])
        (tmp_path / "vault-token").write_text(new)
        openbao.api("POST", "auth/token/revoke", {"token": old})
        assert (await source.fetch(force=False)).version == 1
    finally:
        await source.aclose()
    assert len(events(logs, "vault_token_file_loaded")) == 2
    assert_no_secrets(log_texts(logs), [old, new, openbao.root_token])


async def test_token_auth_from_an_environment_variable(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str]
) -> None:
    path, token, policy = seeded
    environ = {"VAULT_TOKEN": openbao.create_token([policy])}
    config = config_for(openbao, path, auth="token", token_env="VAULT_TOKEN")
    source = VaultSource(config, environ=environ)
    try:
        assert (await source.fetch(force=True)).token == token["token"]
    finally:
        await source.aclose()


async def test_approle_logs_in_and_reads(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, token, policy = seeded
    config, secret_id = approle_config(openbao, tmp_path, path, policy)
    source = VaultSource(config)
    try:
        assert (await source.fetch(force=True)).token == token["token"]
        assert (await source.fetch(force=False)).token == token["token"]
    finally:
        await source.aclose()
    [login] = events(logs, "vault_login")
    assert login["auth"] == "approle"
    assert login["mount"] == config.approle_mount
    assert login["reason"] == "start"
    assert login["lease_s"] == 3600
    assert_no_secrets(log_texts(logs), [secret_id, token["token"], openbao.root_token])


async def test_kubernetes_logs_in_through_a_token_review_and_rereads_the_jwt(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    tokenreview: TokenReviewStandIn,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, token, policy = seeded
    mount, role = configure_kubernetes(
        openbao, tokenreview, [policy], namespace="payments", name="invoice-proxy"
    )
    jwt_file = tmp_path / "token"
    first_jwt = tokenreview.approve("payments", "invoice-proxy")
    jwt_file.write_text(first_jwt)
    config = config_for(
        openbao,
        path,
        auth="kubernetes",
        kubernetes_mount=mount,
        role=role,
        jwt_file=str(jwt_file),
    )
    source = VaultSource(config)
    try:
        assert (await source.fetch(force=True)).token == token["token"]
        assert tokenreview.reviewed == [first_jwt]
        # The kubelet rotates the projected token; the next login sends the new one.
        second_jwt = tokenreview.approve("payments", "invoice-proxy")
        jwt_file.write_text(second_jwt)
        await openbao.aapi("PUT", f"sys/leases/revoke-prefix/auth/{mount}/login")
        assert (await source.fetch(force=False)).token == token["token"]
        assert tokenreview.reviewed == [first_jwt, second_jwt]
    finally:
        await source.aclose()
    assert [e["reason"] for e in events(logs, "vault_login")] == ["start", "read_refused"]
    assert_no_secrets(
        log_texts(logs), [first_jwt, second_jwt, tokenreview.reviewer_jwt, token["token"]]
    )


async def test_kubernetes_login_of_another_service_account_is_refused_safely(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    tokenreview: TokenReviewStandIn,
) -> None:
    path, _, policy = seeded
    mount, role = configure_kubernetes(
        openbao, tokenreview, [policy], namespace="payments", name="invoice-proxy"
    )
    jwt = tokenreview.approve("payments", "someone-else")
    jwt_file = tmp_path / "token"
    jwt_file.write_text(jwt)
    config = config_for(
        openbao, path, auth="kubernetes", kubernetes_mount=mount, role=role, jwt_file=str(jwt_file)
    )
    source = VaultSource(config)
    try:
        with pytest.raises(CredentialError) as caught:
            await source.fetch(force=True)
    finally:
        await source.aclose()
    assert f"Vault kubernetes login at auth/{mount} failed: HTTP 403" in str(caught.value)
    assert_no_secrets([str(caught.value)], [jwt])


# -- login token lifetime ---------------------------------------------------------------


async def test_the_login_token_is_renewed_before_its_lease_runs_out(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, _, policy = seeded
    config, _ = approle_config(openbao, tmp_path, path, policy, token_ttl="30s")
    clock = FakeClock(1000.0)
    source = VaultSource(config, clock=clock)
    try:
        await source.fetch(force=True)
        clock.advance(19)  # less than 2/3 of 30 s: nothing to do
        await source.fetch(force=False)
        assert events(logs, "vault_token_renewed") == []
        clock.advance(2)
        await source.fetch(force=False)
        clock.advance(19)  # renewed 19 s ago, for 30 s
        await source.fetch(force=False)
    finally:
        await source.aclose()
    assert [e["lease_s"] for e in events(logs, "vault_token_renewed")] == [30]
    assert len(events(logs, "vault_login")) == 1


async def test_logs_in_again_once_renewal_reaches_the_max_ttl(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    """Real time: Vault caps the renewal at token_max_ttl, so the next time is a login."""
    path, _, policy = seeded
    config, _ = approle_config(openbao, tmp_path, path, policy, token_ttl="3s", token_max_ttl="4s")
    source = VaultSource(config)
    try:
        await source.fetch(force=True)
        await asyncio.sleep(2.1)  # past 2/3 of 3 s: renew; 1.9 s left of the max_ttl
        await source.fetch(force=False)
        [renewed] = events(logs, "vault_token_renewed")
        assert renewed["capped"] is True and renewed["lease_s"] < 3
        await asyncio.sleep(renewed["lease_s"] * 2 / 3 + 0.1)
        await source.fetch(force=False)
    finally:
        await source.aclose()
    assert [e["reason"] for e in events(logs, "vault_login")] == ["start", "max_ttl"]


async def test_logs_in_again_when_the_login_token_is_revoked(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, token, policy = seeded
    config, _ = approle_config(openbao, tmp_path, path, policy)
    source = VaultSource(config)
    try:
        await source.fetch(force=True)
        openbao.revoke_logins(config.approle_mount)
        assert (await source.fetch(force=False)).token == token["token"]
    finally:
        await source.aclose()
    assert [e["reason"] for e in events(logs, "vault_login")] == ["start", "read_refused"]


async def test_logs_in_again_when_renewal_fails(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, token, policy = seeded
    config, _ = approle_config(openbao, tmp_path, path, policy)
    clock = FakeClock(1000.0)
    source = VaultSource(config, clock=clock)
    try:
        await source.fetch(force=True)
        openbao.revoke_logins(config.approle_mount)
        clock.advance(3000)  # renewal due; the token is gone
        assert (await source.fetch(force=False)).token == token["token"]
    finally:
        await source.aclose()
    [failed] = events(logs, "vault_token_renewal_failed")
    assert "HTTP 403" in failed["reason"]
    assert [e["reason"] for e in events(logs, "vault_login")] == ["start", "renewal_failed"]


# -- the store: bursts, outages ---------------------------------------------------------


async def test_a_burst_of_rejections_makes_one_vault_read(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    path, _, policy = seeded
    source = CountingVaultSource(token_config(openbao, tmp_path, path, policy))
    store = CredentialStore(source, Metrics())
    try:
        await store.refresh(force=True)
        rejected = store.current
        assert rejected is not None
        new = planetscale_token()
        openbao.write_secret("secret", path, new)
        results = await asyncio.gather(*(store.reload_after_rejection(rejected) for _ in range(50)))
    finally:
        await source.aclose()
    assert source.fetches == 2  # the first read, then one for the whole burst
    assert {(c.version, c.token) for c in results if c is not None} == {(2, new["token"])}
    assert len(results) == 50 and None not in results


async def test_an_outage_keeps_the_last_credential_counts_failures_and_recovers(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, first, policy = seeded
    config, secret_id = approle_config(openbao, tmp_path, path, policy)
    config = dataclasses.replace(config, refresh_interval_s=0.1, timeout_s=0.3)
    metrics = Metrics()
    store = CredentialStore(VaultSource(config), metrics, max_backoff_s=0.5)
    async with running(store):
        assert store.current is not None and store.current.version == 1
        with openbao.paused():
            await wait_until(
                lambda: (
                    metric(metrics, "invoice_proxy_credential_reloads_total", result="failure") >= 2
                ),
                "failures counted",
                WAIT_S,
            )
            assert store.current is not None and store.current.token == first["token"]
            assert metric(metrics, "invoice_proxy_credential_loaded") == 1
        second = planetscale_token()
        await openbao.awrite_secret("secret", path, second)
        await wait_for_version(store, 2)
    failed = events(logs, "credential_reload_failed")
    assert failed and all(e["keeping_last"] for e in failed)
    assert "did not answer within 0.3s" in failed[0]["reason"]
    assert_no_secrets(log_texts(logs), [secret_id, first["token"], second["token"]])


async def test_starting_while_vault_is_down_becomes_ready_by_itself(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    path, token, policy = seeded
    config, _ = approle_config(openbao, tmp_path, path, policy)
    config = dataclasses.replace(config, timeout_s=0.3)
    store = CredentialStore(VaultSource(config), Metrics(), max_backoff_s=0.5)
    with openbao.paused():
        async with running(store):
            assert store.current is None
            assert "did not answer" in store.not_ready_reason
            openbao.resume()
            await wait_until(lambda: store.current is not None, "ready once Vault answers", WAIT_S)
    assert store.current is not None and store.current.token == token["token"]
    assert store.not_ready_reason == ""


async def test_a_restarted_vault_refuses_then_the_source_logs_in_again(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    """A refused connection (stopped server), then a new, re-seeded dev server."""
    bao = OpenBao(tmp_path / "bao", port=free_port())
    role_id, secret_id = "role-" + secrets.token_hex(8), secrets.token_hex(16)
    token = planetscale_token()

    def seed() -> None:
        bao.write_secret("secret", "planetscale/invoice-proxy", token)
        policy = bao.read_only_policy("secret", "planetscale/invoice-proxy")
        bao.enable_auth("approle", "approle")
        bao.api("POST", "auth/approle/role/invoice-proxy", {"token_policies": [policy]})
        bao.api("POST", "auth/approle/role/invoice-proxy/role-id", {"role_id": role_id})
        bao.api(
            "POST", "auth/approle/role/invoice-proxy/custom-secret-id", {"secret_id": secret_id}
        )

    bao.start()
    try:
        seed()
        (tmp_path / "secret-id").write_text(secret_id)
        config = config_for(
            bao,
            "planetscale/invoice-proxy",
            auth="approle",
            role_id=role_id,
            secret_id_file=str(tmp_path / "secret-id"),
        )
        source = VaultSource(config)
        try:
            assert (await source.fetch(force=True)).version == 1
            bao.stop()
            with pytest.raises(CredentialError, match="cannot connect to Vault at"):
                await source.fetch(force=False)
            bao.start()
            seed()
            assert (await source.fetch(force=False)).token == token["token"]
        finally:
            await source.aclose()
    finally:
        bao.stop()
    assert [e["reason"] for e in events(logs, "vault_login")] == ["start", "read_refused"]


# -- transport: namespace, TLS ----------------------------------------------------------


async def test_sends_the_namespace_header(openbao: OpenBao, tmp_path: Path) -> None:
    namespace = unique("team")
    openbao.api("POST", f"sys/namespaces/{namespace}")
    openbao.api(
        "POST",
        "sys/mounts/kv",
        {"type": "kv", "options": {"version": "2"}},
        namespace=namespace,
    )
    token = planetscale_token()
    openbao.api("POST", "kv/data/planetscale", {"data": token}, namespace=namespace)
    config = config_for(
        openbao, "planetscale", mount="kv", namespace=namespace, token_env="VAULT_TOKEN"
    )
    source = VaultSource(config, environ={"VAULT_TOKEN": openbao.root_token})
    try:
        assert (await source.fetch(force=True)).token == token["token"]
    finally:
        await source.aclose()
    without = VaultSource(dataclasses.replace(config, namespace=""), environ=source._environ)
    try:
        with pytest.raises(CredentialError, match="no secret at kv/planetscale"):
            await without.fetch(force=True)
    finally:
        await without.aclose()


@pytest.fixture(scope="module")
def openbao_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with running_openbao(tmp_path_factory.mktemp("openbao-tls"), tls=True) as server:
        yield server


async def test_verifies_tls_with_the_configured_ca_file(openbao_tls: OpenBao) -> None:
    token = planetscale_token()
    openbao_tls.write_secret("secret", "planetscale", token)
    environ = {"VAULT_TOKEN": openbao_tls.root_token}
    config = config_for(openbao_tls, "planetscale", token_env="VAULT_TOKEN")
    trusting = VaultSource(
        dataclasses.replace(config, ca_file=openbao_tls.ca_file), environ=environ
    )
    untrusting = VaultSource(config, environ=environ)
    try:
        assert (await trusting.fetch(force=True)).token == token["token"]
        with pytest.raises(CredentialError, match=r"TLS connection to Vault .* failed"):
            await untrusting.fetch(force=True)
    finally:
        await trusting.aclose()
        await untrusting.aclose()


# -- errors never carry a secret --------------------------------------------------------


async def test_errors_say_what_is_wrong_and_never_carry_a_secret(
    openbao: OpenBao,
    seeded: tuple[str, dict[str, str], str],
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    path, token, policy = seeded
    approle, secret_id = approle_config(openbao, tmp_path, path, policy)
    other_policy = openbao.read_only_policy("secret", "somewhere/else")
    other_token = openbao.create_token([other_policy])
    wrong_secret_id = tmp_path / "wrong-secret-id"
    wrong_secret_id.write_text(secrets.token_hex(16))
    no_field = unique("planetscale/no-field")
    openbao.write_secret("secret", no_field, {"token_id": "abc"})
    cases: list[tuple[VaultConfig, dict[str, str], str]] = [
        (
            dataclasses.replace(approle, secret_id_file=str(wrong_secret_id)),
            {},
            f"Vault approle login at auth/{approle.approle_mount} failed: HTTP 400",
        ),
        (
            dataclasses.replace(approle, secret_id_file=str(tmp_path / "missing")),
            {},
            "secret_id_file .* does not exist",
        ),
        (
            config_for(openbao, path, token_env="T"),
            {"T": other_token},
            rf"Vault read of secret/{path} failed: HTTP 403 \(permission denied\)",
        ),
        (config_for(openbao, path, token_env="T"), {}, "environment variable T is not set"),
        (
            config_for(openbao, no_field, token_env="T"),
            {"T": openbao.root_token},
            "field 'token' is missing",
        ),
        (
            config_for(openbao, path, address=f"http://127.0.0.1:{free_port()}", token_env="T"),
            {"T": other_token},
            "cannot connect to Vault",
        ),
    ]
    messages = []
    for config, environ, expected in cases:
        source = VaultSource(config, environ=environ)
        try:
            with pytest.raises(CredentialError, match=expected) as caught:
                await source.fetch(force=True)
        finally:
            await source.aclose()
        messages.append(str(caught.value))
        messages.append(repr(source))
    known = [secret_id, wrong_secret_id.read_text(), other_token, openbao.root_token]
    assert_no_secrets(messages + log_texts(logs), [*known, token["token"], token["token_id"]])


async def test_a_burst_of_rejections_of_the_token_still_in_vault_makes_one_read(
    openbao: OpenBao, seeded: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    """PlanetScale refuses a token Vault still holds: one read answers the whole burst."""
    path, token, policy = seeded
    source = CountingVaultSource(token_config(openbao, tmp_path, path, policy))
    store = CredentialStore(source, Metrics())
    try:
        await store.refresh(force=True)
        rejected = store.current
        assert rejected is not None
        results = await asyncio.gather(*(store.reload_after_rejection(rejected) for _ in range(50)))
    finally:
        await source.aclose()
    assert source.fetches == 2
    assert {c.token for c in results if c is not None} == {token["token"]}


# -- the whole proxy ----------------------------------------------------------------------


def upstream_header(token: dict[str, str]) -> str:
    return f"{token['token_id']}:{token['token']}"


def rotating_secret(
    openbao: OpenBao, upstream: Upstream, tmp_path: Path
) -> tuple[str, list[dict[str, str]], dict[str, Any], str]:
    """A fresh secret with a first token PlanetScale accepts, and the [credential.vault]
    table of an AppRole that may read it: (path, tokens so far, vault table, secret_id)."""
    path = unique("planetscale/invoice-proxy")
    tokens = [planetscale_token()]
    openbao.write_secret("secret", path, tokens[0])
    policy = openbao.read_only_policy("secret", path)
    approle, secret_id = approle_config(openbao, tmp_path, path, policy)
    upstream.standin.accept_only(upstream_header(tokens[0]))
    vault = {
        "address": openbao.address,
        "path": path,
        "auth": "approle",
        "approle_mount": approle.approle_mount,
        "role_id": approle.role_id,
        "secret_id_file": approle.secret_id_file,
        "refresh_interval_s": 1.0,
        "timeout_s": 2.0,
    }
    return path, tokens, vault, secret_id


async def test_rotations_under_load_fail_no_caller_request(
    openbao: OpenBao,
    upstream: Upstream,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
) -> None:
    """20 callers for 10 s, 5 rotations; PlanetScale takes the old token for a short grace.

    The grace (0.1 s) is shorter than refresh_interval_s (1 s), so requests still carrying
    the old token are refused, and the proxy reloads from Vault and retries them.
    """
    path, tokens, vault, secret_id = rotating_secret(openbao, upstream, tmp_path)
    config = parse_config(
        config_dict(
            upstream.base_url,
            tmp_path / "unused.json",
            credential={"source": "vault", "vault": vault},
        )
    )
    source = CountingVaultSource(config.credential.vault)
    metrics = Metrics()
    proxy = await make_proxy(config=config, source=source, metrics=metrics)
    api = proxy.api

    async def version_in_use() -> float:
        async with proxy.admin.get("/metrics") as response:
            return metric(scraped(await response.text()), "invoice_proxy_credential_version")

    loop = asyncio.get_running_loop()
    started = loop.time()
    rotated = asyncio.Event()
    statuses: Counter[int] = Counter()
    cache: Counter[str] = Counter()

    async def caller(n: int) -> None:
        i = 0
        while loop.time() - started < 10.0 or not rotated.is_set():
            # Half the requests go to five hot invoices (cache hits), half are new ones.
            invoice = f"inv_hot_{i % 5}" if i % 2 else f"inv_{n}_{i}"
            async with api.get(invoice_path("acme", invoice), headers=BILLING) as response:
                await response.read()
                statuses[response.status] += 1
                cache[response.headers.get("X-Cache", "")] += 1
            i += 1
            await asyncio.sleep(0.01)

    versions = [await version_in_use()]

    async def rotate() -> None:
        try:
            for _ in range(5):
                await asyncio.sleep(1.2)
                new = planetscale_token()
                upstream.standin.accept_only(upstream_header(tokens[-1]), upstream_header(new))
                tokens.append(new)
                version = await openbao.awrite_secret("secret", path, new)
                await asyncio.sleep(0.1)
                upstream.standin.accept_only(upstream_header(new))
                async with asyncio.timeout(WAIT_S):
                    # Polling what a dashboard sees: /metrics.
                    while await version_in_use() != version:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                versions.append(version)
        finally:
            rotated.set()

    async with asyncio.timeout(60):
        await asyncio.gather(rotate(), *(caller(n) for n in range(20)))
    elapsed = loop.time() - started

    assert versions == [1, 2, 3, 4, 5, 6]
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 1000
    assert cache["HIT"] > 0 and cache["MISS"] > 0
    # Refused requests happened, and were retried with the new token.
    assert upstream.standin.stats.unauthorized > 0
    assert metric(metrics, "invoice_proxy_upstream_credential_rejections_total") > 0
    # Vault reads: the polls (every 0.9 s at the soonest), the first read, and at most one
    # per rotation for the refused requests; not one per refused request.
    assert source.fetches <= elapsed / 0.9 + 1 + 5
    known = [secret_id, *(t["token"] for t in tokens)]
    assert_no_secrets(log_texts(logs), known)


# -- a Vault that answers what no Vault sends ---------------------------------------------

_GOOD_LOGIN = {"auth": {"client_token": "s.hostileVaultToken0123456789", "lease_duration": 3600}}
_GOOD_SECRET = {"data": {"data": planetscale_token(), "metadata": {"version": 3}}}


def hostile_vault_config(port: int, tmp_path: Path) -> tuple[VaultConfig, Path]:
    """An AppRole source for the hostile Vault on `port`, and its secret_id file."""
    secret_id = tmp_path / "secret-id"
    secret_id.write_text(secrets.token_hex(16))
    config = VaultConfig(
        address=f"http://127.0.0.1:{port}",
        mount="secret",
        path="planetscale",
        auth="approle",
        role_id="role",
        secret_id_file=str(secret_id),
        timeout_s=2.0,
    )
    return config, secret_id


class HostileVault:
    """A stand-in Vault whose login and KV answers are whatever the test sets."""

    def __init__(self) -> None:
        self.login = json.dumps(_GOOD_LOGIN).encode()
        self.secret = json.dumps(_GOOD_SECRET).encode()
        self.secret_status = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/auth/approle/login", self._login)
        app.router.add_get("/v1/secret/data/planetscale", self._secret)
        return app

    async def _login(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.login, content_type="application/json")

    async def _secret(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.secret, status=self.secret_status, content_type="application/json"
        )


def _secret_with_version(version: str) -> bytes:
    fields = json.dumps(planetscale_token())
    return b'{"data": {"data": %s, "metadata": {"version": %s}}}' % (
        fields.encode(),
        version.encode(),
    )


@pytest.mark.parametrize(
    ("login", "secret", "reason"),
    [
        (None, b"[" * 100_000, "answered with a body that is not JSON"),
        (None, b'{"data": ' * 50_000, "answered with a body that is not JSON"),
        (None, b"1" * 5000, "answered with a body that is not JSON"),
        (None, _secret_with_version("1" + "0" * 400), "the version is out of range"),
        (None, _secret_with_version("-1"), "the version is out of range"),
        (
            b'{"auth": {"client_token": "s.x", "lease_duration": 1%s}}' % (b"0" * 400),
            None,
            "no valid lease_duration",
        ),
        (
            b'{"auth": {"client_token": "s.abc\\r\\nX-Injected: 1", "lease_duration": 60}}',
            None,
            "client_token is not a token",
        ),
        (b"[" * 100_000, None, "answered with a body that is not JSON"),
    ],
    ids=[
        "deep-list",
        "deep-object",
        "long-integer",
        "huge-version",
        "negative-version",
        "huge-lease",
        "token-with-crlf",
        "deep-login",
    ],
)
async def test_a_hostile_vault_answer_is_a_credential_error_with_a_safe_reason(
    aiohttp_server: Any,
    tmp_path: Path,
    logs: list[MutableMapping[str, Any]],
    login: bytes | None,
    secret: bytes | None,
    reason: str,
) -> None:
    vault = HostileVault()
    vault.login = login or vault.login
    vault.secret = secret or vault.secret
    server = await aiohttp_server(vault.app())
    config, secret_id = hostile_vault_config(server.port, tmp_path)
    metrics = Metrics()
    store = CredentialStore(VaultSource(config), metrics)
    async with running(store):
        assert store.current is None
        assert reason in store.not_ready_reason
        assert metric(metrics, "invoice_proxy_credential_reloads_total", result="failure") == 1
    failed = events(logs, "credential_reload_failed")
    assert [reason in e["reason"] for e in failed] == [True]
    assert "error" not in failed[0]  # a known failure, not an unexpected class
    assert_no_secrets(log_texts(logs), [secret_id.read_text(), "s.abc"])


async def test_a_flood_of_vault_errors_gives_a_bounded_reason(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    vault = HostileVault()
    vault.secret = json.dumps({"errors": ["permission denied " * 20] * 2_000}).encode()
    vault.secret_status = 403
    server = await aiohttp_server(vault.app())
    config, _ = hostile_vault_config(server.port, tmp_path)
    source = VaultSource(config)
    try:
        with pytest.raises(CredentialError, match="HTTP 403") as caught:
            await source.fetch(force=True)
    finally:
        await source.aclose()
    assert len(str(caught.value)) < 1500


@contextlib.contextmanager
def contended_core() -> Iterator[int]:
    """This process and a busy loop in another process share one core, for the block."""
    before = os.sched_getaffinity(0)
    core = min(before)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(burner.pid, {core})
        os.sched_setaffinity(0, {core})
        yield core
    finally:
        os.sched_setaffinity(0, before)
        burner.kill()
        burner.wait(timeout=10)


async def test_rotations_under_load_on_a_contended_cpu_cost_at_most_one_refusal_each(
    openbao: OpenBao, upstream: Upstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Five rotations while 20 callers keep the upstream rate cap busy, one core contended.

    The upstream keys are the defaults (5 requests a second, burst 10, deadline 20 s), so
    misses wait seconds for their turn and many are queued when PlanetScale stops taking
    the old token (0.1 s after the rotation, before the next refresh). Each one reads the
    token when it is sent; the first refusal makes the sends behind it wait for the
    reload. A request already on its way with the old token is refused too: the rate cap
    keeps sends 0.2 s apart, far more than a round trip, so that is the first one only.
    """
    path, tokens, vault, _ = rotating_secret(openbao, upstream, tmp_path)
    config = parse_config(
        config_dict(
            upstream.base_url,
            tmp_path / "unused.json",
            credential={"source": "vault", "vault": vault},
            upstream={
                f.name: getattr(UpstreamConfig(), f.name)
                for f in dataclasses.fields(UpstreamConfig)
                if f.name != "base_url"
            },
        )
    )
    metrics = Metrics()
    proxy = await make_proxy(config=config, metrics=metrics)
    api, app = proxy.api, proxy.app

    loop = asyncio.get_running_loop()
    rotated = asyncio.Event()
    statuses: Counter[int] = Counter()
    refused_by_rotation: list[int] = []

    async def caller(n: int) -> None:
        i = 0
        while not rotated.is_set():
            invoice = f"inv_hot_{i % 5}" if i % 2 else f"inv_c{n}_{i}"
            async with api.get(invoice_path("acme", invoice), headers=BILLING) as response:
                await response.read()
                statuses[response.status] += 1
            i += 1
            await asyncio.sleep(0.01)

    async def rotate() -> None:
        try:
            await asyncio.sleep(1.0)
            for _ in range(5):
                refused_before = upstream.standin.stats.unauthorized
                new = planetscale_token()
                upstream.standin.accept_only(upstream_header(tokens[-1]), upstream_header(new))
                tokens.append(new)
                version = await openbao.awrite_secret("secret", path, new)
                await asyncio.sleep(0.1)
                upstream.standin.accept_only(upstream_header(new))
                async with asyncio.timeout(WAIT_S):
                    while version_of(app[CREDENTIALS]) != version:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                await asyncio.sleep(1.0)  # stragglers of this rotation are answered by now
                refused_by_rotation.append(upstream.standin.stats.unauthorized - refused_before)
        finally:
            rotated.set()

    with contended_core():
        started = loop.time()
        async with asyncio.timeout(90):
            await asyncio.gather(rotate(), *(caller(n) for n in range(20)))
        elapsed = loop.time() - started

    assert len(refused_by_rotation) == 5
    assert set(statuses) == {200}, statuses
    assert all(refused <= 1 for refused in refused_by_rotation), refused_by_rotation
    assert sum(refused_by_rotation) >= 1, "PlanetScale refused the old token at least once"
    rate = UpstreamConfig().rate_per_s
    assert upstream.standin.stats.requests > elapsed * rate * 0.7, "the rate cap was kept busy"
    assert upstream.standin.stats.requests <= UpstreamConfig().burst + rate * elapsed
