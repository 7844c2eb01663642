"""No token, caller key or Authorization header reaches a log, a metric or a response."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from proxy import logging as proxy_logging
from proxy.app import CREDENTIALS
from proxy.standin import Behaviour

from .conftest import (
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
        structlog.reset_defaults()
    proxy_logging.flush_logs()
    logs = output.getvalue()
    assert '"event": "request"' in logs and "credential_reloaded" in logs
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
