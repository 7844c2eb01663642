"""The invoice cache as callers and PlanetScale see it: hits, freshness, coalescing, purge."""

from __future__ import annotations

import asyncio
import gc
import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache import ENTRY_OVERHEAD, Fetcher, InvoiceCache
from proxy.config import CacheConfig
from proxy.errors import ProxyError, upstream_error
from proxy.metrics import Metrics
from proxy.standin import Behaviour, make_invoice
from proxy.upstream import Fetched

from .helpers import (
    ADMIN,
    BILLING,
    REPORTING,
    FakeClock,
    Proxy,
    ProxyFactory,
    Upstream,
    get,
    invoice_path,
    metric,
    wait_until,
)

YEAR = 365 * 86400.0


def serve_body(upstream: Upstream, invoice_id: str, **fields: object) -> None:
    body = {**make_invoice(invoice_id), **fields}
    upstream.standin.behave(invoice_id, Behaviour("body", body=json.dumps(body)))


async def test_second_request_is_a_hit_without_upstream(proxy: Proxy, upstream: Upstream) -> None:
    first = await get(proxy, "inv_1")
    second = await get(proxy, "inv_1")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert await first.read() == await second.read()
    assert first.headers["ETag"] == second.headers["ETag"]
    assert upstream.standin.requests_for("inv_1") == 1
    assert metric(proxy, "invoice_proxy_cache_lookups_total", result="hit") == 1


async def test_final_invoice_stays_for_years(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock)
    response = await get(proxy, "inv_1")
    assert response.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    clock.advance(5 * YEAR)
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "HIT"
    assert upstream.standin.requests_for("inv_1") == 1


async def test_open_period_lives_its_ttl_then_refetches(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock, cache={"open_period_ttl_s": 300})
    assert (await get(proxy, "open-1")).headers["Cache-Control"] == "private, max-age=300"
    clock.advance(100)
    hit = await get(proxy, "open-1")
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Cache-Control"] == "private, max-age=200"
    clock.advance(201)
    assert (await get(proxy, "open-1")).headers["X-Cache"] == "MISS"
    assert upstream.standin.requests_for("open-1") == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"billing_period_end": "next month"},
        {"billing_period_end": ""},
        {"paid": False, "overdue": False},
        {"paid": True, "overdue": True},
    ],
    ids=["unparsable-date", "empty-date", "unpaid", "overdue"],
)
async def test_unsettled_or_unparsable_invoice_is_treated_as_open(
    make_proxy: ProxyFactory, upstream: Upstream, fields: dict[str, object]
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock)
    serve_body(upstream, "inv_1", **fields)
    assert (await get(proxy, "inv_1")).status == 200
    clock.advance(301)
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "MISS"
    assert upstream.standin.requests_for("inv_1") == 2


async def test_paid_closed_invoice_is_final(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock)
    serve_body(upstream, "inv_1", paid=True, overdue=False, billing_period_end="2025-02-01")
    await get(proxy, "inv_1")
    clock.advance(YEAR)
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "HIT"


async def test_not_found_is_remembered_for_its_ttl(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock, cache={"not_found_ttl_s": 30})
    assert (await get(proxy, "missing-1")).status == 404
    second = await get(proxy, "missing-1")
    assert second.status == 404 and second.headers["X-Cache"] == "HIT"
    assert upstream.standin.requests_for("missing-1") == 1
    clock.advance(31)
    assert (await get(proxy, "missing-1")).headers["X-Cache"] == "MISS"
    assert upstream.standin.requests_for("missing-1") == 2


async def test_not_found_ttl_zero_turns_the_memory_off(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(cache={"not_found_ttl_s": 0})
    for _ in range(3):
        assert (await get(proxy, "missing-1")).status == 404
    assert upstream.standin.requests_for("missing-1") == 3


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour("status", status=500, times=1),
        Behaviour("status", status=429, times=1),
        Behaviour("malformed", times=1),
    ],
    ids=["5xx", "429", "invalid-body"],
)
async def test_failures_are_never_cached(
    make_proxy: ProxyFactory, upstream: Upstream, behaviour: Behaviour
) -> None:
    proxy = await make_proxy(upstream={"retries": 0})
    upstream.standin.behave("inv_1", behaviour)
    assert (await get(proxy, "inv_1")).status in (429, 502)
    response = await get(proxy, "inv_1")
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"


async def test_eviction_by_bytes_keeps_exactly_what_fits(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    def entry_size(i: int) -> int:
        body = json.dumps(make_invoice(f"inv_{i:03d}")).encode()
        return len(body) + len("acme") + len("inv_000") + ENTRY_OVERHEAD

    fits = 10
    largest = max(entry_size(i) for i in range(fits + 3))
    # Without the fast lane: an entry then holds no prepared answer (tests/test_lane.py).
    proxy = await make_proxy(cache={"max_bytes": largest * fits + 10}, server={"fast_lane": False})
    for i in range(fits + 3):
        await get(proxy, f"inv_{i:03d}")
    assert metric(proxy, "invoice_proxy_cache_entries") == fits
    kept = sum(entry_size(i) for i in range(3, fits + 3))
    assert metric(proxy, "invoice_proxy_cache_bytes") == kept
    assert metric(proxy, "invoice_proxy_cache_evictions_total") == 3
    # The three least recently used went; the newest are hits.
    assert (await get(proxy, f"inv_{fits + 2:03d}")).headers["X-Cache"] == "HIT"
    assert (await get(proxy, "inv_000")).headers["X-Cache"] == "MISS"


async def test_recently_read_entries_survive_eviction(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    entry_size = len(json.dumps(make_invoice("inv_000")).encode()) + 11 + ENTRY_OVERHEAD
    proxy = await make_proxy(cache={"max_bytes": entry_size * 3}, server={"fast_lane": False})
    for i in range(3):
        await get(proxy, f"inv_{i:03d}")
    await get(proxy, "inv_000")  # now the most recently used
    await get(proxy, "inv_003")  # evicts inv_001
    assert (await get(proxy, "inv_000")).headers["X-Cache"] == "HIT"
    assert (await get(proxy, "inv_001")).headers["X-Cache"] == "MISS"


# What a caller does to the cache: read (a miss stores the invoice), purge, in any order,
# with bodies of any size up to more than the whole cache.
CACHE_STEPS = st.lists(
    st.tuples(st.sampled_from(["read", "purge"]), st.integers(0, 6), st.integers(0, 500)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(steps=CACHE_STEPS)
def test_the_cache_keeps_the_most_recently_read_invoices_that_fit(
    steps: list[tuple[str, int, int]],
) -> None:
    """An LRU bounded by bytes, against a model: a read of a cached invoice is a hit and
    makes it the most recently used; a miss stores it, evicting the least recently used
    until it fits (each eviction counted), unless it is larger than the whole cache."""
    max_bytes = 3 * (ENTRY_OVERHEAD + 200)
    metrics = Metrics()
    cache = InvoiceCache(CacheConfig(max_bytes=max_bytes), metrics)
    model: dict[str, int] = {}  # invoice id -> size, the least recently used first
    evictions = 0

    async def fetch_of(body: bytes) -> Fetcher:
        async def fetch(organization: str, invoice_id: str) -> Fetched:
            return Fetched(200, body, None)

        return fetch

    async def run() -> None:
        nonlocal evictions
        for step, number, length in steps:
            invoice_id = f"inv_{number}"
            if step == "purge":
                assert cache.purge(("acme", invoice_id)) == (invoice_id in model)
                model.pop(invoice_id, None)
            elif invoice_id in model:
                assert cache.fresh(("acme", invoice_id)) is not None
                model[invoice_id] = model.pop(invoice_id)
            else:
                assert cache.fresh(("acme", invoice_id)) is None
                body = b"x" * length
                entry, state = await cache.load("acme", invoice_id, await fetch_of(body))
                assert (entry.body, state) == (body, "miss")
                size = len(body) + len("acme") + len(invoice_id) + ENTRY_OVERHEAD
                if size <= max_bytes:
                    while sum(model.values()) + size > max_bytes:
                        del model[next(iter(model))]
                        evictions += 1
                    model[invoice_id] = size
            assert len(cache) == len(model)
            assert cache.bytes == sum(model.values()) <= max_bytes
            assert metrics.cache_evictions._value.get() == evictions
        for invoice_id in model:
            assert cache.peek(("acme", invoice_id)) is not None

    asyncio.run(run())


async def test_forbidden_caller_never_reads_the_cache(proxy: Proxy, upstream: Upstream) -> None:
    cached = await proxy.api.get(invoice_path("globex", "inv_1"), headers=REPORTING)
    assert cached.status == 200
    hits = metric(proxy, "invoice_proxy_cache_lookups_total", result="hit")
    response = await get(proxy, "inv_1", org="globex")
    assert response.status == 403
    assert "total" not in await response.text()
    assert metric(proxy, "invoice_proxy_cache_lookups_total", result="hit") == hits


async def test_200_concurrent_misses_make_one_upstream_request(
    proxy: Proxy, upstream: Upstream
) -> None:
    upstream.standin.behave("inv_hot", Behaviour("slow", delay_s=0.5))
    url = proxy.api.make_url(invoice_path("acme", "inv_hot"))
    # A session without a connection limit, so all 200 are in flight at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> tuple[int, bytes]:
            async with session.get(url, headers=BILLING) as response:
                return response.status, await response.read()

        results = await asyncio.gather(*(one() for _ in range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert len({body for _, body in results}) == 1
    assert upstream.standin.requests_for("inv_hot") == 1
    coalesced = metric(proxy, "invoice_proxy_cache_lookups_total", result="coalesced")
    hits = metric(proxy, "invoice_proxy_cache_lookups_total", result="hit")
    # Those that arrived while the fetch ran joined it; any later were hits.
    assert coalesced > 100 and coalesced + hits == 199


async def test_failing_leader_fails_its_waiters_and_the_next_request_tries_afresh(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"retries": 0})
    upstream.standin.behave("inv_1", Behaviour("status", status=500, delay_s=0.2, times=1))
    upstream.standin.behave("inv_1", Behaviour("slow", delay_s=0.2, times=None))
    upstream.standin.behave("inv_1", Behaviour("status", status=502, times=1))
    responses = await asyncio.gather(*(get(proxy, "inv_1") for _ in range(20)))
    assert {r.status for r in responses} == {502}
    assert upstream.standin.requests_for("inv_1") == 1
    again = await get(proxy, "inv_1")
    assert again.status == 200
    assert upstream.standin.requests_for("inv_1") == 2


async def test_a_cancelled_caller_does_not_cancel_the_fetch_for_others() -> None:
    release = asyncio.Event()
    calls = 0

    async def fetch(org: str, invoice_id: str) -> Fetched:
        nonlocal calls
        calls += 1
        await release.wait()
        return Fetched(200, b'{"id": "x"}', None)

    cache = InvoiceCache(CacheConfig(), Metrics())
    first = asyncio.create_task(cache.load("acme", "x", fetch))
    second = asyncio.create_task(cache.load("acme", "x", fetch))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    release.set()
    entry, state = await asyncio.wait_for(second, timeout=2)
    assert (entry.body, state) == (b'{"id": "x"}', "miss")
    assert first.cancelled() and calls == 1
    assert cache.fresh(("acme", "x")) is not None


async def test_a_failed_fetch_nobody_awaits_leaves_no_unretrieved_error() -> None:
    """asyncio reports a task whose exception nobody retrieved when the task is collected."""

    async def fetch(org: str, invoice_id: str) -> Fetched:
        await asyncio.sleep(0.01)
        raise upstream_error()

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        cache = InvoiceCache(CacheConfig(), Metrics())
        waiter = asyncio.create_task(cache.load("acme", "x", fetch))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0.05)  # the fetch fails with nobody waiting for it
        del waiter  # its cancellation's traceback holds the fetch task
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []
    with pytest.raises(ProxyError):
        await cache.load("acme", "x", fetch)


async def test_stale_if_error_serves_an_expired_open_invoice(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        clock=clock,
        upstream={"retries": 0},
        cache={"open_period_ttl_s": 300, "stale_if_error_s": 3600},
    )
    fresh = await get(proxy, "open-1")
    clock.advance(400)
    upstream.standin.behave("open-1", Behaviour("status", status=503))
    stale = await get(proxy, "open-1")
    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == await fresh.read()
    assert metric(proxy, "invoice_proxy_cache_lookups_total", result="stale") == 1
    clock.advance(3600)
    assert (await get(proxy, "open-1")).status == 502


async def test_stale_if_error_on_timeout(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        clock=clock, upstream={"retries": 0, "timeout_s": 0.2, "deadline_s": 0.3}
    )
    await get(proxy, "open-1")
    clock.advance(301)
    upstream.standin.behave("open-1", Behaviour("hang"))
    assert (await get(proxy, "open-1")).headers["X-Cache"] == "STALE"


async def test_if_none_match_is_answered_304_from_cache(proxy: Proxy, upstream: Upstream) -> None:
    etag = (await get(proxy, "inv_1")).headers["ETag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = await get(proxy, "inv_1", **{"If-None-Match": header})
        assert response.status == 304
        assert await response.read() == b""
        assert response.headers["ETag"] == etag
    assert (await get(proxy, "inv_1", **{"If-None-Match": '"other"'})).status == 200
    assert upstream.standin.requests_for("inv_1") == 1


async def test_etag_is_the_same_for_the_same_body_in_another_replica(
    make_proxy: ProxyFactory,
) -> None:
    one, two = await make_proxy(), await make_proxy()
    assert (await get(one, "inv_1")).headers["ETag"] == (await get(two, "inv_1")).headers["ETag"]


async def test_purge_drops_one_invoice_with_the_admin_key(proxy: Proxy, upstream: Upstream) -> None:
    await get(proxy, "inv_1")
    await get(proxy, "inv_2")
    path = "/cache/organizations/acme/invoices/inv_1"
    assert (await proxy.admin.delete(path)).status == 401
    assert (await proxy.admin.delete(path, headers=BILLING)).status == 401
    assert metric(proxy, "invoice_proxy_cache_entries") == 2
    response = await proxy.admin.delete(path, headers=ADMIN)
    assert response.status == 204
    assert metric(proxy, "invoice_proxy_cache_entries") == 1
    gone = await proxy.admin.delete(path, headers=ADMIN)
    assert gone.status == 404 and (await gone.json())["code"] == "not_found"
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "MISS"
    assert (await get(proxy, "inv_2")).headers["X-Cache"] == "HIT"


async def test_purge_without_configured_admin_keys_is_refused(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(admin={"key_sha256": []})
    response = await proxy.admin.delete("/cache/organizations/acme/invoices/x", headers=ADMIN)
    assert response.status == 401


async def test_an_invoice_larger_than_the_cache_is_served_not_kept(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(cache={"max_bytes": 100})
    assert (await get(proxy, "inv_1")).status == 200
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "MISS"
    assert metric(proxy, "invoice_proxy_cache_bytes") == 0


async def test_purge_during_a_fetch_does_not_let_the_purged_answer_back(
    proxy: Proxy, upstream: Upstream
) -> None:
    """The fetch under way answers its caller; the cache does not keep what was purged."""
    upstream.standin.behave("inv_1", Behaviour("slow", delay_s=0.3, times=1))
    first = asyncio.create_task(get(proxy, "inv_1"))
    await wait_until(lambda: upstream.standin.requests_for("inv_1") == 1, "the fetch")
    purge = await proxy.admin.delete("/cache/organizations/acme/invoices/inv_1", headers=ADMIN)
    assert purge.status == 404  # nothing was cached yet
    response = await first
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    assert metric(proxy, "invoice_proxy_cache_entries") == 0
    again = await get(proxy, "inv_1")
    assert again.headers["X-Cache"] == "MISS"
    assert upstream.standin.requests_for("inv_1") == 2


async def test_a_request_after_a_purge_does_not_join_the_purged_fetch(
    proxy: Proxy, upstream: Upstream
) -> None:
    upstream.standin.behave("inv_1", Behaviour("slow", delay_s=0.3, times=1))
    first = asyncio.create_task(get(proxy, "inv_1"))
    await wait_until(lambda: upstream.standin.requests_for("inv_1") == 1, "the fetch")
    await proxy.admin.delete("/cache/organizations/acme/invoices/inv_1", headers=ADMIN)
    second = await get(proxy, "inv_1")  # not slow: answered while the first still waits
    assert second.status == 200 and not first.done()
    assert upstream.standin.requests_for("inv_1") == 2
    assert (await first).status == 200
    assert (await get(proxy, "inv_1")).headers["X-Cache"] == "HIT"  # the second's answer
    assert upstream.standin.requests_for("inv_1") == 2
