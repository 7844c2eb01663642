"""Hostile PlanetScale 200 bodies against a live proxy: a valid invoice for the id, or a 502.

Whatever bytes PlanetScale sends with a 200, the caller gets either that body byte for
byte (it passes the rule: strict JSON, the schema, the requested id, a finite total)
or `502 upstream_invalid_response`, counted and never cached. Never a 500.

Each example asks for a fresh invoice id, so the cache never hides an answer.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.standin import Behaviour

from .helpers import BILLING, FakeClock, Proxy, ProxyFactory, Upstream, invoice_path, metric

LIVE = settings(
    max_examples=80,
    deadline=None,
    # One proxy serves every example: each one asks for an id of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ids = itertools.count()
DOCUMENT_FIELDS = {"id", "total", "billing_period_start", "billing_period_end"}
DECIMAL = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?")


def fresh_id() -> str:
    return f"hostile_{next(_ids)}"


@pytest.fixture
async def strict_proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(upstream={"strict_schema": True})


def invalid_count(proxy: Proxy) -> float:
    return metric(proxy, "invoice_proxy_upstream_invalid_responses_total")


# --- the rule, written out again independently of proxy/invoice.py --------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _numbers_fit_a_double(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_numbers_fit_a_double(v) for v in value.values())
    if isinstance(value, list):
        return all(_numbers_fit_a_double(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return False
    return True


def follows_the_rule(body: bytes, invoice_id: str, *, strict: bool) -> bool:
    """What a 200 body must be for the proxy to serve it (the issue's rule)."""
    try:
        data = json.loads(
            body.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates
        )
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or _depth(data) > 32 or not _numbers_fit_a_double(data):
        return False
    if not data.keys() >= DOCUMENT_FIELDS or (strict and data.keys() != DOCUMENT_FIELDS):
        return False
    if data["id"] != invoice_id:
        return False
    if not all(isinstance(data[k], str) for k in ("billing_period_start", "billing_period_end")):
        return False
    total = data["total"]
    if isinstance(total, str):
        if strict or not DECIMAL.fullmatch(total):
            return False
    elif isinstance(total, bool) or not isinstance(total, int | float):
        return False
    return all(isinstance(data[k], bool) for k in ("paid", "overdue") if k in data)


async def served(
    proxy: Proxy, upstream: Upstream, invoice_id: str, body: bytes, *, strict: bool
) -> int:
    """Serve `body` for `invoice_id` (fresh); check what the caller sees; return the status."""
    upstream.standin.behave(invoice_id, Behaviour("body", body=body))
    invalid_before = invalid_count(proxy)
    response = await proxy.api.get(invoice_path("acme", invoice_id), headers=BILLING)
    answer = await response.read()
    assert response.status in (200, 502), (response.status, answer[:200])
    valid = follows_the_rule(body, invoice_id, strict=strict)
    again = await proxy.api.get(invoice_path("acme", invoice_id), headers=BILLING)
    await again.read()
    if response.status == 200:
        assert valid, "served a body that breaks the rule"
        assert answer == body, "not byte for byte"
        assert response.headers["Content-Type"] == "application/json"
        assert again.headers["X-Cache"] == "HIT"
        assert upstream.standin.requests_for(invoice_id) == 1
    else:
        assert not valid, "refused a body that follows the rule"
        assert json.loads(answer)["code"] == "upstream_invalid_response"
        assert invalid_count(proxy) == invalid_before + 2  # both requests counted
        assert again.status == 502
        assert upstream.standin.requests_for(invoice_id) == 2, "a 502 was cached"
    event(f"status {response.status}")
    return response.status


# --- strategies ---------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and Infinity included: json.dumps writes them
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)

EDGE_DATES = [
    "2025-02-01T00:00:00.000Z",
    "2025-02-01",
    "9999-12-31",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-05:00",
    "0001-01-01",
    "0001-01-01T00:00:00+05:00",
    "0001-01-01T00:00:00-23:59",
    "2025-02-30",
    "2025-W05-6",
    "20250201",
    "2025-02-01T24:00:00Z",
    "",
    "not a date",
    "\ud800",
]
# Raw JSON texts, so numbers JSON's grammar allows but no double holds can be sent.
NUMBER_TEXTS = [
    "12.5",
    "0",
    "-0",
    "1E+2",
    "1e400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 400,
    "9" * 5000,
    "123456789012345678901234567890",
    '"12.50"',
    '"1e3"',
    '"NaN"',
    "true",
    "null",
    "[]",
    "{}",
]


def _raw(value: Any) -> str:
    return json.dumps(value)


GOOD_TEXTS = {"total": "12.5", "date": '"2025-02-01T00:00:00.000Z"', "flag": "true"}


@st.composite
def raw_field(draw: st.DrawFn, kind: str) -> str:
    """A field's JSON text: a good one three times in four, else a hostile one."""
    if draw(st.integers(0, 3)):
        return GOOD_TEXTS[kind]
    if kind == "total":
        hostile = st.sampled_from(NUMBER_TEXTS) | st.floats().map(_raw) | st.integers().map(_raw)
    elif kind == "date":
        hostile = st.sampled_from(EDGE_DATES).map(_raw) | st.text(max_size=30).map(_raw)
    else:
        hostile = st.sampled_from(["false", "null", '"yes"', "0"])
    return draw(hostile)


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@st.composite
def adversarial(draw: st.DrawFn, invoice_id: str) -> bytes:
    id_text = draw(
        st.sampled_from(
            [_raw(invoice_id)] * 15
            + [_raw(invoice_id + "x"), _raw(invoice_id.upper()), "7", "null", '"inv_1"']
        )
    )
    fields = [
        ("id", id_text),
        ("total", draw(raw_field("total"))),
        ("billing_period_start", draw(raw_field("date"))),
        ("billing_period_end", draw(raw_field("date"))),
    ]
    if draw(st.booleans()):
        fields += [("paid", draw(raw_field("flag"))), ("overdue", "false")]
    fields = draw(st.permutations(fields))
    drop = draw(st.sampled_from([None] * 12 + sorted(DOCUMENT_FIELDS)))
    fields = [f for f in fields if f[0] != drop]
    extra = draw(
        st.sampled_from(
            [
                *[[]] * 6,
                [("notes", nested(31))],
                [("notes", nested(32))],
                [("notes", nested(5000))],
                [("id", _raw(invoice_id))],  # a duplicate key
                [("id", '"other"')],
                [("weird", json.dumps(draw(json_values)))],
            ]
        )
    )
    text = "{" + ", ".join(f"{_raw(k)}: {v}" for k, v in [*fields, *extra]) + "}"
    encoding = draw(st.sampled_from(["utf-8"] * 12 + ["utf-16", "utf-8-sig"]))
    return text.encode(encoding, "surrogatepass")


# --- the properties -----------------------------------------------------------------


@LIVE
@given(body=st.binary(max_size=2048))
@example(body=b"\xef\xbb\xbf{}")
@example(body=b"[" * 60000)
async def test_arbitrary_bytes_are_a_valid_200_or_a_502(
    proxy: Proxy, upstream: Upstream, body: bytes
) -> None:
    await served(proxy, upstream, fresh_id(), body, strict=False)


@LIVE
@given(value=json_values)
async def test_arbitrary_json_is_a_valid_200_or_a_502(
    proxy: Proxy, upstream: Upstream, value: Any
) -> None:
    await served(proxy, upstream, fresh_id(), json.dumps(value).encode(), strict=False)


@LIVE
@given(data=st.data())
async def test_adversarial_invoices_are_a_valid_200_or_a_502(
    proxy: Proxy, upstream: Upstream, data: st.DataObject
) -> None:
    invoice_id = fresh_id()
    await served(proxy, upstream, invoice_id, data.draw(adversarial(invoice_id)), strict=False)


@LIVE
@given(data=st.data())
async def test_adversarial_invoices_in_strict_mode_are_a_valid_200_or_a_502(
    strict_proxy: Proxy, upstream: Upstream, data: st.DataObject
) -> None:
    invoice_id = fresh_id()
    await served(
        strict_proxy, upstream, invoice_id, data.draw(adversarial(invoice_id)), strict=True
    )


async def test_invalid_body_serves_the_stale_entry_and_is_not_cached(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """Within its stale window, the entry from before is served; the bad body is never kept."""
    clock = FakeClock()
    proxy = await make_proxy(clock=clock, cache={"open_period_ttl_s": 60, "stale_if_error_s": 600})
    path = invoice_path("acme", "open-1")
    first = await proxy.api.get(path, headers=BILLING)
    good = await first.read()
    clock.advance(61)
    nan = good.replace(b'"total": ', b'"total": NaN, "was": ')
    upstream.standin.behave("open-1", Behaviour("body", body=nan))
    stale = await proxy.api.get(path, headers=BILLING)
    assert stale.status == 200 and stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == good
    assert invalid_count(proxy) == 1
    again = await proxy.api.get(path, headers=BILLING)
    assert again.headers["X-Cache"] == "STALE", "the invalid body was not cached"
    assert upstream.standin.requests_for("open-1") == 3
    assert invalid_count(proxy) == 2
    clock.advance(600)
    expired = await proxy.api.get(path, headers=BILLING)
    assert expired.status == 502
    assert (await expired.json())["code"] == "upstream_invalid_response"
