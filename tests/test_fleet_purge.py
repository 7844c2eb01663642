"""Fleet-wide purge: a DELETE on one replica's admin listener drops the invoice from Redis
and from the local cache of every process of the fleet, and a process that was away
from Redis catches up (or, when it cannot know what it missed, drops its whole cache)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio
from prometheus_client import CollectorRegistry

from proxy.metrics import SharedMetrics
from proxy.purges import PurgeListener, announce
from proxy.redis_connection import make_client

from .helpers import ADMIN, BILLING, ProxyFactory, Upstream, get, invoice_path, metric, scraped
from .redis_server import RedisServer
from .test_shared import fleet_sections, serve_process, shared_config

PURGE = "/cache/organizations/acme/invoices/{}"


async def worker_entries(session: aiohttp.ClientSession, admin_url: str, workers: int) -> list[int]:
    """`invoice_proxy_cache_entries` of each worker (worker i: admin_port + i)."""
    host, port = admin_url.rsplit(":", 1)
    entries = []
    for i in range(workers):
        async with session.get(f"{host}:{int(port) + i}/metrics") as response:
            page = await response.text()
        entries.append(int(metric(scraped(page), "invoice_proxy_cache_entries")))
    return entries


async def test_a_purge_through_one_replica_is_a_miss_on_every_replica_and_worker(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    credential_file: Path,
    tmp_path: Path,
) -> None:
    sections = fleet_sections(redis_server)
    one, two = [await make_proxy(**sections) for _ in range(2)]
    async with (
        serve_process(
            upstream, credential_file, tmp_path, server={"workers": 2}, **sections
        ) as three,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        await three.read_until("started")
        await three.read_until("started")
        assert three.process.stdout is not None
        drain = asyncio.create_task(three.process.stdout.read())  # the pipe never fills
        url = three.url + invoice_path("acme", "inv_1")
        # Cached on both workers of the third replica (a new connection each time: the
        # kernel spreads them), and on the other two.
        for _ in range(200):
            async with session.get(url, headers=BILLING) as response:
                assert response.status == 200
            if await worker_entries(session, three.admin_url, 2) == [1, 1]:
                break
        assert await worker_entries(session, three.admin_url, 2) == [1, 1]
        for proxy in (one, two):
            await get(proxy, "inv_1")
            assert (await get(proxy, "inv_1")).headers["X-Cache"] == "HIT"
        assert upstream.standin.requests_for("inv_1") == 1

        purged_at = time.monotonic()
        assert (await one.admin.delete(PURGE.format("inv_1"), headers=ADMIN)).status == 204
        while await worker_entries(session, three.admin_url, 2) != [0, 0]:
            assert time.monotonic() - purged_at < 1.0, "every worker dropped it within 1 s"
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - purged_at
        assert (await get(two, "inv_1")).headers["X-Cache"] == "MISS"
        assert (await get(one, "inv_1")).headers["X-Cache"] == "MISS"
        async with session.get(url, headers=BILLING) as response:
            assert response.headers["X-Cache"] == "MISS"
        print(f"\npurge: every worker of three replicas dropped the invoice in {elapsed:.3f} s")
        assert upstream.standin.requests_for("inv_1") == 2, "fetched once again, for the fleet"
        drain.cancel()


async def test_the_answer_says_whether_the_fleet_had_it(
    make_proxy: ProxyFactory, upstream: Upstream, redis_server: RedisServer
) -> None:
    one = await make_proxy(**fleet_sections(redis_server))
    two = await make_proxy(**fleet_sections(redis_server))
    await get(two, "inv_1")  # cached on the second replica and in Redis, not on the first
    response = await one.admin.delete(PURGE.format("inv_1"), headers=ADMIN)
    assert response.status == 204, "the fleet had it (in Redis), though this replica did not"
    response = await one.admin.delete(PURGE.format("inv_1"), headers=ADMIN)
    assert response.status == 404
    assert (await response.json())["code"] == "not_found"
    assert (await get(two, "inv_1")).headers["X-Cache"] == "MISS"


def listener(server: RedisServer, dropped: list[Any]) -> PurgeListener:
    config, _ = shared_config(server, retry_interval_s=0.01)
    return PurgeListener(
        make_client(config, socket_timeout=2.0),
        config,
        SharedMetrics(CollectorRegistry()),
        drop=dropped.append,
        drop_all=lambda: dropped.append("ALL"),
    )


async def test_a_process_away_from_redis_reads_the_purges_it_missed(
    redis_server: RedisServer, inspect: redis.asyncio.Redis
) -> None:
    dropped: list[Any] = []
    reader = listener(redis_server, dropped)
    key = "invoice-proxy:v1:purges"
    try:
        await announce(inspect, key, "acme", "before")  # before the process started
        reading = asyncio.create_task(reader.step())  # connects, then waits for purges
        await asyncio.sleep(0.2)
        await announce(inspect, key, "acme", "inv_1")
        await asyncio.wait_for(reading, 2.0)
        assert dropped == [("acme", "inv_1")], "read at once; what came before is not its own"

        # Away (not reading) while three purges happen: all three are read on return.
        for n in range(3):
            await announce(inspect, key, "acme", f"away_{n}")
        await asyncio.wait_for(reader.step(), 2.0)
        assert dropped[1:] == [("acme", f"away_{n}") for n in range(3)]

        # Cut off (its connection dropped, and refused a new one) while more purges
        # happen than the stream keeps: it cannot know what it missed, so its whole
        # local cache goes.
        await inspect.config_set("requirepass", "now-required")
        await inspect.client_kill_filter(_type="normal", skipme=True)
        await asyncio.wait_for(reader.step(), 2.0)  # fails: now away
        await inspect.xadd(key, {"o": "acme", "i": "lost_1"})
        await inspect.xadd(key, {"o": "acme", "i": "kept"})
        await inspect.xtrim(key, maxlen=1, approximate=False)
        await inspect.config_set("requirepass", "")
        await asyncio.wait_for(reader.step(), 2.0)
        assert dropped[4:] == ["ALL", ("acme", "kept")]

        # Cut off again while fewer purges happen than the stream keeps: read, one by one.
        await inspect.config_set("requirepass", "now-required")
        await inspect.client_kill_filter(_type="normal", skipme=True)
        await asyncio.wait_for(reader.step(), 2.0)
        await announce(inspect, key, "acme", "while_away")
        await inspect.config_set("requirepass", "")
        await asyncio.wait_for(reader.step(), 2.0)
        assert dropped[6:] == [("acme", "while_away")]
    finally:
        await reader.client.aclose()


async def test_a_redis_that_lost_its_data_drops_the_local_cache(
    redis_server: RedisServer, inspect: redis.asyncio.Redis
) -> None:
    dropped: list[Any] = []
    reader = listener(redis_server, dropped)
    key = "invoice-proxy:v1:purges"
    try:
        reading = asyncio.create_task(reader.step())
        await asyncio.sleep(0.2)
        await announce(inspect, key, "acme", "inv_1")
        await asyncio.wait_for(reading, 2.0)
        # Restarted empty (no persistence): the purges made meanwhile are lost with it.
        redis_server.stop()
        await asyncio.wait_for(reader.step(), 2.0)
        redis_server.start()
        reading = asyncio.create_task(reader.step())
        await asyncio.sleep(0.2)
        async with redis.asyncio.Redis.from_url(redis_server.url) as again:
            await announce(again, key, "acme", "inv_2")
        await asyncio.wait_for(reading, 2.0)
        assert dropped == [("acme", "inv_1"), "ALL", ("acme", "inv_2")]
    finally:
        await reader.client.aclose()
