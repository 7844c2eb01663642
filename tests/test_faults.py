"""Faults injected through the stand-in: each caller request ends with the documented
status within the deadline, PlanetScale sees no more requests than the retry and rate
limits allow, and nothing (task, upstream connection) is left behind."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.app import UPSTREAM
from proxy.standin import Behaviour, make_invoice

from .helpers import (
    REPORTING,
    UPSTREAM_HEADER,
    Proxy,
    ProxyFactory,
    Upstream,
    assert_error,
    metric,
    metric_by,
    timed_get,
)

# Time a test allows beyond the configured deadline (scheduling, the proxy's own work).
MARGIN_S = 0.3
TEN_MIB = 10 * 1024 * 1024


def upstream_counts(proxy: Proxy) -> dict[str, float]:
    """`invoice_proxy_upstream_requests_total` by code."""
    return metric_by(proxy, "invoice_proxy_upstream_requests_total", "code")


def _lingering(before: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since `before` and still running, except idle keep-alive connections."""
    names = []
    for task in asyncio.all_tasks():
        if task in before or task is asyncio.current_task() or task.done():
            continue
        name = getattr(task.get_coro(), "__qualname__", task.get_name())
        # A connection waiting for its next request; the credential refresher's pause
        # (wait_for wraps Event.wait in a task on Python 3.11).
        if name not in ("RequestHandler.start", "Event.wait"):
            names.append(f"{name} ({task.get_name()})")
    return names


class Watch:
    """Snapshot at the start of a test; `settled` checks what the request left behind."""

    def __init__(self, proxy: Proxy, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.before = set(asyncio.all_tasks())

    def connections_in_use(self) -> int:
        # aiohttp has no public count; the connector's acquired set is what we need.
        session = self.proxy.app[UPSTREAM]._session
        assert session is not None
        return len(session.connector._acquired)

    async def settled(self) -> None:
        # The proxy's own work ends with the answer: no fetch task runs on after it.
        fetches = [
            t for t in asyncio.all_tasks() if t.get_name() == "invoice-fetch" and not t.done()
        ]
        assert fetches == [], "a fetch outlived the caller's answer"
        assert self.connections_in_use() == 0
        # The stand-in's handlers (slow, hung) finish on their own time; then nothing stays.
        self.upstream.standin.release()
        left: list[str] = []
        for _ in range(60):
            left = _lingering(self.before)
            if not left:
                break
            await asyncio.sleep(0.05)
        assert left == []
        sent = sum(upstream_counts(self.proxy).values())
        assert sent == self.upstream.standin.stats.requests, "metrics agree with PlanetScale"


@pytest.fixture
async def make_watched(make_proxy: ProxyFactory, upstream: Upstream) -> AsyncIterator[ProxyFactory]:
    """make_proxy, and at the end of the test: what each proxy left behind is checked."""
    watches: list[Watch] = []

    async def make(**sections: Any) -> Proxy:
        proxy = await make_proxy(**sections)
        watches.append(Watch(proxy, upstream))
        return proxy

    yield make
    for watch in watches:
        await watch.settled()


async def test_slow_answers_past_the_deadline_are_504_within_it(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"timeout_s": 0.3, "deadline_s": 0.8, "retries": 2})
    upstream.standin.behave("*", Behaviour("slow", delay_s=1.0))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 504, "upstream_timeout")
    assert timed.elapsed < 0.8 + MARGIN_S
    assert 2 <= upstream.standin.stats.requests <= 3  # retries + 1, as the deadline allows


async def test_hanging_connection_is_504_at_the_deadline_not_the_attempt_timeout(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"timeout_s": 2.0, "deadline_s": 0.5, "retries": 2})
    upstream.standin.behave("*", Behaviour("hang"))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 504, "upstream_timeout")
    assert 0.45 < timed.elapsed < 0.5 + MARGIN_S
    assert upstream.standin.stats.requests == 1


async def test_hanging_connection_is_retried_then_504(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"timeout_s": 0.2, "deadline_s": 1.0, "retries": 1})
    upstream.standin.behave("*", Behaviour("hang"))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 504, "upstream_timeout")
    assert timed.elapsed < 1.0 + MARGIN_S
    assert upstream.standin.stats.requests == 2


async def test_reset_mid_body_is_502_upstream_error_after_retries(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 2})
    upstream.standin.behave("*", Behaviour("truncated"))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 502, "upstream_error")
    assert timed.elapsed < 1.0
    assert upstream.standin.stats.requests == 3


async def test_reset_is_502_and_planetscale_sees_exactly_retries_plus_one(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    """aiohttp's own silent resend on a dropped connection is off: only our retries count."""
    proxy = await make_watched(upstream={"retries": 2})
    upstream.standin.behave("*", Behaviour("reset"))
    for n in range(1, 4):
        timed = await timed_get(proxy, f"inv_{n}", headers=REPORTING)
        await assert_error(timed.response, 502, "upstream_error")
        assert timed.elapsed < 1.0
        assert upstream.standin.stats.requests == 3 * n


async def test_reset_with_no_retries_is_one_request(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 0})
    upstream.standin.behave("*", Behaviour("reset"))
    await assert_error(
        (await timed_get(proxy, "inv_1", headers=REPORTING)).response, 502, "upstream_error"
    )
    assert upstream.standin.stats.requests == 1


async def test_wrong_content_type_is_502_invalid_and_not_retried_or_cached(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched()
    body = Behaviour("body", body=str(make_invoice("inv_1")).replace("'", '"'))
    body.content_type = "text/html"
    upstream.standin.behave("inv_1", body)
    for n in (1, 2):
        timed = await timed_get(proxy, "inv_1", headers=REPORTING)
        await assert_error(timed.response, 502, "upstream_invalid_response")
        assert upstream.standin.stats.requests == n


async def test_ten_mib_body_with_length_is_refused_before_reading(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched()
    upstream.standin.behave("*", Behaviour("huge", size=TEN_MIB))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 502, "upstream_invalid_response")
    assert timed.elapsed < 1.0
    assert upstream.standin.stats.requests == 1


async def test_ten_mib_chunked_body_is_cut_at_max_body_bytes_not_buffered(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"max_body_bytes": 65536})
    upstream.standin.behave("*", Behaviour("stream", size=TEN_MIB))
    tracemalloc.start()
    try:
        timed = await timed_get(proxy, "inv_1", headers=REPORTING)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await assert_error(timed.response, 502, "upstream_invalid_response")
    assert timed.elapsed < 1.0
    assert upstream.standin.stats.requests == 1
    assert peak < 2 * 1024 * 1024, f"{peak} bytes held at the peak"
    await asyncio.sleep(0.1)  # the stand-in notices the closed connection
    assert upstream.standin.stats.body_bytes_sent < TEN_MIB


async def test_429_retries_wait_the_full_retry_after_then_answer_429(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 1, "backoff_max_s": 1.0, "deadline_s": 3.0})
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="1"))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 429, "rate_limited")
    assert timed.response.headers["Retry-After"] == "1"
    assert upstream.standin.stats.requests == 2
    assert 1.0 <= timed.elapsed < 1.0 + MARGIN_S


async def test_429_storm_with_long_retry_after_is_passed_on_without_retrying(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    """Retry-After beyond backoff_max_s: PlanetScale hears from each request once."""
    proxy = await make_watched(upstream={"retries": 2, "backoff_max_s": 0.5})
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="30"))
    start = time.monotonic()
    timed = await asyncio.gather(
        *(timed_get(proxy, f"inv_{i}", headers=REPORTING) for i in range(20))
    )
    assert time.monotonic() - start < 1.0
    for t in timed:
        await assert_error(t.response, 429, "rate_limited")
        assert t.response.headers["Retry-After"] == "30"
    assert upstream.standin.stats.requests == 20


async def test_429_with_retry_after_past_the_deadline_is_not_retried(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 2, "backoff_max_s": 2.0, "deadline_s": 0.5})
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="1"))
    timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 429, "rate_limited")
    assert timed.elapsed < 0.5
    assert upstream.standin.stats.requests == 1


async def test_flapping_500s_recover_within_the_retries(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 2, "circuit_failures": 2})
    for i in range(5):
        upstream.standin.behave(f"inv_{i}", Behaviour("status", status=500, times=2))
    for i in range(5):
        timed = await timed_get(proxy, f"inv_{i}", headers=REPORTING)
        assert timed.response.status == 200
        assert upstream.standin.requests_for(f"inv_{i}") == 3
    assert metric(proxy, "invoice_proxy_upstream_circuit_state") == 0
    assert upstream_counts(proxy) == {"200": 5.0, "500": 10.0}


async def test_flapping_beyond_the_retries_is_502_then_recovers(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"retries": 1})
    upstream.standin.behave("*", Behaviour("status", status=500, times=3))
    await assert_error(
        (await timed_get(proxy, "inv_1", headers=REPORTING)).response, 502, "upstream_error"
    )
    assert (await timed_get(proxy, "inv_1", headers=REPORTING)).response.status == 200
    assert upstream.standin.stats.requests == 4


async def test_closed_upstream_port_is_502_fast(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    # Bound but not listening, and held for the whole test: connections are refused, and
    # no server started meanwhile (the proxy's own test listeners) can take the port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        proxy = await make_proxy(
            upstream={"base_url": f"http://127.0.0.1:{closed}/v1", "retries": 2}
        )
        watch = Watch(proxy, upstream)
        timed = await timed_get(proxy, "inv_1", headers=REPORTING)
    await assert_error(timed.response, 502, "upstream_error")
    assert timed.elapsed < 0.5
    assert upstream_counts(proxy) == {"error": 3.0}
    assert watch.connections_in_use() == 0
    assert upstream.standin.stats.requests == 0


async def test_rate_cap_lets_a_burst_through_then_429_with_retry_after(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"rate_per_s": 5.0, "burst": 5, "max_queue_wait_s": 0.2})
    start = time.monotonic()
    timed = await asyncio.gather(
        *(timed_get(proxy, f"inv_{i}", headers=REPORTING) for i in range(30))
    )
    elapsed = time.monotonic() - start
    ok = [t for t in timed if t.response.status == 200]
    limited = [t for t in timed if t.response.status != 200]
    for t in limited:
        await assert_error(t.response, 429, "rate_limited")
        assert int(t.response.headers["Retry-After"]) >= 1
    assert 5 <= len(ok) <= 5 + 5 * elapsed
    assert upstream.standin.stats.requests == len(ok)
    assert metric(proxy, "invoice_proxy_upstream_throttled_total") == len(limited)


async def test_rate_cap_spaces_out_retries_too(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    """Retries take rate tokens: PlanetScale never sees more than burst + rate * elapsed."""
    proxy = await make_watched(
        upstream={"rate_per_s": 10.0, "burst": 2, "max_queue_wait_s": 1.0, "retries": 2}
    )
    upstream.standin.behave("*", Behaviour("status", status=503))
    start = time.monotonic()
    await asyncio.gather(*(timed_get(proxy, f"inv_{i}", headers=REPORTING) for i in range(3)))
    elapsed = time.monotonic() - start
    assert upstream.standin.stats.requests <= 2 + 10 * elapsed


async def test_concurrency_cap_holds_planetscale_to_max_concurrency(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(upstream={"max_concurrency": 2})
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.1))
    timed = await asyncio.gather(
        *(timed_get(proxy, f"inv_{i}", headers=REPORTING) for i in range(8))
    )
    assert [t.response.status for t in timed] == [200] * 8
    assert upstream.standin.stats.max_in_flight == 2


async def test_waiting_for_a_concurrency_slot_spends_the_deadline(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    """The second request waits for the only slot; its attempt is cut to what is left."""
    proxy = await make_watched(upstream={"max_concurrency": 1, "timeout_s": 0.4, "deadline_s": 0.6})
    upstream.standin.behave("*", Behaviour("hang"))
    timed = await asyncio.gather(
        timed_get(proxy, "inv_a", headers=REPORTING), timed_get(proxy, "inv_b", headers=REPORTING)
    )
    for t in timed:
        await assert_error(t.response, 504, "upstream_timeout")
        assert t.elapsed < 0.6 + MARGIN_S


async def test_full_concurrency_queue_answers_429_after_max_queue_wait(
    make_watched: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_watched(
        upstream={"max_concurrency": 1, "max_queue_wait_s": 0.1, "timeout_s": 1.0, "retries": 0}
    )
    upstream.standin.behave("inv_a", Behaviour("slow", delay_s=0.5))
    first = asyncio.create_task(timed_get(proxy, "inv_a", headers=REPORTING))
    await asyncio.sleep(0.05)
    second = await timed_get(proxy, "inv_b", headers=REPORTING)
    await assert_error(second.response, 429, "rate_limited")
    assert second.response.headers["Retry-After"] == "1"
    assert second.elapsed < 0.1 + MARGIN_S
    assert (await first).response.status == 200
    assert upstream.standin.requests_for("inv_b") == 0


async def test_standin_reports_its_counters_over_http(
    aiohttp_client: Any, upstream: Upstream
) -> None:
    """The control call a stand-in in another process is read with (make soak, the demo)."""
    client = await aiohttp_client(upstream.standin.app())
    path = "/v1/organizations/acme/invoices/inv_1"
    await client.get(path, headers={"Authorization": UPSTREAM_HEADER})
    await client.get(path)
    stats = await (await client.get("/_control/stats")).json()
    assert stats["requests"] == 2
    assert stats["unauthorized"] == 1
    assert stats["by_invoice"] == {"inv_1": 1}
    assert stats["methods"] == {"GET": 2}
