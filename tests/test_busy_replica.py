"""A busy replica is not a Redis outage: with the default `[shared] timeout_s` (50 ms),
an event loop that lags by more than that still coalesces the fleet's misses, while a
Redis that does not answer still costs a miss a short, bounded delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.config import SharedConfig, UpstreamConfig
from proxy.redis_connection import LAG_SLACK_S
from proxy.standin import Behaviour

from .helpers import ProxyFactory, Upstream, get, metric
from .redis_server import RedisServer

DEFAULT_TIMEOUT_S = SharedConfig().timeout_s
BUSY_S = 0.08  # the loop is held this long at a time: more than the default timeout


@asynccontextmanager
async def busy_loop() -> AsyncIterator[None]:
    """Hold the event loop BUSY_S at a time, then let it run 10 ms (as a loaded machine,
    load average 4 on 2 cores, does to a replica: its turns come late and in bursts).
    A plain 50 ms timeout takes dozens of such lags for Redis failures."""

    async def hog() -> None:
        while True:
            time.sleep(BUSY_S)  # noqa: ASYNC251 (blocks the loop on purpose)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(hog())
    try:
        yield
    finally:
        task.cancel()


def defaults(server: RedisServer) -> dict[str, dict[str, object]]:
    """[shared] with its defaults, and the upstream's timeouts (not the helpers' short
    ones: a fetch waits for its budget as long as in production, and a starved loop
    on a slow machine takes seconds to run 300 requests); only the fleet budget out of
    the way."""
    upstream = UpstreamConfig()
    return {
        "shared": {"redis_url": server.url},
        "upstream": {
            "timeout_s": upstream.timeout_s,
            "deadline_s": upstream.deadline_s,
            "fleet_rate_per_minute": 600_000,
            "fleet_burst": 1000,
        },
    }


async def test_a_busy_fleet_with_default_timeouts_makes_one_request_per_invoice(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    assert DEFAULT_TIMEOUT_S < BUSY_S
    proxies = [await make_proxy(**defaults(redis_server)) for _ in range(3)]
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.05))
    ids = [f"inv_busy_{i:02d}" for i in range(30)]
    async with busy_loop():
        responses = await asyncio.gather(
            *(get(proxies[(i // 30) % 3], ids[i % 30]) for i in range(300))
        )
    refused = {(r.status, (await r.read())[:160]) for r in responses if r.status != 200}
    assert refused == set()
    unavailable = sum(
        metric(p, "invoice_proxy_shared_cache_lookups_total", result="unavailable") for p in proxies
    )
    assert unavailable == 0, "no lag taken for a Redis failure"
    assert upstream.standin.stats.requests == 30


async def test_a_hung_redis_on_a_busy_loop_costs_a_miss_a_bounded_delay(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(**defaults(redis_server))
    await get(proxy, "inv_0")
    redis_server.pause()
    # One command: the timeout, the slack a busy loop gets, and the hog's hold of the loop.
    command_s = DEFAULT_TIMEOUT_S + LAG_SLACK_S + 2 * BUSY_S
    took = []
    try:
        async with busy_loop():
            for n in range(1, 8):
                start = time.monotonic()
                assert (await get(proxy, f"inv_{n}")).status == 200
                took.append(time.monotonic() - start)
    finally:
        redis_server.resume()
    # Three failed commands in a row are an outage; after it, one probe a retry_interval_s.
    assert took[0] < 3 * command_s, took
    assert all(t < command_s for t in took[1:]), took
    assert metric(proxy, "invoice_proxy_shared_store_up") == 0, "still seen as an outage"
