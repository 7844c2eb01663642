"""PlanetScale's body against the upstream contract: drift accepted by default, strict on demand."""

from __future__ import annotations

import json
import math

import pytest

from proxy.standin import Behaviour

from .helpers import BILLING, ProxyFactory, Upstream, invoice_path

GOOD = {
    "id": "inv_1",
    "total": 12.5,
    "billing_period_start": "2025-01-01T00:00:00Z",
    "billing_period_end": "2025-02-01T00:00:00Z",
}
DRIFT = {**GOOD, "paid": True, "overdue": False}
STRING_TOTAL = {**GOOD, "total": "12.50"}


def serve(upstream: Upstream, body: object, content_type: str = "application/json") -> None:
    text = body if isinstance(body, str | bytes) else json.dumps(body)
    upstream.standin.behave("inv_1", Behaviour("body", body=text, content_type=content_type))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {k: v for k, v in GOOD.items() if k != "billing_period_end"}, id="missing-field"
        ),
        pytest.param({**GOOD, "total": True}, id="total-boolean"),
        pytest.param({**GOOD, "total": "twelve"}, id="total-not-decimal"),
        pytest.param({**GOOD, "id": 7}, id="id-not-string"),
        pytest.param({**GOOD, "paid": "yes"}, id="paid-not-boolean"),
        pytest.param([GOOD], id="not-an-object"),
        pytest.param('{"id": "inv_1", "total": ', id="invalid-json"),
        pytest.param("null", id="json-null"),
    ],
)
async def test_schema_breaking_body_is_502_invalid_response(
    make_proxy: ProxyFactory, upstream: Upstream, body: object
) -> None:
    proxy = await make_proxy()
    serve(upstream, body)
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 502
    assert (await response.json())["code"] == "upstream_invalid_response"


async def test_oversized_body_is_502_invalid_response(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"max_body_bytes": 1024})
    serve(upstream, {**GOOD, "notes": "x" * 2000})
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 502
    assert "over 1024 bytes" in (await response.json())["message"]


async def test_wrong_content_type_is_502_invalid_response(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    serve(upstream, GOOD, content_type="text/html")
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert (await response.json())["code"] == "upstream_invalid_response"


@pytest.mark.parametrize("body", [DRIFT, STRING_TOTAL], ids=["paid-overdue", "string-total"])
async def test_drift_passes_unchanged_by_default(
    make_proxy: ProxyFactory, upstream: Upstream, body: dict[str, object]
) -> None:
    proxy = await make_proxy()
    serve(upstream, body)
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 200
    assert await response.read() == json.dumps(body).encode()  # byte for byte
    page = await (await proxy.admin.get("/metrics")).text()
    kind = "extra_field" if "paid" in body else "string_total"
    assert f'invoice_proxy_upstream_schema_drift_total{{kind="{kind}"}} 1.0' in page


@pytest.mark.parametrize("body", [DRIFT, STRING_TOTAL], ids=["paid-overdue", "string-total"])
async def test_strict_schema_refuses_drift(
    make_proxy: ProxyFactory, upstream: Upstream, body: dict[str, object]
) -> None:
    proxy = await make_proxy(upstream={"strict_schema": True})
    serve(upstream, body)
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 502
    assert (await response.json())["code"] == "upstream_invalid_response"


async def test_strict_schema_accepts_the_document_exactly(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"strict_schema": True})
    serve(upstream, GOOD)
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 200


@pytest.mark.parametrize("strict", [False, True], ids=["drift", "strict"])
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(json.dumps({**GOOD, "id": "inv_2"}), id="another-invoice"),
        pytest.param(json.dumps({**GOOD, "total": math.nan}), id="total-NaN"),
        pytest.param(json.dumps({**GOOD, "total": math.inf}), id="total-Infinity"),
        pytest.param(json.dumps({**GOOD, "total": 1e300}).replace("1e+300", "1e400"), id="1e400"),
        pytest.param(json.dumps({**GOOD, "total": 10**400}), id="huge-integer"),
        pytest.param('{"id": "inv_2", ' + json.dumps(GOOD)[1:], id="duplicate-id"),
        pytest.param(
            json.dumps({**GOOD, "notes": "@"}).replace('"@"', "[" * 32 + "]" * 32), id="deep"
        ),
    ],
)
async def test_body_no_client_reads_alike_is_502_in_both_modes(
    make_proxy: ProxyFactory, upstream: Upstream, text: str, strict: bool
) -> None:
    proxy = await make_proxy(upstream={"strict_schema": strict})
    serve(upstream, text)
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 502
    assert (await response.json())["code"] == "upstream_invalid_response"


async def test_body_in_utf16_is_502(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy()
    serve(upstream, json.dumps(GOOD).encode("utf-16"))
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert (await response.json())["code"] == "upstream_invalid_response"


@pytest.mark.parametrize(
    "end",
    [
        "9999-12-31",
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+05:00",
        "2025-02-30",
        "garbage",
    ],
)
async def test_period_end_beyond_the_calendar_is_an_open_invoice(
    make_proxy: ProxyFactory, upstream: Upstream, end: str
) -> None:
    proxy = await make_proxy()
    serve(upstream, {**GOOD, "billing_period_end": end})
    response = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert response.status == 200
    assert response.headers["Cache-Control"] in ("private, max-age=300", "private, max-age=299")
