"""The measurements of `make bench`, one function each, in the order `measure` runs them.

- hit throughput: wrk over the hot invoices, servers alternating, round by round;
- hit latency: the open-loop generator at half the proxy's peak;
- fresh burst: upstream requests caused by concurrent first requests for fresh invoices;
- the fleet level (issue 8): redis-server and four more proxies;
- callers and TLS (issue 15): a JWT caller's hits against a key caller's, and HTTPS
  against plain HTTP;
- memory fill: the proxy's resident memory before and after caching many invoices;
- and, when asked, a py-spy profile of the busy proxy.

Each fills its part of `figures.Results` and prints a line per round as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from . import loadgen, profile
from .figures import (
    CALLER_SIDES,
    FLEET_PROXIES,
    JWT_HTTP,
    KEY_HTTP,
    KEY_HTTPS,
    WITH,
    WITHOUT,
    Results,
    Settings,
)
from .harness import (
    CLIENT_CORE,
    JWT_CALLER,
    SERVERS,
    BenchError,
    Processes,
    Proxy,
    Quiet,
    Servers,
    invoice_path,
    metric_sum,
    rss_bytes,
    start_issuer,
    start_redis,
    write_tls_pair,
    wrk,
    wrk_script,
)


@dataclass(frozen=True)
class Bench:
    """One run's servers, sizes, and the hot invoices every hit measurement rotates over."""

    processes: Processes
    servers: Servers
    quiet: Quiet
    settings: Settings
    hot_paths: list[str]
    script: Path  # the wrk script over hot_paths

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


def warm_up(bench: Bench) -> None:
    print("warming the caches ...", flush=True)
    ports = bench.servers.ports
    for server in ("invoice-proxy", "nginx"):
        _fetch_all(bench, ports[server], bench.hot_paths, server)
    _check_hits(bench, bench.servers.proxy.port, "the proxy")
    for server in SERVERS:
        bench.wrk(ports[server], bench.settings.warm_wrk_s)


def hit_throughput(bench: Bench, results: Results) -> None:
    s = bench.settings
    print(f"hit throughput, wrk -t1 -c{s.wrk_connections} -d{s.wrk_duration_s}s:", flush=True)
    results.throughput = {server: [] for server in SERVERS}
    for round_ in range(1, s.rounds + 1):
        for server in SERVERS:
            port = bench.servers.ports[server]
            rps, load = bench.quiet.measure(server, lambda port=port: bench.wrk(port))
            results.throughput[server].append(rps)
            print(
                f"  round {round_} {server:14} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )


def hit_latency(bench: Bench, results: Results) -> None:
    s = bench.settings
    results.rate = round(results.peak("invoice-proxy") / 2)
    print(f"hit latency at {results.rate:,.0f} req/s (open loop):", flush=True)
    for round_ in range(1, s.rounds + 1):
        for server in SERVERS:
            port = bench.servers.ports[server]
            answers, load = bench.quiet.measure(
                server,
                lambda port=port: uvloop.run(
                    loadgen.open_loop(
                        port,
                        bench.hot_paths,
                        bench.authorization,
                        results.rate,
                        s.latency_duration_s,
                        s.latency_connections,
                    )
                ),
            )
            check_all_ok(answers, f"latency {server}", int(results.rate * s.latency_duration_s))
            results.latency.setdefault(server, []).append(
                (answers.percentile(0.5) * 1000, answers.percentile(0.99) * 1000)
            )
            print(
                f"  round {round_} {server:14} p50 {answers.percentile(0.5) * 1000:6.3f} ms"
                f"  p99 {answers.percentile(0.99) * 1000:6.3f} ms"
                f"  (latest send {answers.max_send_lag_s * 1e6:.0f} us late;"
                f" others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )


def fresh_burst(bench: Bench, results: Results) -> None:
    s, servers = bench.settings, bench.servers
    print(f"{s.fresh_requests} concurrent first requests for {s.fresh_invoices} fresh invoices:")
    for server, tag in (("invoice-proxy", "p"), ("nginx", "n")):
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
        bench.wrk(proxy.port, bench.settings.warm_wrk_s)
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
        bench.wrk(proxy.port, s.warm_wrk_s, script=script, scheme=scheme)
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


def profile_proxy(bench: Bench) -> profile.Profile | None:
    """Where the busy proxy's time goes: py-spy while wrk runs over the hot invoices."""
    executable = profile.py_spy()
    if executable is None:
        print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return None
    duration = bench.settings.profile_duration_s
    print(f"profiling the proxy under wrk for {duration} s ...", flush=True)
    output = bench.servers.workdir / "profile.txt"
    # py-spy runs on the client core: it must not take the server's CPU.
    recorder = profile.record(executable, bench.servers.proxy.pid, duration, output)
    with contextlib.suppress(Exception):
        os.sched_setaffinity(recorder.pid, {int(CLIENT_CORE)})
    try:
        time.sleep(0.5)
        bench.wrk(bench.servers.proxy.port, duration)
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
    fleet(bench, results)
    callers_and_tls(bench, results)
    if want_profile:
        results.profile = profile_proxy(bench)
    memory_fill(bench, results)
