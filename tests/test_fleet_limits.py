"""One shared view of PlanetScale's limits: a 429 with Retry-After, or a circuit opened,
on one replica holds the whole fleet off through Redis; then one probe decides for all.
Requests are counted at the stand-in; three proxies share one real Redis."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp

from proxy.standin import Behaviour

from .helpers import Proxy, ProxyFactory, Upstream, get, metric
from .redis_server import RedisServer
from .test_shared import fleet_sections


def held(proxies: list[Proxy]) -> float:
    return sum(metric(p, "invoice_proxy_fleet_budget_total", result="held") for p in proxies)


async def hold_gone(redis_server: RedisServer) -> None:
    """Until Redis's hold has expired: it was written a moment after the 429 arrived."""
    for _ in range(100):
        if redis_server.command("KEYS", "*:hold:*").startswith(b"*0\r\n"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the hold never expired")


async def refused_as(response: aiohttp.ClientResponse, status: int, code: str) -> int:
    """The documented refusal, with a Retry-After; its value."""
    assert response.status == status, response.status
    assert (await response.json())["code"] == code
    return int(response.headers["Retry-After"])


async def test_a_429_on_one_replica_holds_all_three_off_then_one_probe_goes_first(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    proxies = [await make_proxy(**fleet_sections(redis_server)) for _ in range(3)]
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="2", times=1))
    # The hold starts after this (when PlanetScale's 429 arrives) and lasts 2 s.
    sent_at = time.monotonic()
    assert await refused_as(await get(proxies[0], "inv_first"), 429, "rate_limited") == 2
    assert upstream.standin.stats.requests == 1

    # For 2 seconds, uncached misses on every replica are refused at once, unasked.
    await asyncio.sleep(0.05)  # the hold reaches Redis (in the background of that miss)
    n, took = 0, []
    # Each request is sent well within the hold, so that a stall of the host (0.2-0.6 s
    # in CI runs) between the hold's start and a request's answer cannot carry it beyond.
    while time.monotonic() - sent_at < 1.2:
        proxy = proxies[n % 3]
        start = time.monotonic()
        response = await get(proxy, f"inv_held_{n}")
        took.append(time.monotonic() - start)
        assert 1 <= await refused_as(response, 429, "rate_limited") <= 2
        n += 1
        if n % 3 == 0:
            await asyncio.sleep(0.05)
    assert n >= 30
    # Answered at once, not waited out: the median is milliseconds, whatever one stall
    # of the host adds to a request (0.53 s once, in a run beside two busy loops).
    assert statistics.median(took) < 0.1 and max(took) < 1.0, took
    assert upstream.standin.stats.requests == 1, "PlanetScale saw nothing during the hold"
    assert all(metric(p, "invoice_proxy_fleet_budget_total", result="held") > 0 for p in proxies)

    # After the hold: of 30 misses at once on the three replicas, one probe goes first.
    await asyncio.sleep(max(0.0, sent_at + 2.05 - time.monotonic()))
    await hold_gone(redis_server)
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.3))
    responses = await asyncio.gather(*(get(proxies[i % 3], f"inv_after_{i}") for i in range(30)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [429] * 29, statuses
    assert upstream.standin.stats.requests == 2 and upstream.standin.stats.max_in_flight == 1
    probes = sum(metric(p, "invoice_proxy_fleet_budget_total", result="probe") for p in proxies)
    assert probes == 1
    for response in responses:
        if response.status == 429:
            assert int(response.headers["Retry-After"]) == 1, "retry once the probe is back"

    # The probe was answered: everyone goes on.
    await asyncio.sleep(1.05)
    responses = await asyncio.gather(*(get(proxies[i % 3], f"inv_again_{i}") for i in range(30)))
    assert [r.status for r in responses] == [200] * 30
    assert upstream.standin.stats.requests == 32


async def test_a_circuit_opened_on_one_replica_holds_all_three_off(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    sections = fleet_sections(redis_server)
    sections["upstream"].update({"retries": 0, "circuit_failures": 3, "circuit_open_s": 1.5})
    proxies = [await make_proxy(**sections) for _ in range(3)]
    upstream.standin.behave("*", Behaviour("status", status=500))
    for n in range(3):
        assert (await get(proxies[0], f"inv_fail_{n}")).status == 502
    assert metric(proxies[0], "invoice_proxy_upstream_circuit_state") == 2
    opened_at = time.monotonic()
    await asyncio.sleep(0.05)
    upstream.standin.behave("*", Behaviour("ok"))
    for n, proxy in enumerate(proxies[1:] * 5):
        response = await get(proxy, f"inv_held_{n}")
        assert await refused_as(response, 503, "unavailable") in (1, 2)
    assert upstream.standin.stats.requests == 3, "the other replicas never asked"
    assert all(metric(p, "invoice_proxy_upstream_circuit_state") == 0 for p in proxies[1:])
    await asyncio.sleep(max(0.0, opened_at + 1.6 - time.monotonic()))
    assert (await get(proxies[1], "inv_probe")).status == 200, "the probe after the hold"
    await asyncio.sleep(1.05)  # the others learnt of the probe: they may retry within 1 s
    statuses = [(await get(p, f"inv_ok_{i}")).status for i, p in enumerate(proxies[1:])]
    assert statuses == [200, 200]


async def test_redis_down_each_replica_holds_off_on_its_own_view(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    one, two = [await make_proxy(**fleet_sections(redis_server)) for _ in range(2)]
    redis_server.stop()
    upstream.standin.behave("*", Behaviour("status", status=429, retry_after="2", times=1))
    assert await refused_as(await get(one, "inv_1"), 429, "rate_limited") == 2
    assert await refused_as(await get(one, "inv_2"), 429, "rate_limited") in (1, 2)
    assert upstream.standin.stats.requests == 1, "the replica that was told holds off"
    assert (await get(two, "inv_3")).status == 200, "the other never heard: it asks"
    assert upstream.standin.stats.requests == 2
    assert held([one]) == 1
