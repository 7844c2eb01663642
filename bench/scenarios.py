"""The measurements of `make bench`, one function each, in the order `measure` runs them.

- hit throughput: wrk over the hot invoices, servers alternating, round by round: the
  proxy (fast lane on), its twin with the fast lane off, nginx, bare aiohttp;
- hit latency: the open-loop generator at half the proxy's peak, and after each round
  the machine's own pauses on both cores (bench/pauses.py);
- fresh burst: upstream requests caused by concurrent first requests for fresh invoices;
- the miss path (issue 14): four more proxies, two with the fast lane on and two off,
  each request a fresh invoice: wrk's misses/s and the proxy's CPU per miss, then one
  at a time;
- workers (issue 14): a proxy with `server.workers = 2` against the proxy's one worker;
- the fleet level (issue 8): redis-server and four more proxies;
- callers and TLS (issue 15): a JWT caller's hits against a key caller's, and HTTPS
  against plain HTTP;
- memory fill: the proxy's resident memory before and after caching many invoices;
- and, when asked, a py-spy profile of the busy proxy (the fast lane's hits, and misses).

Each fills its part of `figures.Results` and prints a line per round as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import ssl
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from . import cpu, loadgen, miss_instructions, pauses, profile
from .figures import (
    CALLER_SIDES,
    FLEET_PROXIES,
    JWT_HTTP,
    KEY_HTTP,
    KEY_HTTPS,
    LANE_OFF,
    LANE_ON,
    LANE_SIDES,
    ONE_WORKER,
    PROFILE_HITS,
    PROFILE_MISSES,
    TARGET_P99_MS,
    TWO_WORKERS,
    WITH,
    WITHOUT,
    WORKER_SIDES,
    Results,
    Settings,
)
from .harness import (
    CLIENT_CORE,
    JWT_CALLER,
    NGINX,
    PROXY,
    PROXY_OFF,
    SERVER_CORE,
    SERVERS,
    BenchError,
    Processes,
    Proxy,
    Quiet,
    Servers,
    Stalled,
    invoice_path,
    metric_sum,
    pin,
    rss_bytes,
    start_issuer,
    start_redis,
    write_tls_pair,
    wrk,
    wrk_miss_script,
    wrk_script,
)

T = TypeVar("T")

# A server's hit latency is measured at half PROXY's peak unless that is more than this
# share of its own peak (an open loop beyond a server's capacity measures a queue): then
# at half its own peak.
LATENCY_MAX_LOAD = 0.8


@dataclass(frozen=True)
class Bench:
    """One run's servers, sizes, and the hot invoices every hit measurement rotates over."""

    processes: Processes
    servers: Servers
    quiet: Quiet
    settings: Settings
    hot_paths: list[str]
    script: Path  # the wrk script over hot_paths
    # proxies started by a measurement that a profile may ask for, by PROFILE_* name
    proxies: dict[str, Proxy] = field(default_factory=dict)

    @property
    def authorization(self) -> str:
        return self.servers.authorization

    def wrk(
        self,
        port: int,
        duration_s: int | None = None,
        *,
        script: Path | None = None,
        scheme: str = "http",
    ) -> float:
        """Requests/s of wrk over the hot invoices (a throughput round by default)."""
        duration = self.settings.wrk_duration_s if duration_s is None else duration_s
        connections = self.settings.wrk_connections
        return wrk(port, script or self.script, duration, connections, scheme)

    def warm(
        self, port: int, duration_s: int, *, script: Path | None = None, scheme: str = "http"
    ) -> None:
        """A wrk run whose figure is not kept (it warms caches, connections, the code): one
        in which wrk stalled (`Stalled`) warmed them as well."""
        with contextlib.suppress(Stalled):
            self.wrk(port, duration_s, script=script, scheme=scheme)


def hot_ids(settings: Settings) -> list[str]:
    return [f"hot-{i:03d}" for i in range(settings.hot_invoices)]


def prepare(processes: Processes, servers: Servers, quiet: Quiet, settings: Settings) -> Bench:
    """The wrk script over the hot invoices, and what every measurement needs."""
    hot_paths = [invoice_path(i) for i in hot_ids(settings)]
    script = servers.workdir / "hot.lua"
    wrk_script(script, hot_paths, servers.authorization)
    return Bench(processes, servers, quiet, settings, hot_paths, script)


def check_all_ok(answers: loadgen.Answers, what: str, expected: int) -> None:
    if answers.statuses != {200: expected}:
        raise BenchError(f"{what}: expected {expected} answers 200, got {dict(answers.statuses)}")


# The bench's HTTPS proxies have a self-signed certificate: the bench's own client does
# not verify it (127.0.0.1, a pair it just made), as wrk does not.
_UNVERIFIED = ssl.create_default_context()
_UNVERIFIED.check_hostname = False
_UNVERIFIED.verify_mode = ssl.CERT_NONE


async def _x_cache(
    port: int, paths: list[str], authorization: str, scheme: str = "http"
) -> set[str]:
    context = _UNVERIFIED if scheme == "https" else None
    async with aiohttp.ClientSession() as session:
        seen = set()
        for path in paths:
            async with session.get(
                f"{scheme}://127.0.0.1:{port}{path}",
                headers={"Authorization": authorization},
                ssl=context if context is not None else True,
            ) as response:
                await response.read()
                seen.add(response.headers.get("X-Cache", "?"))
        return seen


def _fetch_all(bench: Bench, port: int, paths: list[str], what: str) -> None:
    """Each path once over 10 connections; every answer must be a 200."""
    answers = uvloop.run(loadgen.closed_loop(port, paths, bench.authorization, connections=10))
    check_all_ok(answers, f"warming {what}", len(paths))


def _check_hits(bench: Bench, port: int, what: str) -> None:
    x_cache = uvloop.run(_x_cache(port, bench.hot_paths, bench.authorization))
    if x_cache != {"HIT"}:
        raise BenchError(f"{what}'s hot invoices are not all cache hits: X-Cache {x_cache}")


def _upstream_for(before: dict[str, Any], after: dict[str, Any], ids: list[str]) -> int:
    """The stand-in's requests for `ids` between two of its stats; there must be no other."""
    per_invoice = sum(after["by_invoice"].get(i, 0) for i in ids)
    total = after["requests"] - before["requests"]
    if total != per_invoice:
        raise BenchError(f"the stand-in saw {total} requests, {per_invoice} for the burst")
    return per_invoice


def _rotated(sides: tuple[T, ...], round_: int) -> tuple[T, ...]:
    """The sides in an order that rotates from round to round: a drift of the machine
    favours none of them."""
    shift = (round_ - 1) % len(sides)
    return sides[shift:] + sides[:shift]


def warm_up(bench: Bench) -> None:
    print("warming the caches ...", flush=True)
    ports = bench.servers.ports
    for server in (PROXY, PROXY_OFF, NGINX):
        _fetch_all(bench, ports[server], bench.hot_paths, server)
    _check_hits(bench, bench.servers.proxy.port, "the proxy")
    _check_hits(bench, bench.servers.proxy_off.port, "the proxy with the fast lane off")
    for server in SERVERS:
        bench.warm(ports[server], bench.settings.warm_wrk_s)


def hit_throughput(bench: Bench, results: Results) -> None:
    s = bench.settings
    print(f"hit throughput, wrk -t1 -c{s.wrk_connections} -d{s.wrk_duration_s}s:", flush=True)
    results.throughput = {server: [] for server in SERVERS}
    for round_ in range(1, s.rounds + 1):
        for server in _rotated(SERVERS, round_):
            port = bench.servers.ports[server]
            rps, load = bench.quiet.measure(server, lambda port=port: bench.wrk(port))
            results.throughput[server].append(rps)
            print(
                f"  round {round_} {server:31} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    print(
        f"  proxy/nginx {results.ratio:.3f}, proxy/(fast_lane=false) {results.lane_ratio:.3f}"
        " (medians of the rounds' ratios)",
        flush=True,
    )


def hit_latency(bench: Bench, results: Results) -> None:
    s = bench.settings
    results.rate = round(results.peak(PROXY) / 2)
    for server in SERVERS:
        own = results.peak(server)
        results.rates[server] = (
            results.rate if results.rate <= LATENCY_MAX_LOAD * own else round(own / 2)
        )
    print(f"hit latency at {results.rate:,.0f} req/s (open loop):", flush=True)
    for server in SERVERS:
        if results.rates[server] != results.rate:
            print(f"  ({server}: at {results.rates[server]:,.0f} req/s, half its own peak)")
    for round_ in range(1, s.rounds + 1):
        for server in _rotated(SERVERS, round_):
            port, rate = bench.servers.ports[server], results.rates[server]
            answers, load = bench.quiet.measure(
                server,
                lambda port=port, rate=rate: uvloop.run(
                    loadgen.open_loop(
                        port,
                        bench.hot_paths,
                        bench.authorization,
                        rate,
                        s.latency_duration_s,
                        s.latency_connections,
                    )
                ),
            )
            check_all_ok(answers, f"latency {server}", int(rate * s.latency_duration_s))
            results.latency.setdefault(server, []).append(
                (answers.percentile(0.5) * 1000, answers.percentile(0.99) * 1000)
            )
            print(
                f"  round {round_} {server:31} p50 {answers.percentile(0.5) * 1000:6.3f} ms"
                f"  p99 {answers.percentile(0.99) * 1000:6.3f} ms"
                f"  (latest send {answers.max_send_lag_s * 1e6:.0f} us late;"
                f" others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
        # The machine's own pauses, with the servers idle: the floor under their p99s.
        os.sync()  # as before each measurement
        server_core, client_core = pauses.probe((SERVER_CORE, CLIENT_CORE), s.latency_duration_s)
        results.pauses.append((server_core, client_core))
        print(
            f"  round {round_} the machine's pauses: would hold"
            f" {server_core.waiting_over(TARGET_P99_MS / 1000):.2%} (core {SERVER_CORE}) and"
            f" {client_core.waiting_over(TARGET_P99_MS / 1000):.2%} (core {CLIENT_CORE}) of"
            f" requests past {TARGET_P99_MS:g} ms; longest {server_core.longest * 1000:.2f} /"
            f" {client_core.longest * 1000:.2f} ms",
            flush=True,
        )


def fresh_burst(bench: Bench, results: Results) -> None:
    s, servers = bench.settings, bench.servers
    print(f"{s.fresh_requests} concurrent first requests for {s.fresh_invoices} fresh invoices:")
    for server, tag in ((PROXY, "p"), (NGINX, "n")):
        ids = [f"fresh-{tag}-{i:02d}" for i in range(s.fresh_invoices)]
        paths = [invoice_path(ids[i % s.fresh_invoices]) for i in range(s.fresh_requests)]
        before = servers.standin_stats()
        answers = uvloop.run(loadgen.burst(servers.ports[server], paths, bench.authorization))
        after = servers.standin_stats()
        check_all_ok(answers, f"fresh invoices through {server}", s.fresh_requests)
        per_invoice = _upstream_for(before, after, ids)
        results.fresh_upstream[server] = per_invoice
        results.fresh_seconds[server] = answers.elapsed_s
        print(f"  {server:14} {per_invoice} upstream requests ({answers.elapsed_s:.2f} s)")


_REQUESTS = "invoice_proxy_requests_total"


def _lookups_of(metrics: dict[str, float], result: str) -> float:
    return metric_sum(metrics, "invoice_proxy_cache_lookups_total", result=result)


@dataclass(frozen=True)
class _MissRound:
    rps: float
    cpu_s: float  # the proxy's CPU time over the round
    requests: int  # answered by the proxy (its requests metric)
    misses: int
    hits: int
    upstream: int  # requests the stand-in saw


def miss_path(bench: Bench, results: Results) -> None:
    """Issue 14: the miss path, the fast lane on against off (the lane must hand a miss
    to aiohttp at no visible cost).

    Four proxies started for this part, two of each side: "miss-on" and "miss-on-2"
    (`server.fast_lane = true`), "miss-off" and "miss-off-2" (false), otherwise as the
    others: the upstream rate cap far above what wrk asks, so the proxy is measured, not
    the cap. Two of each, because two processes of the same code and configuration
    differed by 3-5 % in misses/s over a dozen rounds, as much as the lane did: a side's
    figure in a round is the geometric mean of its two. Each wrk round sends every
    request for a fresh invoice that the stand-in answers (on the client core, with
    wrk); the proxy's CPU time per miss is its CPU over the round by the misses it
    answered. Then rounds of fresh invoices one at a time over one connection (no
    queueing), through the first of each side.
    """
    figures, processes, servers, s = results.misses, bench.processes, bench.servers, bench.settings
    print("misses: starting four proxies, two with the fast lane on, two off ...", flush=True)
    twins = {
        side: tuple(
            servers.start_proxy(processes, f"miss-{tag}{suffix}", fast_lane=side == LANE_ON)
            for suffix in ("", "-2")
        )
        for side, tag in ((LANE_ON, "on"), (LANE_OFF, "off"))
    }
    sides = {side: twins[side][0] for side in LANE_SIDES}
    bench.proxies[PROFILE_MISSES] = sides[LANE_ON]
    tags = {LANE_ON: "on", LANE_OFF: "off"}
    attempts = itertools.count()

    def miss_script(side: str) -> Path:
        """A wrk script over invoices no proxy has seen (a repeated round gets new ones)."""
        prefix = f"miss-{tags[side]}-{next(attempts)}-"
        script = servers.workdir / f"{prefix.rstrip('-')}.lua"
        wrk_miss_script(script, prefix, bench.authorization)
        return script

    for side, proxies in twins.items():  # open their upstream connections, warm the code
        for proxy in proxies:
            bench.warm(proxy.port, s.warm_wrk_s, script=miss_script(side))
    bench.quiet.wait()

    def wrk_round(side: str, proxy: Proxy) -> _MissRound:
        script = miss_script(side)
        metrics, upstream = proxy.metrics(), servers.standin_stats()["requests"]
        cpu_before = cpu.cpu_seconds([proxy.pid])
        rps = bench.wrk(proxy.port, s.miss_duration_s, script=script)
        time.sleep(0.3)  # the requests wrk left in flight reach the stand-in and return
        cpu_s = cpu.cpu_seconds([proxy.pid]) - cpu_before
        after, upstream_after = proxy.metrics(), servers.standin_stats()["requests"]
        return _MissRound(
            rps,
            cpu_s,
            round(metric_sum(after, _REQUESTS) - metric_sum(metrics, _REQUESTS)),
            round(_lookups_of(after, "miss") - _lookups_of(metrics, "miss")),
            round(_lookups_of(after, "hit") - _lookups_of(metrics, "hit")),
            upstream_after - upstream,
        )

    print(
        f"misses: wrk -t1 -c{s.wrk_connections} -d{s.miss_duration_s}s, every request a fresh"
        " invoice:",
        flush=True,
    )
    figures.throughput = {side: [] for side in LANE_SIDES}
    figures.cpu_us = {side: [] for side in LANE_SIDES}
    # on, off, on-2, off-2, rotated: each side's two are never measured one after the other
    order = tuple((side, proxies[i]) for i in range(2) for side, proxies in twins.items())
    for round_ in range(1, s.miss_rounds + 1):
        rps: dict[str, list[float]] = {side: [] for side in LANE_SIDES}
        cpu_us: dict[str, list[float]] = {side: [] for side in LANE_SIDES}
        for side, proxy in _rotated(order, round_):
            got, load = bench.quiet.measure(
                proxy.name, lambda side=side, proxy=proxy: wrk_round(side, proxy)
            )
            if got.requests == 0:
                raise BenchError(f"misses through {proxy.name}: the proxy answered nothing")
            rps[side].append(got.rps)
            cpu_us[side].append(got.cpu_s / got.requests * 1e6)
            figures.misses += got.misses
            figures.hits += got.hits
            figures.upstream += got.upstream
            print(
                f"  round {round_} {proxy.name:10} {got.rps:8,.0f} misses/s,"
                f" {cpu_us[side][-1]:6.0f} us of proxy CPU a miss;"
                f" {got.misses:,} misses, {got.upstream:,} upstream, {got.hits} hits"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
        for side in LANE_SIDES:
            figures.throughput[side].append(statistics.geometric_mean(rps[side]))
            figures.cpu_us[side].append(statistics.geometric_mean(cpu_us[side]))

    n = s.miss_latency_invoices

    def one_by_one(side: str) -> loadgen.Answers:
        paths = [invoice_path(f"miss-1by1-{tags[side]}-{next(attempts)}-{i}") for i in range(n)]
        answers = uvloop.run(
            loadgen.closed_loop(sides[side].port, paths, bench.authorization, connections=1)
        )
        check_all_ok(answers, f"misses one at a time through {side}", n)
        return answers

    print(f"misses: {n} fresh invoices one at a time, each round:", flush=True)
    for round_ in range(1, s.miss_latency_rounds + 1):
        for side in _rotated(LANE_SIDES, round_):
            answers, load = bench.quiet.measure(side, lambda side=side: one_by_one(side))
            p50, p99 = answers.percentile(0.5) * 1000, answers.percentile(0.99) * 1000
            figures.latency.setdefault(side, []).append((p50, p99))
            print(
                f"  round {round_} {side:15} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    few, many = s.miss_callgrind_few, s.miss_callgrind_many
    print(
        f"misses: instructions per miss under callgrind ({few + many:,} misses against"
        f" {few:,}) ...",
        flush=True,
    )
    figures.instructions = miss_instructions.per_miss(
        servers, processes, {LANE_ON: True, LANE_OFF: False}, few, many
    )
    for side in LANE_SIDES:
        print(f"  {side:15} {figures.instructions[side]:12,.0f} instructions a miss", flush=True)
    print(
        f"  on/off: misses/s {figures.ratio:.3f} (noise ±{figures.noise:.1%}),"
        f" CPU per miss {figures.cpu_ratio:.3f} (medians of the rounds' ratios),"
        f" instructions per miss {figures.instruction_ratio:.3f}"
    )


@dataclass(frozen=True)
class _WorkersRound:
    rps: float
    proxy_cores: float  # CPU of the proxy's serving processes over the round, in cores
    wrk_cores: float
    by_worker: list[int]  # requests each worker answered
    misses: int


def _warm_workers(bench: Bench, proxy: Proxy, attempts: int = 60) -> None:
    """Each worker has its own cache and the kernel picks the worker of a connection:
    fetch the hot invoices over new connections until every worker holds them all.

    Each pass in its own order: a connection takes the next invoice when its last one
    is answered, so in one fixed order the same late invoices tend to go to the
    connections of the worker that does not share the generator's core (a run ended
    so, its workers holding 100 and 99 invoices after 60 passes)."""
    order = random.Random(0)
    for _ in range(attempts):
        paths = order.sample(bench.hot_paths, len(bench.hot_paths))
        _fetch_all(bench, proxy.port, paths, proxy.name)
        entries = [m.get("invoice_proxy_cache_entries", 0.0) for m in proxy.worker_metrics()]
        if min(entries) >= len(bench.hot_paths):
            return
    raise BenchError(
        f"{proxy.name}: its workers hold {entries} invoices after {attempts} passes, not"
        f" {len(bench.hot_paths)} each"
    )


def workers_scaling(bench: Bench, results: Results) -> None:
    """Issue 14: hits/s with `server.workers = 2` against one worker (the proxy of the hit
    rounds), rounds alternating which goes first.

    The machine has two cores: the one-worker proxy runs on the server core, as
    everywhere; of the two workers, worker 0 is pinned to the server core and worker 1
    to the client core, which it shares with wrk (the Linux scheduler splits that core
    between them). The CPU the proxy's workers and wrk used in each round is measured,
    so the report can say what the ratio is made of.
    """
    figures, processes, servers, s = results.workers, bench.processes, bench.servers, bench.settings
    print("workers: starting a proxy with server.workers = 2 ...", flush=True)
    two = servers.start_proxy(
        processes, "workers-2", workers=2, core=f"{SERVER_CORE},{CLIENT_CORE}"
    )
    for core, pid in zip((SERVER_CORE, CLIENT_CORE), two.worker_pids(), strict=True):
        pin(pid, core)
    processes.note_children()  # the workers' CPU is the bench's own, not foreign load
    sides = {ONE_WORKER: servers.proxy, TWO_WORKERS: two}
    _warm_workers(bench, two)
    before = _lookups_of(two.metrics(), "miss")
    bench.warm(two.port, s.warm_wrk_s)
    if _lookups_of(two.metrics(), "miss") != before:
        raise BenchError(f"{two.name}: cache misses while wrk ran over the hot invoices")
    bench.quiet.wait()

    def wrk_round(side: str) -> _WorkersRound:
        proxy = sides[side]
        pids = proxy.worker_pids()
        metrics = proxy.worker_metrics()
        cpu_before, wrk_before = cpu.cpu_seconds(pids), cpu.waited_children_seconds()
        start = time.monotonic()
        rps = bench.wrk(proxy.port)
        elapsed = time.monotonic() - start
        proxy_cpu = cpu.cpu_seconds(pids) - cpu_before
        wrk_cpu = cpu.waited_children_seconds() - wrk_before
        after = proxy.worker_metrics()
        by_worker = [
            round(metric_sum(a, _REQUESTS) - metric_sum(b, _REQUESTS))
            for a, b in zip(after, metrics, strict=True)
        ]
        misses = sum(
            round(_lookups_of(a, "miss") - _lookups_of(b, "miss"))
            for a, b in zip(after, metrics, strict=True)
        )
        return _WorkersRound(rps, proxy_cpu / elapsed, wrk_cpu / elapsed, by_worker, misses)

    print(
        f"workers: hit throughput, wrk -t1 -c{s.wrk_connections} -d{s.wrk_duration_s}s on core"
        f" {CLIENT_CORE}; one worker on core {SERVER_CORE}, two on cores {SERVER_CORE} and"
        f" {CLIENT_CORE}:",
        flush=True,
    )
    for side in WORKER_SIDES:
        figures.throughput[side], figures.proxy_cores[side], figures.wrk_cores[side] = [], [], []
    for round_ in range(1, s.workers_rounds + 1):
        for side in _rotated(WORKER_SIDES, round_):
            got, load = bench.quiet.measure(side, lambda side=side: wrk_round(side))
            figures.throughput[side].append(got.rps)
            figures.proxy_cores[side].append(got.proxy_cores)
            figures.wrk_cores[side].append(got.wrk_cores)
            figures.misses += got.misses
            split = ""
            if side == TWO_WORKERS:
                figures.split.append(got.by_worker[0] / max(1, sum(got.by_worker)))
                split = f", worker 0 answered {figures.split[-1]:.0%}"
            print(
                f"  round {round_} {side:11} {got.rps:10,.0f} req/s; proxy"
                f" {got.proxy_cores:.2f} cores, wrk {got.wrk_cores:.2f}{split}"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    print(
        f"  two workers / one: {figures.ratio:.3f}; per proxy core {figures.efficiency:.3f};"
        f" cache misses during the rounds: {figures.misses}"
    )


def memory_fill(bench: Bench, results: Results) -> None:
    s, proxy = bench.settings, bench.servers.proxy
    print(f"filling the proxy with {s.fill_invoices:,} invoices ...", flush=True)
    results.metrics_before = proxy.metrics()
    results.rss_before = rss_bytes(proxy.pid)
    fill_paths = [invoice_path(f"fill-{i:06d}") for i in range(s.fill_invoices)]
    answers = uvloop.run(
        loadgen.closed_loop(proxy.port, fill_paths, bench.authorization, s.fill_connections)
    )
    check_all_ok(answers, "the fill", s.fill_invoices)
    time.sleep(1.0)  # let the last log lines and task clean-ups settle
    results.rss_after = rss_bytes(proxy.pid)
    results.metrics_after = proxy.metrics()
    results.fill_seconds = answers.elapsed_s
    results.average_body = answers.body_bytes / s.fill_invoices
    print(f"  {answers.elapsed_s:.0f} s, {s.fill_invoices / answers.elapsed_s:,.0f} misses/s")


def _metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return round(after.get(name, 0.0) - before.get(name, 0.0))


def _lookups(name: str) -> str:
    return f'invoice_proxy_shared_cache_lookups_total{{result="{name}"}}'


def fleet(bench: Bench, results: Results) -> None:
    """The fleet level: proxies sharing one redis-server (issue 8).

    "alone" has no [shared]; A, B and C share the Redis. alone and A are twins
    otherwise: both start now, both get the same hot invoices.
    """
    figures = results.fleet
    processes, servers = bench.processes, bench.servers

    print("fleet: starting redis-server and four proxies ...", flush=True)
    redis = start_redis(processes, servers.workdir)
    figures.redis_version = redis.version()
    alone = servers.start_proxy(processes, "alone")
    a, b, c = (servers.start_proxy(processes, f"fleet-{n}", redis.url) for n in "abc")
    sides = {WITHOUT: alone, WITH: a}
    for proxy in sides.values():
        _fetch_all(bench, proxy.port, bench.hot_paths, proxy.name)
        _check_hits(bench, proxy.port, proxy.name)
        bench.warm(proxy.port, bench.settings.warm_wrk_s)
    bench.quiet.wait()

    s = bench.settings
    print(
        f"fleet: local-hit throughput, wrk -t1 -c{s.wrk_connections} -d{s.wrk_duration_s}s:",
        flush=True,
    )
    figures.throughput = {WITHOUT: [], WITH: []}
    for round_ in range(1, s.fleet_rounds + 1):
        # Alternate which side goes first: a drift of the machine favours neither.
        for side in (WITHOUT, WITH) if round_ % 2 else (WITH, WITHOUT):
            port = sides[side].port
            commands = redis.commands()
            rps, load = bench.quiet.measure(side, lambda port=port: bench.wrk(port))
            if side == WITH:
                figures.redis_commands_on_hits += redis.commands() - commands
            figures.throughput[side].append(rps)
            print(
                f"  round {round_} {side:24} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    print(
        f"  ratio {figures.ratio:.3f} (noise ±{figures.noise:.1%}); Redis commands during the"
        f" rounds with [shared]: {figures.redis_commands_on_hits}"
    )

    _fleet_latency(bench, results, alone, a, b)
    _fleet_burst(bench, results, (a, b, c))


def _fleet_latency(bench: Bench, results: Results, alone: Proxy, a: Proxy, b: Proxy) -> None:
    figures, servers = results.fleet, bench.servers
    n = bench.settings.fleet_latency_invoices
    attempts = itertools.count()

    def one_by_one(port: int, paths: list[str]) -> loadgen.Answers:
        return uvloop.run(loadgen.closed_loop(port, paths, bench.authorization, connections=1))

    def latency_round() -> dict[str, loadgen.Answers]:
        attempt = next(attempts)
        fresh = [invoice_path(f"shared-{attempt}-{i:04d}") for i in range(n)]
        answers = {"miss shared": one_by_one(a.port, fresh)}  # now in Redis
        upstream, metrics = servers.standin_stats()["requests"], b.metrics()
        answers["shared hit"] = one_by_one(b.port, fresh)
        figures.shared_hit_upstream += servers.standin_stats()["requests"] - upstream
        figures.shared_hits += _metric_delta(metrics, b.metrics(), _lookups("hit"))
        figures.shared_reads += n  # every attempt counts, a repeated one included
        answers["local hit"] = one_by_one(b.port, fresh)
        alone_paths = [invoice_path(f"alone-{attempt}-{i:04d}") for i in range(n)]
        answers["miss local"] = one_by_one(alone.port, alone_paths)
        answers["local hit alone"] = one_by_one(alone.port, alone_paths)
        for kind, found in answers.items():
            check_all_ok(found, f"fleet latency, {kind}", n)
        return answers

    print(
        f"fleet: latency, one at a time: {n} invoices through A, then B, then B again;"
        f" {n} others through alone, twice:"
    )
    for round_ in range(1, bench.settings.fleet_latency_rounds + 1):
        by_kind, load = bench.quiet.measure("fleet latency", latency_round)
        for kind, got in by_kind.items():
            p50, p99 = got.percentile(0.5) * 1000, got.percentile(0.99) * 1000
            figures.latency.setdefault(kind, []).append((p50, p99))
            print(f"  round {round_} {kind:15} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms", flush=True)
        print(f"  (others: {load.foreign_cores:.2f} cores)", flush=True)
    print(
        f"  upstream requests during B's shared hits: {figures.shared_hit_upstream};"
        f" counted as shared hits by B: {figures.shared_hits} of {figures.shared_reads}"
    )


def _fleet_burst(bench: Bench, results: Results, proxies: tuple[Proxy, ...]) -> None:
    figures, servers, s = results.fleet, bench.servers, bench.settings
    auth = bench.authorization
    # C has served nothing yet: the three take the burst warm, as running replicas do
    # (a cold process's first burst is slower, and its Redis calls may time out).
    for proxy in proxies:
        paths = [invoice_path(f"warm-{proxy.name}-{i:03d}") for i in range(s.fleet_warm_invoices)]
        _fetch_all(bench, proxy.port, paths, proxy.name)
    print(
        f"fleet: {s.fleet_requests} concurrent first requests for {s.fleet_invoices} fresh"
        f" invoices over {FLEET_PROXIES} proxies, then the same again:"
    )
    # Request i goes to proxy (i + i // fleet_invoices) % FLEET_PROXIES: every invoice
    # reaches every proxy, and each proxy gets the same number of requests.
    ports = [
        proxies[(i + i // s.fleet_invoices) % FLEET_PROXIES].port for i in range(s.fleet_requests)
    ]
    figures.lookups = dict.fromkeys(("miss", "coalesced", "hit", "unavailable"), 0)
    errors = "invoice_proxy_shared_store_errors_total"
    for round_ in range(1, s.fleet_burst_rounds + 1):
        ids = [f"fleet-{round_}-{i:02d}" for i in range(s.fleet_invoices)]
        paths = [invoice_path(ids[i % s.fleet_invoices]) for i in range(s.fleet_requests)]
        metrics = [p.metrics() for p in proxies]
        before = servers.standin_stats()
        answers = uvloop.run(loadgen.burst(ports, paths, auth))
        middle = servers.standin_stats()
        again = uvloop.run(loadgen.burst(ports, paths, auth))
        after = servers.standin_stats()
        check_all_ok(answers, "the fleet's burst", s.fleet_requests)
        check_all_ok(again, "the fleet's burst again", s.fleet_requests)
        per_invoice = _upstream_for(before, middle, ids)
        figures.burst_upstream.append(per_invoice)
        figures.burst_again.append(after["requests"] - middle["requests"])
        figures.burst_seconds.append(answers.elapsed_s)
        for proxy, earlier in zip(proxies, metrics, strict=True):
            later = proxy.metrics()
            for result in figures.lookups:
                figures.lookups[result] += _metric_delta(earlier, later, _lookups(result))
            figures.store_errors += round(metric_sum(later, errors) - metric_sum(earlier, errors))
        print(
            f"  round {round_}: {per_invoice} upstream requests ({answers.elapsed_s:.2f} s),"
            f" again: {figures.burst_again[-1]}",
            flush=True,
        )
    print(
        "  shared lookups over the proxies: "
        + ", ".join(f"{k} {v}" for k, v in figures.lookups.items())
        + f"; Redis errors: {figures.store_errors}"
    )


async def _tls_version(port: int) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_UNVERIFIED)
    try:
        return str(writer.get_extra_info("ssl_object").version())
    finally:
        writer.close()
        await writer.wait_closed()


def callers_and_tls(bench: Bench, results: Results) -> None:
    """Issue 15: hit throughput of a JWT caller against a key caller, and over HTTPS
    against plain HTTP.

    "plain" has an [[issuers]] table (its JWKS from a static file server) and two
    callers, one named by a key, one by a JWT's sub; "tls" is its twin with
    [server.tls]. Both start now and get the same hot invoices. Each round measures
    the key caller on plain, the JWT caller on plain, the key caller on tls over
    HTTPS, in an order that rotates from round to round.
    """
    figures, processes, servers, s = results.callers, bench.processes, bench.servers, bench.settings
    print("callers and TLS: starting a JWKS server and two proxies ...", flush=True)
    issuer = start_issuer(processes, servers.workdir)
    pair = write_tls_pair(servers.workdir)
    plain = servers.start_proxy(processes, "callers-plain", issuer=issuer)
    tls = servers.start_proxy(processes, "callers-tls", issuer=issuer, tls=pair)
    jwt_script = servers.workdir / "hot-jwt.lua"
    wrk_script(jwt_script, bench.hot_paths, f"Bearer {issuer.token()}")
    figures.tls_version = uvloop.run(_tls_version(tls.port))
    sides = {
        KEY_HTTP: (plain, bench.script, "http"),
        JWT_HTTP: (plain, jwt_script, "http"),
        KEY_HTTPS: (tls, bench.script, "https"),
    }
    for proxy, scheme in ((plain, "http"), (tls, "https")):
        for _ in range(2):  # the first pass fills the cache, the second must hit
            x_cache = uvloop.run(_x_cache(proxy.port, bench.hot_paths, bench.authorization, scheme))
        if x_cache != {"HIT"}:
            raise BenchError(f"{proxy.name}'s hot invoices are not all cache hits: {x_cache}")
    for proxy, script, scheme in sides.values():
        bench.warm(proxy.port, s.warm_wrk_s, script=script, scheme=scheme)
    bench.quiet.wait()

    print(
        f"callers and TLS: hit throughput, wrk -t1 -c{s.wrk_connections} -d{s.wrk_duration_s}s"
        f" (TLS: {figures.tls_version}):",
        flush=True,
    )
    figures.throughput = {side: [] for side in CALLER_SIDES}
    jwt_before = metric_sum(
        plain.metrics(), "invoice_proxy_requests_total", caller=JWT_CALLER, code="200"
    )
    for round_ in range(1, s.caller_rounds + 1):
        shift = (round_ - 1) % len(CALLER_SIDES)
        for side in CALLER_SIDES[shift:] + CALLER_SIDES[:shift]:
            proxy, script, scheme = sides[side]
            rps, load = bench.quiet.measure(
                side,
                lambda p=proxy.port, sc=script, sch=scheme: bench.wrk(p, script=sc, scheme=sch),
            )
            figures.throughput[side].append(rps)
            print(
                f"  round {round_} {side:18} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    after = plain.metrics()
    figures.jwt_requests = round(
        metric_sum(after, "invoice_proxy_requests_total", caller=JWT_CALLER, code="200")
        - jwt_before
    )
    figures.jwt_refusals = round(
        sum(metric_sum(p.metrics(), "invoice_proxy_jwt_refusals_total") for p in (plain, tls))
    )
    if figures.jwt_requests == 0:
        raise BenchError("the JWT caller's requests were not answered as the JWT caller")
    print(
        f"  JWT / key {figures.ratio(JWT_HTTP):.3f}, HTTPS / HTTP {figures.ratio(KEY_HTTPS):.3f}"
        f" (medians of the rounds' ratios); JWT caller's 200s: {figures.jwt_requests:,},"
        f" refusals: {figures.jwt_refusals}"
    )


def profile_proxy(bench: Bench, kind: str = PROFILE_HITS) -> profile.Profile | None:
    """Where the busy proxy's time goes: py-spy while wrk runs. PROFILE_HITS: the proxy
    of the hit rounds (the fast lane on) over the hot invoices; PROFILE_MISSES: the
    miss path's proxy with the fast lane on, every request a fresh invoice."""
    executable = profile.py_spy()
    if executable is None:
        print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return None
    duration = bench.settings.profile_duration_s
    if kind == PROFILE_HITS:
        proxy, script = bench.servers.proxy, bench.script
    else:
        proxy = bench.proxies[PROFILE_MISSES]
        script = bench.servers.workdir / "miss-profile.lua"
        wrk_miss_script(script, "miss-profile-", bench.authorization)
    print(f"profiling {proxy.name} under wrk ({kind}) for {duration} s ...", flush=True)
    output = bench.servers.workdir / f"profile-{kind}.txt"
    # py-spy runs on the client core: it must not take the server's CPU.
    recorder = profile.record(executable, proxy.pid, duration, output)
    with contextlib.suppress(Exception):
        os.sched_setaffinity(recorder.pid, {int(CLIENT_CORE)})
    try:
        time.sleep(0.5)
        bench.warm(proxy.port, duration, script=script)  # the load py-spy samples
        _, err = recorder.communicate(timeout=duration + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)
    if recorder.returncode != 0 or not output.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        return None
    return profile.summarise(output.read_text())


def measure(bench: Bench, results: Results, want_profile: bool) -> None:
    """Every measurement, in order; the fleet's before the fill, so that the stand-in's
    per-invoice counts stay small."""
    warm_up(bench)
    hit_throughput(bench, results)
    hit_latency(bench, results)
    fresh_burst(bench, results)
    miss_path(bench, results)
    workers_scaling(bench, results)
    fleet(bench, results)
    callers_and_tls(bench, results)
    if want_profile:
        profile_all(bench, results, (PROFILE_HITS, PROFILE_MISSES))
    memory_fill(bench, results)


def profile_all(bench: Bench, results: Results, kinds: tuple[str, ...] | list[str]) -> None:
    """A profile of each load in `kinds` (PROFILE_HITS, PROFILE_MISSES) into `results`."""
    for kind in kinds:
        found = profile_proxy(bench, kind)
        if found is not None:
            results.profiles[kind] = found
