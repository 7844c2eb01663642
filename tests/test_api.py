"""The HTTP API as a caller sees it: each row of SPEC's error table, by a real request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.auth import key_digest
from proxy.standin import Behaviour, make_invoice

from .helpers import (
    ADMIN,
    BILLING,
    BILLING_KEY,
    REPORTING,
    REPORTING_KEY,
    Proxy,
    ProxyFactory,
    Upstream,
    assert_error,
    invoice_path,
)


async def test_invoice_is_planetscale_body_with_cache_headers(
    proxy: Proxy, upstream: Upstream
) -> None:
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert json.loads(await response.read()) == make_invoice("inv_2025_01")
    assert response.headers["X-Cache"] == "MISS"
    assert response.headers["ETag"].startswith('"')
    assert response.headers["X-Request-ID"]
    assert upstream.standin.requests_for("inv_2025_01") == 1


async def test_upstream_request_is_exactly_the_invoice_get_with_the_token(
    proxy: Proxy, upstream: Upstream
) -> None:
    """Only GET on the invoice path goes upstream: no query, no caller header."""
    headers = {**BILLING, "X-Forwarded-For": "10.0.0.1", "Cookie": "a=b"}
    await proxy.api.get(invoice_path() + "?expand=all&x=1", headers=headers)
    assert upstream.standin.stats.paths == ["/v1/organizations/acme/invoices/inv_2025_01"]
    assert upstream.standin.stats.methods == {"GET": 1}
    assert upstream.standin.stats.unauthorized == 0


async def test_callers_request_id_is_echoed(proxy: Proxy) -> None:
    response = await proxy.api.get(invoice_path(), headers={**BILLING, "X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


async def test_insane_request_id_is_replaced(proxy: Proxy) -> None:
    response = await proxy.api.get(
        invoice_path(), headers={**BILLING, "X-Request-ID": "a b\tc" + "x" * 100}
    )
    assert response.headers["X-Request-ID"] != "a b\tc" + "x" * 100
    assert len(response.headers["X-Request-ID"]) == 32


async def test_head_answers_headers_without_body(proxy: Proxy) -> None:
    response = await proxy.api.head(invoice_path(), headers=BILLING)
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["ETag"]


async def test_400_for_path_parameter_out_of_pattern(proxy: Proxy, upstream: Upstream) -> None:
    for path in (
        invoice_path("ac.me"),
        invoice_path("acme", "x" * 65),
        invoice_path("acme", "inv%2F..%2Fx"),
        invoice_path("acm%C3%A9"),
    ):
        await assert_error(await proxy.api.get(path, headers=REPORTING), 400, "invalid_request")
    assert upstream.standin.stats.requests == 0


async def test_401_without_key_names_bearer(proxy: Proxy, upstream: Upstream) -> None:
    response = await proxy.api.get(invoice_path())
    await assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.standin.stats.requests == 0


async def test_401_for_unknown_key(proxy: Proxy) -> None:
    for header in ("Bearer not-a-known-key", "Basic dXNlcjpwYXNz", "Bearer ", "bearer"):
        response = await proxy.api.get(invoice_path(), headers={"Authorization": header})
        await assert_error(response, 401, "unauthorized")


async def test_403_for_organization_not_allowed_never_goes_upstream(
    proxy: Proxy, upstream: Upstream
) -> None:
    response = await proxy.api.get(invoice_path("globex"), headers=BILLING)
    await assert_error(response, 403, "forbidden")
    assert upstream.standin.stats.requests == 0


async def test_wildcard_caller_reads_any_organization(proxy: Proxy) -> None:
    response = await proxy.api.get(invoice_path("globex"), headers=REPORTING)
    assert response.status == 200


async def test_404_when_planetscale_has_no_such_invoice(proxy: Proxy) -> None:
    await assert_error(
        await proxy.api.get(invoice_path("acme", "missing-1"), headers=BILLING), 404, "not_found"
    )


async def test_404_json_for_any_other_path(proxy: Proxy) -> None:
    for path in ("/", "/v1/organizations/acme", "/v2/organizations/acme/invoices/x", "/metrics"):
        await assert_error(await proxy.api.get(path, headers=BILLING), 404, "not_found")


async def test_405_for_other_methods_with_allow(proxy: Proxy, upstream: Upstream) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = await proxy.api.request(method, invoice_path(), headers=BILLING)
        await assert_error(response, 405, "method_not_allowed")
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert upstream.standin.stats.requests == 0


async def test_get_with_a_body_is_refused(proxy: Proxy, upstream: Upstream) -> None:
    response = await proxy.api.get(invoice_path(), headers=BILLING, data=b"{}")
    await assert_error(response, 400, "invalid_request")
    assert upstream.standin.stats.requests == 0


async def test_429_when_planetscale_limit_holds_with_retry_after(
    proxy: Proxy, upstream: Upstream
) -> None:
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="7"))
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    await assert_error(response, 429, "rate_limited")
    assert response.headers["Retry-After"] == "7"


async def test_429_when_caller_exceeds_its_own_limit(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        callers=[
            {
                "name": "billing-service",
                "key_sha256": [key_digest(BILLING_KEY)],
                "organizations": ["acme"],
                "rate_per_s": 1.0,
                "burst": 2,
            }
        ]
    )
    statuses = [(await proxy.api.get(invoice_path(), headers=BILLING)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    await assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    page = await (await proxy.admin.get("/metrics")).text()
    assert 'invoice_proxy_caller_rate_limited_total{caller="billing-service"} 2.0' in page


async def test_502_upstream_error_after_retries(proxy: Proxy, upstream: Upstream) -> None:
    upstream.standin.behave("*", Behaviour("status", status=503))
    await assert_error(await proxy.api.get(invoice_path(), headers=BILLING), 502, "upstream_error")
    # retries = 2 by default: three attempts in all.
    assert upstream.standin.requests_for("inv_2025_01") == 3


async def test_502_upstream_error_on_reset(proxy: Proxy, upstream: Upstream) -> None:
    upstream.standin.behave("*", Behaviour("reset"))
    await assert_error(await proxy.api.get(invoice_path(), headers=BILLING), 502, "upstream_error")


async def test_retry_recovers_from_one_5xx(proxy: Proxy, upstream: Upstream) -> None:
    upstream.standin.behave("*", Behaviour("status", status=500, times=1))
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    assert response.status == 200
    assert upstream.standin.requests_for("inv_2025_01") == 2


async def test_502_invalid_response_is_not_cached(proxy: Proxy, upstream: Upstream) -> None:
    upstream.standin.behave("inv_1", Behaviour("malformed", times=1))
    path = invoice_path("acme", "inv_1")
    await assert_error(await proxy.api.get(path, headers=BILLING), 502, "upstream_invalid_response")
    response = await proxy.api.get(path, headers=BILLING)
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"


async def test_502_credential_rejected_after_one_reload(proxy: Proxy, upstream: Upstream) -> None:
    upstream.standin.accept_only("someone-else:token")
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    await assert_error(response, 502, "upstream_credential_rejected")
    # The first refusal reloads the credential and tries once more: two requests.
    assert upstream.standin.stats.unauthorized == 2
    metrics = await (await proxy.admin.get("/metrics")).text()
    assert "invoice_proxy_upstream_credential_rejections_total 2.0" in metrics


async def test_503_unavailable_while_no_credential_is_loaded(
    make_proxy: ProxyFactory, credential_file: Path, upstream: Upstream
) -> None:
    credential_file.unlink()
    proxy = await make_proxy()
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    await assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"]
    assert upstream.standin.stats.requests == 0
    ready = await proxy.admin.get("/readyz")
    assert ready.status == 503
    assert "does not exist" in (await ready.json())["reason"]


async def test_504_when_planetscale_is_too_slow(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.2, "deadline_s": 0.5, "retries": 0})
    upstream.standin.behave("*", Behaviour("slow", delay_s=2.0))
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    await assert_error(response, 504, "upstream_timeout")


async def test_unexpected_upstream_status_is_502_without_retry(
    proxy: Proxy, upstream: Upstream
) -> None:
    upstream.standin.behave("*", Behaviour("status", status=418))
    await assert_error(await proxy.api.get(invoice_path(), headers=BILLING), 502, "upstream_error")
    assert upstream.standin.requests_for("inv_2025_01") == 1


async def test_admin_health_and_readiness(proxy: Proxy) -> None:
    assert (await proxy.admin.get("/healthz")).status == 200
    ready = await proxy.admin.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"


async def test_metrics_page_counts_requests_by_caller_and_code(proxy: Proxy) -> None:
    await proxy.api.get(invoice_path(), headers=BILLING)
    await proxy.api.get(invoice_path("globex"), headers=BILLING)
    await proxy.api.get(invoice_path())
    page = await (await proxy.admin.get("/metrics")).text()
    assert 'invoice_proxy_requests_total{caller="billing-service",code="200"} 1.0' in page
    assert 'invoice_proxy_requests_total{caller="billing-service",code="403"} 1.0' in page
    assert 'invoice_proxy_requests_total{caller="unknown",code="401"} 1.0' in page
    assert 'invoice_proxy_upstream_requests_total{code="200"} 1.0' in page
    assert "invoice_proxy_credential_loaded 1.0" in page
    assert 'invoice_proxy_cache_lookups_total{result="miss"} 1.0' in page


async def test_upstream_lines_of_a_request_carry_its_request_id(
    proxy: Proxy, upstream: Upstream
) -> None:
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    upstream.standin.behave("*", Behaviour("status", status=503, times=1))
    with capture_logs(processors=[merge_contextvars]) as logs:
        response = await proxy.api.get(
            invoice_path(), headers={**BILLING, "X-Request-ID": "trace-42"}
        )
    assert response.status == 200
    retry = next(line for line in logs if line["event"] == "upstream_retry")
    assert retry["request_id"] == "trace-42"
    request_line = next(line for line in logs if line["event"] == "request")
    assert request_line["request_id"] == "trace-42"


TWO_AUTHORIZATIONS = {
    "valid_first": (f"Bearer {BILLING_KEY}", "Bearer not-a-known-key"),
    "valid_second": ("Bearer not-a-known-key", f"Bearer {BILLING_KEY}"),
    "same_twice": (f"Bearer {BILLING_KEY}", f"Bearer {BILLING_KEY}"),
    "two_callers": (f"Bearer {BILLING_KEY}", f"Bearer {REPORTING_KEY}"),
    "one_empty": ("", f"Bearer {BILLING_KEY}"),
}


@pytest.mark.parametrize("values", TWO_AUTHORIZATIONS.values(), ids=TWO_AUTHORIZATIONS.keys())
async def test_two_authorization_headers_are_refused_whichever_comes_first(
    proxy: Proxy, upstream: Upstream, values: tuple[str, str]
) -> None:
    headers = CIMultiDict([("Authorization", value) for value in values])
    body = await assert_error(
        await proxy.api.get(invoice_path(), headers=headers), 400, "invalid_request"
    )
    assert "Authorization" in body["message"]
    assert upstream.standin.stats.requests == 0
    assert (await proxy.api.get(invoice_path(), headers=BILLING)).status == 200


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid_first", "valid_second"])
async def test_two_authorization_headers_on_the_purge_are_refused(
    proxy: Proxy, valid_first: bool
) -> None:
    assert (await proxy.api.get(invoice_path(), headers=BILLING)).status == 200
    values = [ADMIN["Authorization"], "Bearer not-an-admin-key"]
    headers = CIMultiDict([("Authorization", v) for v in (values if valid_first else values[::-1])])
    purge = "/cache/organizations/acme/invoices/inv_2025_01"
    await assert_error(await proxy.admin.delete(purge, headers=headers), 400, "invalid_request")
    # Nothing was purged: the next read is still a hit.
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    assert response.headers["X-Cache"] == "HIT"
