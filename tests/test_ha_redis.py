"""The fleet level on highly available Redis: Sentinel (a primary, a replica, three
sentinels) and Cluster (three primaries), real `redis-server` processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import SharedConfig, parse_section
from proxy.standin import Behaviour

from . import manifests
from .certificates import issue, make_ca
from .helpers import ADMIN, Proxy, ProxyFactory, Upstream, get, metric, wait_until
from .redis_server import ClusterSet, SentinelSet, TlsFiles

REDIS_PASSWORD = "redis-PASSWORD-0123456789abcdefghijklmnopqrstuv"
SENTINEL_PASSWORD = "sentinel-PASSWORD-0123456789abcdefghijklmnopq"


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    servers = SentinelSet(
        tmp_path / "ha", password=REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    )
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture
def cluster_set(tmp_path: Path) -> Iterator[ClusterSet]:
    servers = ClusterSet(tmp_path / "cluster")
    try:
        yield servers.start()
    finally:
        servers.stop()


def sections(shared: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """[shared] as the fleet tests of test_shared.py set it (a loop shared by three
    proxies and hundreds of clients), the fleet budget out of the way."""
    return {
        "shared": {"timeout_s": 0.5, "lock_ttl_s": 2.0, "retry_interval_s": 0.2, **shared},
        "upstream": {"fleet_rate_per_minute": 600_000, "fleet_burst": 1000},
    }


def sentinel_sections(servers: SentinelSet, tmp_path: Path) -> dict[str, dict[str, Any]]:
    (tmp_path / "redis-password").write_text(REDIS_PASSWORD + "\n")
    (tmp_path / "sentinel-password").write_text(SENTINEL_PASSWORD + "\n")
    return sections(
        {
            "redis_url": "redis://mymaster/0",
            "sentinels": servers.addresses,
            "sentinel_service": "mymaster",
            "password_file": str(tmp_path / "redis-password"),
            "sentinel_password_file": str(tmp_path / "sentinel-password"),
        }
    )


def shared_lookups(proxies: list[Proxy], result: str) -> float:
    return sum(
        metric(p, "invoice_proxy_shared_cache_lookups_total", result=result) for p in proxies
    )


async def burst_of_300(proxies: list[Proxy], ids: list[str]) -> list[int]:
    """Request i asks for invoice i % 30 on proxy (i // 30) % 3, all at once."""
    responses = await asyncio.gather(
        *(get(proxies[(i // 30) % 3], ids[i % 30]) for i in range(300))
    )
    return [r.status for r in responses]


# --- configuration -------------------------------------------------------------------


def test_sentinel_and_cluster_keys_are_checked_by_path() -> None:
    _, problems = parse_section(
        SharedConfig,
        {
            "redis_url": "redis://r:6379/2",
            "cluster": True,
            "sentinels": ["sentinel-0:26379", "no-port", "h:99999"],
            "sentinel_username": "watcher",
        },
        "shared",
    )
    assert problems == [
        "shared.sentinels[1]: expected host:port",
        "shared.sentinels[2]: expected host:port",
        "shared.sentinels: cannot be used with cluster = true (a cluster has no Sentinel)",
        "shared.redis_url: a cluster has database 0 only",
        "shared.sentinel_username: needs shared.sentinel_password_file",
    ]
    config, problems = parse_section(
        SharedConfig,
        {"redis_url": "rediss://mymaster/0", "sentinels": ["10.0.0.1:26379", "s-1:26379"]},
        "shared",
    )
    assert problems == [] and config.sentinel_service == "mymaster" and not config.cluster


# --- Sentinel ----------------------------------------------------------------------------


async def test_sentinel_fleet_coalesces_and_survives_a_failover_under_load(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    sentinel_set: SentinelSet,
    tmp_path: Path,
) -> None:
    config = sentinel_sections(sentinel_set, tmp_path)
    proxies = [await make_proxy(**config) for _ in range(3)]
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.05))  # the misses overlap
    ids = [f"inv_s_{i:02d}" for i in range(30)]
    assert await burst_of_300(proxies, ids) == [200] * 300
    assert upstream.standin.stats.requests == 30
    assert sentinel_set.primary.dbsize() >= 30, "the answers are on the primary"

    # A failover under load: new invoices (misses) and shared ones (hits) all along.
    old_primary = sentinel_set.current_primary()
    statuses: list[int] = []
    asked: list[str] = []
    failover_at: list[float] = []

    async def load(worker: int) -> None:
        n = 0
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            invoice_id = f"inv_f{worker}_{n}"
            asked.append(invoice_id)
            for proxy in proxies:  # one miss and two shared hits (or coalesced) per invoice
                statuses.append((await get(proxy, invoice_id)).status)
            statuses.append((await get(proxies[n % 3], ids[n % 30])).status)
            n += 1

    def troubles() -> float:
        """Redis failures seen so far by the three proxies (errors, and misses that
        took the local path)."""
        errors = sum(
            metric(p, "invoice_proxy_shared_store_errors_total", operation=op)
            for p in proxies
            for op in ("ping", "get", "claim", "release", "renew", "budget", "delete")
        )
        return errors + shared_lookups(proxies, "unavailable")

    last_trouble: list[float] = []
    switched: list[float] = []

    async def failover() -> None:
        await asyncio.sleep(0.5)
        failover_at.append(time.monotonic())
        sentinel_set.failover()
        seen = troubles()
        while time.monotonic() < failover_at[0] + 3.4:
            await asyncio.sleep(0.02)
            if not switched and sentinel_set.current_primary() is not old_primary:
                switched.append(time.monotonic())
            if troubles() != seen:
                seen = troubles()
                last_trouble.append(time.monotonic())

    await asyncio.gather(failover(), *(load(w) for w in range(6)))
    assert switched, "the sentinels promoted the replica while the load ran"
    assert len(statuses) > 200
    assert set(statuses) == {200}, "no caller request failed during the failover"
    for _ in range(100):
        if sentinel_set.current_primary() is not old_primary:
            break
        await asyncio.sleep(0.1)
    new_primary = sentinel_set.current_primary()
    assert new_primary is not old_primary
    extra = sum(upstream.standin.requests_for(i) - 1 for i in asked)
    # Back to normal: when the last Redis failure was seen, or the switch if none was.
    recovered_s = (last_trouble[-1] if last_trouble else switched[0]) - failover_at[0]
    last = f"last Redis failure {recovered_s:.2f} s after" if last_trouble else "none after"
    print(
        f"\nfailover: {len(statuses)} requests, 0 failed, {extra} extra upstream calls, "
        f"{troubles():.0f} Redis failures ({last}), primary switched "
        f"{switched[0] - failover_at[0]:.2f} s after SENTINEL FAILOVER"
    )
    assert extra <= len(asked), "at most the invoices asked for during the failover, once more"

    assert recovered_s < 3.0, "the fleet was back on the new primary within 3 s"

    # Coalescing works again, on the new primary.
    before = upstream.standin.stats.requests
    fresh_ids = [f"inv_n_{i:02d}" for i in range(30)]
    assert await burst_of_300(proxies, fresh_ids) == [200] * 300
    assert upstream.standin.stats.requests - before == 30
    assert new_primary.info_field("replication", "role") == "master"
    assert new_primary.dbsize() >= 60, "the answers and the budget are on the new primary"


async def test_sentinel_password_is_required_and_comes_from_its_file(
    make_proxy: ProxyFactory, upstream: Upstream, sentinel_set: SentinelSet, tmp_path: Path
) -> None:
    config = sentinel_sections(sentinel_set, tmp_path)
    (tmp_path / "sentinel-password").write_text("wrong\n")
    proxy = await make_proxy(**config)
    assert (await get(proxy, "inv_1")).status == 200, "Redis out: the local path serves"
    assert metric(proxy, "invoice_proxy_shared_store_up") == 0
    assert shared_lookups([proxy], "unavailable") == 1
    (tmp_path / "sentinel-password").write_text(SENTINEL_PASSWORD + "\n")
    other = await make_proxy(**config)
    assert (await get(other, "inv_2")).status == 200
    assert metric(other, "invoice_proxy_shared_store_up") == 1
    assert shared_lookups([other], "miss") == 1


# redis-py can drop a TLS connection it was opening when the application shuts down
# mid-connect (the purge listener's read, cancelled at cleanup): the connection object is
# collected unclosed and warns. Seen once in about six runs, at shutdown only; only that
# warning is let through here, and only in this test.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function AbstractConnection.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_sentinel_fleet_over_tls_coalesces_with_the_ca_file(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """rediss:// with sentinels: TLS to the sentinels and to the primary they name,
    verified against `ca_file`; the passwords as without TLS."""
    ca = make_ca("redis-ca")
    cert, key, _ = issue(ca, "redis")
    tls = TlsFiles(tmp_path / "redis.crt", tmp_path / "redis.key", tmp_path / "ca.pem")
    tls.cert_file.write_bytes(cert)
    tls.key_file.write_bytes(key)
    tls.ca_file.write_bytes(ca.pem())
    servers = SentinelSet(
        tmp_path / "ha-tls", password=REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD, tls=tls
    )
    try:
        servers.start()
        config = sentinel_sections(servers, tmp_path)
        config["shared"] |= {"redis_url": "rediss://mymaster/0", "ca_file": str(tls.ca_file)}
        proxies = [await make_proxy(**config) for _ in range(2)]
        upstream.standin.behave("*", Behaviour("slow", delay_s=0.2))  # the two overlap
        responses = await asyncio.gather(*(get(p, "inv_tls") for p in proxies))
        assert [r.status for r in responses] == [200, 200]
        assert upstream.standin.requests_for("inv_tls") == 1
        assert upstream.standin.stats.requests == 1
        assert [metric(p, "invoice_proxy_shared_store_up") for p in proxies] == [1, 1]
        assert shared_lookups(proxies, "miss") == 1
        assert shared_lookups(proxies, "coalesced") + shared_lookups(proxies, "hit") == 1
        assert shared_lookups(proxies, "unavailable") == 0
        assert servers.primary.dbsize() >= 1, "the answer is on the primary, over TLS"
    finally:
        servers.stop()


# --- Cluster -------------------------------------------------------------------------------


async def test_cluster_fleet_makes_one_upstream_request_per_invoice_over_every_node(
    make_proxy: ProxyFactory, upstream: Upstream, cluster_set: ClusterSet
) -> None:
    # 300 requests through three cluster clients in one event loop: on a busy 2-core
    # machine the loop lags past 0.5 s, a claim waiting that long counts as a timeout,
    # and that request takes the local path (an extra upstream request). The subject
    # here is one fetch per invoice with Redis healthy, so the timeout is generous.
    config = sections(
        {"redis_url": cluster_set.url, "cluster": True, "timeout_s": 3.0, "lock_ttl_s": 10.0}
    )
    proxies = [await make_proxy(**config) for _ in range(3)]
    upstream.standin.behave("*", Behaviour("slow", delay_s=0.05))
    ids = [f"inv_c_{i:02d}" for i in range(30)]
    assert await burst_of_300(proxies, ids) == [200] * 300
    assert upstream.standin.stats.requests == 30
    assert all(upstream.standin.requests_for(i) == 1 for i in ids)
    assert shared_lookups(proxies, "miss") == 30
    assert shared_lookups(proxies, "hit") + shared_lookups(proxies, "coalesced") == 60
    assert shared_lookups(proxies, "unavailable") == 0
    sizes = [node.dbsize() for node in cluster_set.nodes]
    assert all(size > 0 for size in sizes), f"keys spread over the nodes: {sizes}"
    assert sum(sizes) >= 31, "30 answers and the fleet budget"
    errors = sum(
        metric(p, "invoice_proxy_shared_store_errors_total", operation=op)
        for p in proxies
        for op in ("claim", "release", "budget")
    )
    assert errors == 0, "no CROSSSLOT, no MOVED left unfollowed"


async def test_cluster_budget_holds_across_three_proxies(
    make_proxy: ProxyFactory, upstream: Upstream, cluster_set: ClusterSet
) -> None:
    config = sections({"redis_url": cluster_set.url, "cluster": True})
    config["upstream"] = {"fleet_rate_per_minute": 60, "fleet_burst": 5, "fleet_max_wait_s": 0.5}
    proxies = [await make_proxy(**config) for _ in range(3)]
    start = time.monotonic()
    responses = await asyncio.gather(*(get(proxies[i % 3], f"inv_b{i:03d}") for i in range(60)))
    elapsed = time.monotonic() - start
    statuses = [r.status for r in responses]
    assert set(statuses) == {200, 429}
    assert 5 <= upstream.standin.stats.requests <= 5 + int(elapsed) + 1


async def test_cluster_purge_reaches_every_replica(
    make_proxy: ProxyFactory, upstream: Upstream, cluster_set: ClusterSet
) -> None:
    config = sections({"redis_url": cluster_set.url, "cluster": True})
    proxies = [await make_proxy(**config) for _ in range(3)]
    for proxy in proxies:
        await get(proxy, "inv_1")
        assert (await get(proxy, "inv_1")).headers["X-Cache"] == "HIT"
    response = await proxies[0].admin.delete(
        "/cache/organizations/acme/invoices/inv_1", headers=ADMIN
    )
    assert response.status == 204
    await wait_until(
        lambda: all(metric(p, "invoice_proxy_cache_entries") == 0 for p in proxies),
        "every replica to drop the purged invoice",
        timeout=1.0,
    )
    assert [(await get(p, "inv_1")).headers["X-Cache"] for p in proxies] == ["MISS"] * 3
    assert upstream.standin.requests_for("inv_1") == 2


# --- the Kubernetes overlays -------------------------------------------------------


def rendered(overlay: str) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    objects = manifests.render(overlay)
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}, manifests.rendered_config(
        objects
    )


def valkey_pods(by_kind_name: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """The DNS names of the StatefulSet's pods, through its headless Service."""
    valkey = by_kind_name[("StatefulSet", "invoice-proxy-valkey")]["spec"]
    service = by_kind_name[("Service", "invoice-proxy-valkey")]["spec"]
    assert service["clusterIP"] == "None" and valkey["serviceName"] == "invoice-proxy-valkey"
    assert ("Deployment", "invoice-proxy-valkey") not in by_kind_name, "the single Valkey goes"
    return [f"invoice-proxy-valkey-{i}.invoice-proxy-valkey" for i in range(valkey["replicas"])]


def no_password_on_a_command_line(workload: dict[str, Any]) -> None:
    for container in workload["spec"]["template"]["spec"]["containers"]:
        line = " ".join(container.get("args", []))
        assert "--requirepass" not in line and " -a " not in line and "--pass" not in line
        for env in container.get("env", []):
            assert env["valueFrom"]["secretKeyRef"] == {
                "name": "invoice-proxy-redis",
                "key": "password",
            }


def test_sentinel_overlay_points_the_proxy_at_three_sentinels() -> None:
    by_kind_name, config = rendered("overlays/redis-sentinel")
    shared = config["shared"]
    _, problems = parse_section(SharedConfig, shared, "shared")
    assert problems == []
    pods = valkey_pods(by_kind_name)
    assert shared["sentinels"] == [f"{pod}:26379" for pod in pods] and len(pods) == 3
    statefulset = by_kind_name[("StatefulSet", "invoice-proxy-valkey")]
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["valkey", "sentinel"]
    sentinel_args = containers[1]["args"][0]
    assert f"sentinel monitor {shared['sentinel_service']} " in sentinel_args
    assert "sentinel auth-pass" in sentinel_args and "requirepass" in sentinel_args
    no_password_on_a_command_line(statefulset)
    egress = by_kind_name[("NetworkPolicy", "invoice-proxy")]["spec"]["egress"]
    ports = {p["port"] for rule in egress for p in rule["ports"]}
    assert {6379, 26379} <= ports
    mount = "/etc/invoice-proxy-redis/password"
    assert shared["password_file"] == shared["sentinel_password_file"] == mount


def test_cluster_overlay_names_a_node_and_joins_three() -> None:
    by_kind_name, config = rendered("overlays/redis-cluster")
    shared = config["shared"]
    _, problems = parse_section(SharedConfig, shared, "shared")
    assert problems == [] and shared["cluster"] is True
    pods = valkey_pods(by_kind_name)
    assert shared["redis_url"] == f"redis://{pods[0]}:6379/0"
    statefulset = by_kind_name[("StatefulSet", "invoice-proxy-valkey")]
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "cluster-enabled yes" in args and "cluster-announce-hostname" in args
    join = by_kind_name[("Job", "invoice-proxy-valkey-join")]
    join_args = join["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--cluster create" in join_args and "for i in 0 1 2" in join_args
    no_password_on_a_command_line(statefulset)
    no_password_on_a_command_line(join)
    ingress = by_kind_name[("NetworkPolicy", "invoice-proxy-valkey")]["spec"]["ingress"]
    assert {16379, 6379} == {p["port"] for rule in ingress for p in rule["ports"]}


@pytest.mark.parametrize("overlay", ["redis-sentinel", "redis-cluster"])
def test_ha_overlay_config_is_the_redis_overlay_but_for_shared(overlay: str) -> None:
    def config(name: str) -> dict[str, Any]:
        data = tomllib.loads((manifests.KUSTOMIZE / "overlays" / name / "config.toml").read_text())
        data.pop("shared")
        return data

    assert config(overlay) == config("redis")
