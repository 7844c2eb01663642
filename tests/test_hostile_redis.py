"""Redis is untrusted input: whatever sits under the proxy's own keys, no 500, no bad body.

A live proxy with `[shared]` on a real redis-server. Each example writes bytes (or a
value of another type) under the key of the invoice it then asks for, under that
invoice's lock key, or under the fleet budget's key, and checks what the caller gets:
an answer that passes the same rule as an upstream body, for the requested id, or a
fetch as if Redis had nothing, which then overwrites the bad value.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import struct
import time
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.invoice import InvalidInvoice, check_invoice
from proxy.standin import make_invoice

from .helpers import BILLING, Proxy, ProxyFactory, Upstream, invoice_path, metric
from .redis_server import RedisServer

LIVE = settings(
    max_examples=60,
    deadline=None,
    # One proxy and one Redis serve every example: each one asks for an id of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PREFIX = "invoice-proxy:v1"
BUDGET_KEY = f"{PREFIX}:budget"
HEADER = struct.Struct("!Hdd")  # the stored layout: status, fresh_until, stale_until
# The lock-key tests' lock lifetime: a forged lock is waited out at most this long.
LOCK_TTL_S = 0.3
# Every other test's: on a busy machine the loop can stall past 0.3 s, this replica's own
# lock then expires before it shares its answer, and the answer is (rightly) not stored.
VALUE_LOCK_TTL_S = 3.0
_ids = itertools.count()


def fresh_id() -> str:
    return f"redis_{next(_ids)}"


def value_key(invoice_id: str) -> str:
    return f"{PREFIX}:inv:{{acme:{invoice_id}}}"


def lock_key(invoice_id: str) -> str:
    return f"{PREFIX}:lock:{{acme:{invoice_id}}}"


def shared_sections(
    server: RedisServer, *, lock_ttl_s: float = VALUE_LOCK_TTL_S, **upstream: Any
) -> dict[str, dict[str, Any]]:
    # A long command timeout: one event loop runs the proxy, the stand-in and Redis
    # clients, and a slow loop must not turn into an outage (the local path).
    return {
        "shared": {
            "redis_url": server.url,
            "timeout_s": 0.5,
            "lock_ttl_s": lock_ttl_s,
            "retry_interval_s": 0.2,
        },
        "upstream": {
            "fleet_rate_per_minute": 600_000,
            "fleet_burst": 1000,
            "fleet_max_wait_s": 0.1,
            **upstream,
        },
    }


@pytest.fixture
async def fleet(make_proxy: ProxyFactory, redis_server: RedisServer) -> Proxy:
    return await make_proxy(**shared_sections(redis_server))


@pytest.fixture
async def short_lock_fleet(make_proxy: ProxyFactory, redis_server: RedisServer) -> Proxy:
    return await make_proxy(**shared_sections(redis_server, lock_ttl_s=LOCK_TTL_S))


@pytest.fixture
async def strict_fleet(make_proxy: ProxyFactory, redis_server: RedisServer) -> Proxy:
    return await make_proxy(**shared_sections(redis_server, strict_schema=True))


def passes(body: bytes, invoice_id: str, *, strict: bool) -> bool:
    try:
        check_invoice(body, strict=strict, invoice_id=invoice_id)
    except InvalidInvoice:
        return False
    return True


def a_valid_stored_value(raw: bytes, invoice_id: str, *, strict: bool) -> bool:
    """The rule for a value read from Redis, written out from the issue."""
    if len(raw) < HEADER.size:
        return False
    status, fresh_until, stale_until = HEADER.unpack_from(raw)
    body = raw[HEADER.size :]
    if math.isnan(fresh_until) or math.isnan(stale_until) or fresh_until == -math.inf:
        return False
    if stale_until < fresh_until:
        return False
    if status == 404:
        return body == b"" and math.isfinite(fresh_until)
    return status == 200 and passes(body, invoice_id, strict=strict)


async def asked(proxy: Proxy, invoice_id: str) -> tuple[int, bytes]:
    response = await proxy.api.get(invoice_path("acme", invoice_id), headers=BILLING)
    body = await response.read()
    assert response.status in (200, 404), (response.status, body[:200])
    if response.status == 404:
        assert json.loads(body)["code"] == "not_found"
    return response.status, body


# --- strategies ---------------------------------------------------------------------

lifetimes = st.one_of(
    st.floats(),  # NaN and both infinities included
    st.floats(-3600, 86400).map(lambda offset: time.time() + offset),
    st.just(math.inf),
)


@st.composite
def stored_values(draw: st.DrawFn, invoice_id: str) -> bytes:
    """Packed like the proxy's own values, with any status, lifetimes and body."""
    status = draw(st.sampled_from([200] * 6 + [404, 404, 0, 304, 500, 65535]))
    fresh_until = draw(lifetimes)
    stale_until = draw(st.one_of(lifetimes, st.just(fresh_until)))
    good = make_invoice(invoice_id)
    body = draw(
        st.sampled_from(
            [
                *[json.dumps(good).encode()] * 4,
                json.dumps(make_invoice(invoice_id, drift=True)).encode(),
                json.dumps({**good, "id": "someone_else"}).encode(),
                json.dumps({**good, "total": math.nan}).encode(),
                b"",
                b'{"code": "not_found", "message": "Not Found"}',
            ]
        )
        | st.binary(max_size=64)
    )
    return HEADER.pack(status, fresh_until, stale_until) + body


# --- the invoice's value key --------------------------------------------------------


async def check_value(
    proxy: Proxy,
    upstream: Upstream,
    inspect: redis.asyncio.Redis,
    invoice_id: str,
    raw: bytes,
    *,
    strict: bool,
) -> None:
    """Store `raw` as the answer for `invoice_id` (fresh), ask for it, check the outcome."""
    await inspect.set(value_key(invoice_id), raw)
    invalid_before = metric(proxy, "invoice_proxy_shared_cache_lookups_total", result="invalid")
    status, body = await asked(proxy, invoice_id)
    from_redis = upstream.standin.requests_for(invoice_id) == 0
    valid = a_valid_stored_value(raw, invoice_id, strict=strict)
    invalid_after = metric(proxy, "invoice_proxy_shared_cache_lookups_total", result="invalid")
    event("served from Redis" if from_redis else "fetched afresh")
    if from_redis:
        assert valid, "served a stored value that breaks the rule"
        assert invalid_after == invalid_before
        if status == 200:
            assert body == raw[HEADER.size :]
    else:
        assert not valid, "a valid stored value was not used"
        assert invalid_after == invalid_before + 1, "counted once"
        assert status == 200 and passes(body, invoice_id, strict=strict)
        stored = await inspect.get(value_key(invoice_id))
        assert stored is not None and stored[HEADER.size :] == body, "overwritten"


@LIVE
@given(raw=st.binary(max_size=256))
@example(raw=b"")
@example(raw=HEADER.pack(200, math.nan, math.nan) + b"{}")
async def test_arbitrary_bytes_under_the_invoice_key_never_give_a_bad_answer(
    fleet: Proxy, upstream: Upstream, inspect: redis.asyncio.Redis, raw: bytes
) -> None:
    await check_value(fleet, upstream, inspect, fresh_id(), raw, strict=False)


@LIVE
@given(data=st.data())
async def test_forged_answers_under_the_invoice_key_pass_the_upstream_rule(
    fleet: Proxy, upstream: Upstream, inspect: redis.asyncio.Redis, data: st.DataObject
) -> None:
    invoice_id = fresh_id()
    raw = data.draw(stored_values(invoice_id))
    await check_value(fleet, upstream, inspect, invoice_id, raw, strict=False)


@LIVE
@given(data=st.data())
async def test_forged_answers_in_strict_mode_pass_the_strict_rule(
    strict_fleet: Proxy, upstream: Upstream, inspect: redis.asyncio.Redis, data: st.DataObject
) -> None:
    invoice_id = fresh_id()
    raw = data.draw(stored_values(invoice_id))
    await check_value(strict_fleet, upstream, inspect, invoice_id, raw, strict=True)


async def test_a_value_of_another_type_is_a_counted_miss_and_replaced(
    fleet: Proxy, upstream: Upstream, inspect: redis.asyncio.Redis
) -> None:
    await inspect.hset(value_key("inv_1"), "field", "value")
    status, body = await asked(fleet, "inv_1")
    assert status == 200 and passes(body, "inv_1", strict=False)
    assert upstream.standin.requests_for("inv_1") == 1
    assert metric(fleet, "invoice_proxy_shared_cache_lookups_total", result="invalid") == 1
    assert await inspect.type(value_key("inv_1")) == b"string"


async def test_an_invalid_value_is_logged_without_its_content(
    fleet: Proxy, inspect: redis.asyncio.Redis
) -> None:
    from structlog.testing import capture_logs

    secret = b"SECRET-IN-REDIS-0123456789"
    await inspect.set(value_key("inv_1"), HEADER.pack(200, math.inf, math.inf) + secret)
    with capture_logs() as logs:
        assert (await asked(fleet, "inv_1"))[0] == 200
    invalid = [line for line in logs if line["event"] == "shared_value_invalid"]
    assert len(invalid) == 1 and invalid[0]["reason"] == "body"
    assert "SECRET" not in repr(logs)


async def test_a_forged_final_open_invoice_is_kept_no_longer_than_an_open_one(
    fleet: Proxy, inspect: redis.asyncio.Redis
) -> None:
    """A valid open invoice stored as final is served, with this replica's open lifetime."""
    body = json.dumps(make_invoice("open-1")).encode()
    await inspect.set(value_key("open-1"), HEADER.pack(200, math.inf, math.inf) + body)
    response = await fleet.api.get(invoice_path("acme", "open-1"), headers=BILLING)
    assert await response.read() == body
    assert response.headers["Cache-Control"] in ("private, max-age=300", "private, max-age=299")


# --- the lock key ------------------------------------------------------------------


@settings(LIVE, max_examples=25)
@given(raw=st.binary(max_size=64), ttl=st.booleans(), kind=st.sampled_from(["string", "hash"]))
async def test_anything_under_the_lock_key_delays_a_miss_at_most_the_lock_lifetime(
    short_lock_fleet: Proxy,
    upstream: Upstream,
    inspect: redis.asyncio.Redis,
    raw: bytes,
    ttl: bool,
    kind: str,
) -> None:
    invoice_id = fresh_id()
    if kind == "hash":
        await inspect.hset(lock_key(invoice_id), "f", raw)
    else:
        await inspect.set(lock_key(invoice_id), raw, px=1000 if ttl else None)
    start = time.monotonic()
    status, body = await asked(short_lock_fleet, invoice_id)
    assert status == 200 and passes(body, invoice_id, strict=False)
    # A forged lock with a lifetime looks like a holder: waited for while it lasts.
    longest = 1.0 if ttl and kind == "string" else LOCK_TTL_S
    assert time.monotonic() - start < longest + 1.0
    assert upstream.standin.requests_for(invoice_id) == 1
    assert await inspect.pttl(lock_key(invoice_id)) != -1, "no key left without an expiry"


# --- the budget key ----------------------------------------------------------------


@settings(LIVE, max_examples=40)
@given(raw=st.binary(max_size=40) | st.sampled_from([b"nan", b"inf", b"-inf", b"1e400"]))
@example(raw=b"9" * 30)
@example(raw=b"-5")
async def test_anything_under_the_budget_key_is_no_refusal_beyond_its_bound(
    fleet: Proxy, upstream: Upstream, inspect: redis.asyncio.Redis, raw: bytes
) -> None:
    await inspect.set(BUDGET_KEY, raw)  # no expiry
    invoice_id = fresh_id()
    response = await fleet.api.get(invoice_path("acme", invoice_id), headers=BILLING)
    await response.read()
    # Not a time within the bound (bytes this random never are): no budget state.
    assert response.status == 200
    assert await inspect.pttl(BUDGET_KEY) > 0, "the budget key carries an expiry"


async def test_a_budget_key_of_another_type_is_reset(
    fleet: Proxy, inspect: redis.asyncio.Redis
) -> None:
    await inspect.rpush(BUDGET_KEY, "x")
    assert (await asked(fleet, "inv_1"))[0] == 200
    assert await inspect.type(BUDGET_KEY) == b"string"
    assert await inspect.pttl(BUDGET_KEY) > 0


async def redis_now_us(inspect: redis.asyncio.Redis) -> int:
    seconds, micros = await inspect.time()
    return int(seconds) * 1_000_000 + int(micros)


async def test_a_forged_budget_far_ahead_refuses_nothing(
    make_proxy: ProxyFactory, redis_server: RedisServer, inspect: redis.asyncio.Redis
) -> None:
    budget = {"fleet_rate_per_minute": 600, "fleet_burst": 1, "fleet_max_wait_s": 0.1}
    proxy = await make_proxy(**shared_sections(redis_server, **budget))
    await inspect.set(BUDGET_KEY, str(await redis_now_us(inspect) + 86_400 * 1_000_000))
    assert (await asked(proxy, "inv_1"))[0] == 200
    assert 0 < await inspect.pttl(BUDGET_KEY) <= 2000


async def test_a_forged_budget_within_its_bound_refuses_only_until_it_expires(
    make_proxy: ProxyFactory, redis_server: RedisServer, inspect: redis.asyncio.Redis
) -> None:
    """Interval 0.1 s, burst 1, wait 0.1 s: no booking reaches past 1.6 s, so 1.2 s is sane."""
    budget = {"fleet_rate_per_minute": 600, "fleet_burst": 1, "fleet_max_wait_s": 0.1}
    proxy = await make_proxy(**shared_sections(redis_server, **budget))
    await inspect.set(BUDGET_KEY, str(await redis_now_us(inspect) + 1_200_000))  # no expiry
    start = time.monotonic()
    refused = await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)
    assert refused.status == 429 and (await refused.json())["code"] == "rate_limited"
    assert 0 < await inspect.pttl(BUDGET_KEY) <= 2300, "given an expiry"
    while (await proxy.api.get(invoice_path("acme", "inv_1"), headers=BILLING)).status == 429:
        assert time.monotonic() - start < 2.5
        await asyncio.sleep(0.1)
    assert time.monotonic() - start > 0.9
