"""No token, caller key or Authorization header reaches a log, a metric or a response."""

from __future__ import annotations

import base64
import io
import json
import string
from pathlib import Path

import pytest
import structlog
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy import logging as proxy_logging
from proxy.app import CREDENTIALS
from proxy.standin import Behaviour

from .helpers import (
    ADMIN,
    BILLING,
    REPORTING,
    SECRETS,
    TOKEN,
    ProxyFactory,
    Upstream,
    invoice_path,
    write_credential,
)


async def test_no_secret_in_logs_metrics_or_responses(
    make_proxy: ProxyFactory, upstream: Upstream, credential_file: Path, capsys: object
) -> None:
    """Requests that succeed and that fail every way; then search everything they left."""
    output = io.StringIO()
    proxy_logging.configure("debug", "json", stream=output, cache=False)
    try:
        proxy = await make_proxy(upstream={"retries": 0, "timeout_s": 0.3, "deadline_s": 0.5})
        seen: list[str] = []

        async def call(path: str, headers: dict[str, str]) -> None:
            response = await proxy.api.get(path, headers=headers)
            seen.append(str(response.headers))
            seen.append(await response.text())

        await call(invoice_path(), BILLING)
        await call(invoice_path(), BILLING)
        await call(invoice_path("globex"), BILLING)
        await call(invoice_path("acme", "missing-1"), BILLING)
        await call(invoice_path("acme", "x.y"), BILLING)
        await call(invoice_path(), {"Authorization": f"Bearer {TOKEN}"})
        await call(invoice_path(), {"Authorization": f"{TOKEN}"})
        for mode, extra in (
            ("status", {"status": 500}),
            ("status", {"status": 429}),
            ("reset", {}),
            ("malformed", {}),
            ("slow", {"delay_s": 1.0}),
            ("body", {"body": json.dumps({"id": TOKEN, "total": TOKEN})}),
        ):
            upstream.standin.behave("*", Behaviour(mode, **extra))  # type: ignore[arg-type]
            await call(invoice_path("acme", f"inv_{mode}"), REPORTING)
        upstream.standin.behave("*", None)
        # The token refused, then a broken credential file.
        upstream.standin.accept_only("other:token")
        await call(invoice_path("acme", "inv_refused"), BILLING)
        credential_file.write_text('{"token_id": "x", "token": ')
        await proxy.app[CREDENTIALS].refresh(force=True)
        write_credential(credential_file, "id2", TOKEN + "-next")
        await proxy.app[CREDENTIALS].refresh(force=True)
        purge = await proxy.admin.delete(
            "/cache/organizations/acme/invoices/inv_2025_01", headers=ADMIN
        )
        seen.append(await purge.text())
        seen.append(await (await proxy.admin.get("/metrics")).text())
        seen.append(await (await proxy.admin.get("/readyz")).text())
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    logs = output.getvalue()
    events = [json.loads(line)["event"] for line in logs.splitlines()]
    assert "request" in events and "credential_reloaded" in events
    everything = logs + "\n".join(seen) + capsys.readouterr().out  # type: ignore[attr-defined]
    for secret in (*SECRETS, TOKEN + "-next"):
        assert secret not in everything
    assert "Bearer " not in logs


def test_redaction_masks_secret_shaped_values_a_change_might_log() -> None:
    event = proxy_logging.redact_secrets(
        None,
        "info",
        {
            "event": "oops",
            "authorization": "Bearer abc",
            "headers": {"Authorization": "x:y", "Accept": "application/json"},
            "message": f"failed with token pscale_tkn_abcdef and Bearer {SECRETS[1]}",
            "vault_token": "hvs.CAESIJ0123456789abcdefghijklmno",
            "status": 200,
        },
    )
    assert event["authorization"] == "[redacted]"
    assert event["headers"] == {"Authorization": "[redacted]", "Accept": "application/json"}
    assert "pscale_tkn_abcdef" not in event["message"] and SECRETS[1] not in event["message"]
    assert event["vault_token"] == "[redacted]"
    assert event["status"] == 200


async def test_a_64_character_invoice_id_is_logged_as_it_is(proxy: object) -> None:
    """Redaction masks secret shapes, not every long identifier."""
    from structlog.testing import capture_logs

    long_id = "inv_" + "a1B2c3D4e5" * 6
    with capture_logs(processors=[proxy_logging.redact_secrets]) as logs:
        response = await proxy.api.get(invoice_path("acme", long_id), headers=BILLING)  # type: ignore[attr-defined]
    assert response.status == 200
    line = next(entry for entry in logs if entry["event"] == "request")
    assert line["invoice_id"] == long_id


def test_timestamps_match_structlogs_iso_format() -> None:
    import re

    stamp = proxy_logging.UTCTimestamper()(None, "info", {})["timestamp"]
    reference = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert stamp[:16] == reference["timestamp"][:16]  # same minute, same shape


# --- the redaction net, by property ---------------------------------------------------

URLSAFE = string.ascii_letters + string.digits + "_-"
USERINFO = string.ascii_letters + string.digits + "-._~!$&'()*+,;=%:"


def rendered(**fields: object) -> str:
    """One log line as the service writes it (the processors `configure` installs)."""
    stream = io.StringIO()
    proxy_logging.configure("debug", "json", stream=stream, cache=False)
    try:
        structlog.get_logger("proxy").error("oops", **fields)
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    return stream.getvalue()


def _letter_and_digit(value: str) -> bool:
    return any(c.isalpha() for c in value) and any(c.isdigit() for c in value)


# `new-caller-key` (token_urlsafe(32)), other lengths, hex keys, UUIDs. A key of only
# letters (one `new-caller-key` in about 1,500 has no digit) has no shape to tell it
# from a long name: the net does not promise it.
bare_keys = st.one_of(
    st.text(st.sampled_from(URLSAFE), min_size=32, max_size=64).filter(_letter_and_digit),
    st.binary(min_size=32, max_size=32).map(lambda b: base64.urlsafe_b64encode(b).decode()[:43]),
    st.binary(min_size=16, max_size=32).map(bytes.hex).filter(_letter_and_digit),
    st.uuids().map(str).filter(_letter_and_digit),
).filter(_letter_and_digit)
# token_id:token with a short id, a base64 token (+ / =), PlanetScale's shape.
id_token_pairs = st.tuples(
    st.text(st.sampled_from(URLSAFE), min_size=1, max_size=20),
    st.one_of(
        st.text(st.sampled_from(URLSAFE + "+/="), min_size=24, max_size=64),
        st.binary(min_size=18, max_size=48).map(lambda b: base64.b64encode(b).decode()),
    ).filter(lambda token: not token.startswith("//")),  # `x://...` is a URL, not a pair
)
redis_urls = st.tuples(
    st.sampled_from(["redis", "rediss", "REDIS"]),
    st.text(st.sampled_from(USERINFO.replace(":", "")), max_size=12),
    st.text(st.sampled_from(USERINFO + "@"), min_size=8, max_size=32),
    st.from_regex(r"[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?(/[0-9])?", fullmatch=True),
)
surroundings = st.text(max_size=30) | st.text(st.sampled_from(URLSAFE + ":/.@= "), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    key=bare_keys,
    before=surroundings,
    after=surroundings,
    field=st.sampled_from(["error", "detail", "reason"]),
)
def test_a_bare_key_never_reaches_a_log_line(key: str, before: str, after: str, field: str) -> None:
    assume(key not in before + after)
    assert key not in rendered(**{field: before + key + after})


@settings(max_examples=200, deadline=None)
@given(pair=id_token_pairs, before=surroundings, after=surroundings)
def test_an_id_token_pair_never_leaves_its_token_in_a_log_line(
    pair: tuple[str, str], before: str, after: str
) -> None:
    token_id, token = pair
    assume(token not in before + after)
    assert token not in rendered(error=f"{before}{token_id}:{token}{after}")


@settings(max_examples=200, deadline=None)
@given(url=redis_urls, before=surroundings, after=surroundings)
def test_a_redis_url_never_leaves_its_password_in_a_log_line(
    url: tuple[str, str, str, str], before: str, after: str
) -> None:
    scheme, user, password, host = url
    assume(password not in before + after + host)
    line = rendered(error=f"{before}{scheme}://{user}:{password}@{host}{after}")
    assert password not in line
    assert f"{user}:{password}@" not in line


@pytest.mark.parametrize(
    "value",
    [
        "upstream_failed",
        "UpstreamInvalidResponseError",
        "aiohttp.client_exceptions.ClientConnectorCertificateError",
        "invoice_proxy_credential_last_reload_timestamp_seconds",
        "2026-12-01T23:02:34.123456Z",
        "redis://redis.internal:6380/0",
        "https://api.planetscale.com/v1",
        "http://invoice-proxy-upstream-standin-service:8080/v1",
        "secret/data/planetscale/invoice-proxy",
        "/vault/secrets/planetscale.json",
        "cannot connect to Vault at https://vault.internal:8200: connection refused",
        "callers[0].key_sha256[0]: expected 64 lowercase hex digits (a SHA-256 digest)",
        "inv_2025_01",
        "x" * 64,
    ],
)
def test_ordinary_values_are_left_alone(value: str) -> None:
    assert json.loads(rendered(error=value))["error"] == value


def test_fields_the_code_fills_itself_are_not_scanned() -> None:
    """A 64-hex invoice id is a valid id; in the fields the code validated, it is logged
    as it is. Elsewhere a 64-hex string is masked: a hex-encoded key looks the same."""
    hex_id = "0123456789abcdef" * 4
    line = json.loads(rendered(invoice_id=hex_id, request_id=hex_id[:32], error=hex_id))
    assert line["invoice_id"] == hex_id and line["request_id"] == hex_id[:32]
    assert line["error"] == "[redacted]"


def test_no_trusted_field_name_is_secret_named() -> None:
    """A line of trusted fields only skips the scan (the request line): none of their
    names may be one whose value is masked whatever it holds."""
    assert not [
        name
        for name in proxy_logging._TRUSTED_VALUES
        if proxy_logging._kind(name) == proxy_logging._SECRET
    ]
    line = json.loads(rendered(request_id="r", caller="billing", status=200))
    assert line["caller"] == "billing"
    assert json.loads(rendered(request_id="r", token="t"))["token"] == "[redacted]"
