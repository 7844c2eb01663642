"""The upstream circuit breaker: by itself with a clock the test advances, then in the proxy."""

from __future__ import annotations

import asyncio
import time

from proxy.resilience import CircuitBreaker, CircuitState
from proxy.standin import Behaviour

from .helpers import (
    REPORTING,
    FakeClock,
    ProxyFactory,
    Upstream,
    assert_error,
    invoice_path,
    metric,
)


def breaker(clock: FakeClock, changes: list[CircuitState] | None = None) -> CircuitBreaker:
    """Opens after 3 consecutive failures, for 10 s; `changes` records each new state."""
    return CircuitBreaker(3, 10.0, clock, on_change=None if changes is None else changes.append)


def fail(circuit: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert circuit.allow()
        circuit.record_failure()


def test_stays_closed_below_the_failure_threshold() -> None:
    circuit = breaker(FakeClock(1000.0))
    fail(circuit, 2)
    assert circuit.state == CircuitState.CLOSED
    assert circuit.allow()
    assert circuit.retry_after() == 0.0


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    circuit = breaker(FakeClock(1000.0))
    fail(circuit, 2)
    circuit.record_success()
    fail(circuit, 2)
    assert circuit.state == CircuitState.CLOSED


def test_opens_after_n_consecutive_failures_and_refuses_until_open_s() -> None:
    clock = FakeClock(1000.0)
    changes: list[CircuitState] = []
    circuit = breaker(clock, changes)
    fail(circuit, 3)
    assert circuit.state == CircuitState.OPEN
    assert changes == [CircuitState.OPEN]
    assert not circuit.allow()
    assert circuit.retry_after() == 10.0
    clock.advance(9.5)
    assert not circuit.allow()
    assert circuit.retry_after() == 0.5


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = FakeClock(1000.0)
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.advance(10.0)
    assert circuit.allow()
    assert circuit.state == CircuitState.HALF_OPEN
    assert not circuit.allow()
    assert not circuit.allow()


def test_a_successful_probe_closes_the_circuit() -> None:
    clock = FakeClock(1000.0)
    changes: list[CircuitState] = []
    circuit = breaker(clock, changes)
    fail(circuit, 3)
    clock.advance(10.0)
    assert circuit.allow()
    circuit.record_success()
    assert circuit.state == CircuitState.CLOSED
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    assert circuit.allow() and circuit.allow()
    fail(circuit, 2)
    assert circuit.state == CircuitState.CLOSED, "the count restarted from zero"


def test_a_failed_probe_opens_the_circuit_for_another_open_s() -> None:
    clock = FakeClock(1000.0)
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.advance(10.0)
    assert circuit.allow()
    circuit.record_failure()
    assert circuit.state == CircuitState.OPEN
    assert circuit.retry_after() == 10.0
    clock.advance(5.0)
    assert not circuit.allow()
    clock.advance(5.0)
    assert circuit.allow()


def test_a_probe_that_ends_without_a_verdict_frees_the_slot() -> None:
    """A probe answered 429 (or cancelled) neither closes nor reopens: the next may probe."""
    clock = FakeClock(1000.0)
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.advance(10.0)
    assert circuit.allow()
    circuit.release()
    assert circuit.state == CircuitState.HALF_OPEN
    assert circuit.allow()
    assert not circuit.allow()


async def test_open_circuit_answers_503_at_once_without_calling_planetscale(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"retries": 0, "circuit_failures": 3, "circuit_open_s": 0.3})
    upstream.standin.behave("*", Behaviour("status", status=500))
    for i in range(3):
        response = await proxy.api.get(invoice_path("acme", f"inv_{i}"), headers=REPORTING)
        await assert_error(response, 502, "upstream_error")
    assert upstream.standin.stats.requests == 3
    assert metric(proxy, "invoice_proxy_upstream_circuit_state") == 2

    start = time.monotonic()
    response = await proxy.api.get(invoice_path("acme", "inv_next"), headers=REPORTING)
    elapsed = time.monotonic() - start
    await assert_error(response, 503, "unavailable")
    assert response.headers["Retry-After"] == "1"  # 0.3 s, rounded up to whole seconds
    assert elapsed < 0.1, f"an open circuit costs milliseconds, took {elapsed:.3f} s"
    assert upstream.standin.stats.requests == 3


async def test_circuit_half_opens_probes_once_and_closes_on_success(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    clock = FakeClock(monotonic=True)
    proxy = await make_proxy(
        clock, upstream={"retries": 0, "circuit_failures": 2, "circuit_open_s": 0.3}
    )
    upstream.standin.behave("*", Behaviour("status", status=503))
    for i in range(2):
        await proxy.api.get(invoice_path("acme", f"inv_{i}"), headers=REPORTING)
    clock.advance(0.35)

    # PlanetScale is back, slowly: the probe is in flight while a second request arrives.
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.3))
    probe = asyncio.create_task(proxy.api.get(invoice_path("acme", "inv_probe"), headers=REPORTING))
    await asyncio.sleep(0.1)
    assert metric(proxy, "invoice_proxy_upstream_circuit_state") == 1
    second = await proxy.api.get(invoice_path("acme", "inv_second"), headers=REPORTING)
    await assert_error(second, 503, "unavailable")
    response = await probe
    assert response.status == 200
    assert upstream.standin.requests_for("inv_probe") == 1
    assert upstream.standin.requests_for("inv_second") == 0

    assert metric(proxy, "invoice_proxy_upstream_circuit_state") == 0
    response = await proxy.api.get(invoice_path("acme", "inv_second"), headers=REPORTING)
    assert response.status == 200


async def test_failed_probe_opens_the_circuit_again(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    clock = FakeClock(monotonic=True)
    proxy = await make_proxy(
        clock, upstream={"retries": 0, "circuit_failures": 2, "circuit_open_s": 0.3}
    )
    upstream.standin.behave("*", Behaviour("reset"))
    for i in range(2):
        await proxy.api.get(invoice_path("acme", f"inv_{i}"), headers=REPORTING)
    clock.advance(0.35)
    response = await proxy.api.get(invoice_path("acme", "inv_probe"), headers=REPORTING)
    await assert_error(response, 502, "upstream_error")
    assert upstream.standin.stats.requests == 3
    response = await proxy.api.get(invoice_path("acme", "inv_after"), headers=REPORTING)
    await assert_error(response, 503, "unavailable")
    assert upstream.standin.stats.requests == 3
    assert metric(proxy, "invoice_proxy_upstream_circuit_state") == 2


async def test_planetscale_429_and_404_do_not_open_the_circuit(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(upstream={"retries": 0, "circuit_failures": 2, "circuit_open_s": 5.0})
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="1"))
    for i in range(3):
        response = await proxy.api.get(invoice_path("acme", f"inv_{i}"), headers=REPORTING)
        await assert_error(response, 429, "rate_limited")
    upstream.standin.behave("*", None)
    for i in range(3):
        response = await proxy.api.get(invoice_path("acme", f"missing_{i}"), headers=REPORTING)
        await assert_error(response, 404, "not_found")
    response = await proxy.api.get(invoice_path("acme", "inv_ok"), headers=REPORTING)
    assert response.status == 200
