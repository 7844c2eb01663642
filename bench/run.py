"""`make bench`: invoice-proxy against nginx `proxy_cache`, and a bare aiohttp floor.

One run on 127.0.0.1: the PlanetScale stand-in, invoice-proxy (JSON request log to a
file, metrics on), nginx (one worker, an equivalent cache) and a bare aiohttp app.
Every server is pinned to core 0; the load generators (wrk, and this process, which
runs the Python generator in bench/loadgen.py) to core 1. It measures, alternating
between the servers, round by round:

- hit throughput: wrk -t1 -c50 over 100 cached invoices (median of the rounds);
- hit latency p50/p99 at a fixed rate, half of the proxy's peak (open loop);
- upstream requests caused by 500 concurrent first requests for 50 fresh invoices;
- the proxy's resident memory before and after caching 100,000 invoices;
- the fleet level (issue 8), with redis-server and four more proxies: local-hit
  throughput with `[shared]` configured against without it, the latency of a shared
  hit (a local miss answered from Redis), and the upstream requests of 300 concurrent
  first requests for 30 fresh invoices spread over three proxies sharing one Redis;

The machine may be shared: before each measurement the bench syncs the page cache
(the request logs), and a measurement during which other processes took CPU is
repeated (bounded); the table says how loaded the kept ones were.

Then it prints a table and writes bench/RESULTS.md. When a target is missed and py-spy
is installed (or with --profile), it also records where the proxy's time goes.

    python -m bench.run [--profile] [--no-write] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import uvloop

from . import cpu, loadgen, profile

T = TypeVar("T")

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
VENV_BIN = Path(sys.executable).parent

SERVER_CORE = "0"
CLIENT_CORE = "1"
ORGANIZATION = "acme"
HOT_INVOICES = 100
ROUNDS = 3
WRK_CONNECTIONS = 50
WRK_DURATION_S = 5
LATENCY_DURATION_S = 5
LATENCY_CONNECTIONS = 50
FRESH_INVOICES = 50
FRESH_REQUESTS = 500
FILL_INVOICES = 100_000
FILL_CONNECTIONS = 100
PROFILE_DURATION_S = 8
START_TIMEOUT_S = 20.0
# A measurement during which other processes used more CPU than this (in cores) is
# repeated, at most MAX_REPEATS times and MAX_TOTAL_REPEATS in the run (so the run
# stays within minutes on a busy machine); the table says how loaded the kept ones were.
NOISE_LIMIT_CORES = 0.15
MAX_REPEATS = 2
MAX_TOTAL_REPEATS = 10
QUIET_WAIT_S = 5.0  # before a repeat, wait at most this long for the others to calm down
START_QUIET_WAIT_S = 30.0

# The fleet level (issue 8): proxies sharing one redis-server.
FLEET_ROUNDS = 4  # local-hit throughput with and without [shared]; alternating, so even
# "Equal within noise": the median of the rounds' with/without ratios is within the
# noise of the figure without [shared] (half the range of its rounds, relative to their
# median), or within 5 % when the rounds agree better than that.
FLEET_TOLERANCE = 0.05
FLEET_LATENCY_ROUNDS = 3
FLEET_LATENCY_INVOICES = 1000  # per round, requested one at a time
FLEET_PROXIES = 3
FLEET_INVOICES = 30  # fresh invoices of the three-proxy burst; a multiple of FLEET_PROXIES
FLEET_REQUESTS = 300
FLEET_BURST_ROUNDS = 3
FLEET_WARM_INVOICES = 100  # misses through each of the three before their bursts
FLEET_RATE_PER_MINUTE = 600_000.0
FLEET_BURST = 100_000

# Targets from issue 4.
TARGET_RATIO = 0.35
TARGET_P99_MS = 3.0
TARGET_BYTES_BEYOND_BODY = 1024

SERVERS = ("invoice-proxy", "nginx", "bare aiohttp")
NOTES_START = "<!-- notes: kept by bench/run.py when it rewrites this file -->"
NOTES_END = "<!-- /notes -->"
SOAK_START = "<!-- soak:start -->"  # bench/soak.py's markers
SOAK_END = "<!-- soak:end -->"


def invoice_path(invoice_id: str) -> str:
    return f"/v1/organizations/{ORGANIZATION}/invoices/{invoice_id}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


class Processes:
    """Every process the bench starts; `stop_all` ends each of them, by its own id."""

    def __init__(self) -> None:
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []
        self._children: list[int] = []

    def start(self, name: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        self._files.append(out)
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self._running.append((name, process))
        return process

    def note_children(self) -> None:
        """Remember the children of the started processes (nginx's worker)."""
        self._children = [c for _, p in self._running for c in cpu.children_of(p.pid)]

    def pids(self) -> list[int]:
        return [p.pid for _, p in self._running] + self._children

    def stop_all(self) -> None:
        for _, process in reversed(self._running):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self._running):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop on SIGTERM; killing it", file=sys.stderr)
                process.kill()
                process.wait(timeout=10)
        for out in self._files:
            out.close()


def wait_until(check: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{what} exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start within {START_TIMEOUT_S:.0f}s (see {log})")


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - 127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def redis_call(port: int, *args: str) -> bytes:
    """One Redis command over a plain socket (RESP); the reply's text, errors included."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(b"".join(parts))
        reply = b""
        for _ in range(1000):  # bounded: a reply here is at most a few KiB
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
            head, found, rest = reply.partition(b"\r\n")
            if not found:
                continue
            if not head.startswith(b"$"):
                return head  # +OK, -ERR, :1
            if len(rest) >= int(head[1:]) + 2:
                return rest[: int(head[1:])]
    raise SystemExit(f"no complete answer from Redis on port {port} to {args[0]}")


def redis_commands(port: int) -> int:
    """Commands Redis has run since it started, other than the bench's own INFO."""
    calls = 0
    for line in redis_call(port, "INFO", "commandstats").decode().splitlines():
        name, _, stats = line.partition(":")
        if name.startswith("cmdstat_") and name != "cmdstat_info":
            calls += int(stats.split(",", 1)[0].removeprefix("calls="))
    return calls


@dataclass
class Setup:
    """The running servers and what it takes to call them."""

    workdir: Path
    caller_key: str
    upstream_authorization: str
    credential: Path = Path()
    standin_port: int = 0
    proxy_port: int = 0
    proxy_admin_port: int = 0
    proxy_pid: int = 0
    nginx_port: int = 0
    bare_port: int = 0
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def authorization(self) -> str:
        return f"Bearer {self.caller_key}"

    def standin_stats(self) -> dict[str, Any]:
        _, body = http_get(f"http://127.0.0.1:{self.standin_port}/_control/stats")
        return dict(json.loads(body))

    def proxy_metrics(self) -> dict[str, float]:
        return proxy_metrics(self.proxy_admin_port)


def proxy_metrics(admin_port: int) -> dict[str, float]:
    """One proxy's `invoice_proxy_*` samples, by name with labels."""
    _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    values = {}
    for line in body.decode().splitlines():
        if line.startswith("invoice_proxy_") and " " in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def proxy_config(
    setup: Setup, credential: Path, port: int, admin_port: int, redis_url: str = ""
) -> str:
    """The bench's proxy configuration; with `redis_url`, the fleet level is on."""
    digest = hashlib.sha256(setup.caller_key.encode()).hexdigest()
    shared = ""
    if redis_url:
        # The fleet budget is set far above what the bench asks: it must not throttle.
        shared = f"""\
fleet_rate_per_minute = {FLEET_RATE_PER_MINUTE:.1f}
fleet_burst = {FLEET_BURST}

[shared]
redis_url = "{redis_url}"
"""
    return f"""\
# invoice-proxy for the benchmark; written by bench/run.py.
[server]
host = "127.0.0.1"
port = {port}
admin_port = {admin_port}
max_connections = 4096

[upstream]
base_url = "http://127.0.0.1:{setup.standin_port}/v1"
# The proxy's own cap on PlanetScale traffic would throttle the fill and the burst.
rate_per_s = 100000.0
burst = 100000
{shared}
[credential]
source = "file"

[credential.file]
path = "{credential}"

[cache]
max_bytes = {1 << 30}

[logging]
level = "info"
format = "json"

[[callers]]
name = "bench"
key_sha256 = ["{digest}"]
organizations = ["{ORGANIZATION}"]
"""


def nginx_config(setup: Setup, prefix: Path) -> str:
    text = (BENCH / "nginx.conf.template").read_text()
    values = {
        "@USER@": "user root;" if os.geteuid() == 0 else "",
        "@PREFIX@": str(prefix),
        "@PORT@": str(setup.nginx_port),
        "@UPSTREAM_PORT@": str(setup.standin_port),
        "@UPSTREAM_AUTHORIZATION@": setup.upstream_authorization,
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


@dataclass(frozen=True)
class Proxy:
    """One running `invoice-proxy serve`."""

    name: str
    port: int
    admin_port: int
    pid: int


def start_proxy(processes: Processes, setup: Setup, name: str, redis_url: str = "") -> Proxy:
    """`invoice-proxy serve` on core 0, its JSON request log written to `{name}.log`."""
    port, admin_port = free_port(), free_port()
    config = setup.workdir / f"{name}.toml"
    config.write_text(proxy_config(setup, setup.credential, port, admin_port, redis_url))
    log = setup.workdir / f"{name}.log"  # the JSON request log: written, as in production
    argv = [str(VENV_BIN / "invoice-proxy"), "serve", "--config", str(config)]
    process = processes.start(f"invoice-proxy ({name})", pinned(SERVER_CORE, argv), log)
    ready = f"http://127.0.0.1:{admin_port}/readyz"
    wait_until(lambda: http_get(ready)[0] == 200, f"invoice-proxy ({name})", process, log)
    # taskset execs the command: the same process
    return Proxy(name, port, admin_port, process.pid)


def start_servers(processes: Processes, setup: Setup, hot_ids: list[str]) -> None:
    work = setup.workdir
    python = sys.executable
    token_id, _, token = setup.upstream_authorization.partition(":")

    setup.standin_port = free_port()
    log = work / "standin.log"
    # The stand-in is idle while hits are measured; it shares the client core.
    standin = processes.start(
        "stand-in",
        pinned(
            CLIENT_CORE,
            [
                python,
                "-m",
                "proxy.standin",
                "--port",
                str(setup.standin_port),
                "--token",
                setup.upstream_authorization,
            ],
        ),
        log,
    )
    wait_until(lambda: port_open(setup.standin_port), "the stand-in", standin, log)

    setup.credential = work / "planetscale.json"
    setup.credential.write_text(json.dumps({"token_id": token_id, "token": token}))
    proxy = start_proxy(processes, setup, "proxy")
    setup.proxy_port, setup.proxy_admin_port = proxy.port, proxy.admin_port
    setup.proxy_pid = proxy.pid

    prefix = work / "nginx"
    prefix.mkdir()
    setup.nginx_port = free_port()
    (prefix / "nginx.conf").write_text(nginx_config(setup, prefix))
    log = work / "nginx.out"
    nginx_argv = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    nginx_argv += ["-e", str(prefix / "error.log"), "-g", "daemon off;"]
    nginx = processes.start("nginx", pinned(SERVER_CORE, nginx_argv), log)
    wait_until(lambda: port_open(setup.nginx_port), "nginx", nginx, prefix / "error.log")

    setup.bare_port = free_port()
    log = work / "bare.log"
    bare_argv = [python, "-m", "bench.bare", "--port", str(setup.bare_port)]
    bare_argv += ["--organization", ORGANIZATION, "--ids", ",".join(hot_ids)]
    bare = processes.start("bare aiohttp", pinned(SERVER_CORE, bare_argv), log)
    wait_until(lambda: port_open(setup.bare_port), "the bare aiohttp app", bare, log)

    setup.ports = {
        "invoice-proxy": setup.proxy_port,
        "nginx": setup.nginx_port,
        "bare aiohttp": setup.bare_port,
    }


def wrk_script(path: Path, paths: list[str], authorization: str) -> None:
    listed = ",\n".join(f'  "{p}"' for p in paths)
    path.write_text(
        "-- Rotates over the hot invoices; every server gets the same requests.\n"
        f"local paths = {{\n{listed}\n}}\n"
        "local n = #paths\n"
        "local i = 0\n"
        f'wrk.headers["Authorization"] = "{authorization}"\n'
        "request = function()\n"
        "  i = i % n + 1\n"
        '  return wrk.format("GET", paths[i])\n'
        "end\n"
    )


def wrk(port: int, script: Path, duration_s: int) -> float:
    """Requests/s of one wrk run; every answer must be a 2xx."""
    argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{duration_s}s", "-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}")
    out = subprocess.run(
        pinned(CLIENT_CORE, argv),
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors on port {port}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise SystemExit(f"no Requests/sec in wrk's output:\n{out}")
    return float(match[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no VmRSS for process {pid}")


def check_all_ok(answers: loadgen.Answers, what: str, expected: int) -> None:
    if answers.statuses != {200: expected}:
        raise SystemExit(f"{what}: expected {expected} answers 200, got {dict(answers.statuses)}")


async def _warm_x_cache(port: int, paths: list[str], authorization: str) -> set[str]:
    async with aiohttp.ClientSession() as session:
        seen = set()
        for path in paths:
            async with session.get(
                f"http://127.0.0.1:{port}{path}", headers={"Authorization": authorization}
            ) as response:
                await response.read()
                seen.add(response.headers.get("X-Cache", "?"))
        return seen


@dataclass
class Fleet:
    """The fleet level's figures: proxies sharing one redis-server."""

    redis_version: str = ""
    # local-hit throughput of each round (req/s), WITHOUT and WITH [shared]
    throughput: dict[str, list[float]] = field(default_factory=dict)
    redis_commands_on_hits: int = 0  # Redis commands during the WITH rounds (goal 0)
    # (p50, p99) in ms of each latency round, by kind of request (LATENCY_KINDS)
    latency: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    shared_hit_upstream: int = 0  # stand-in requests during B's shared hits (goal 0)
    shared_reads: int = 0  # B's reads of invoices A put in Redis
    shared_hits: int = 0  # of those, counted as shared hits by B (goal: all of them)
    burst_upstream: list[int] = field(default_factory=list)  # per round (goal FLEET_INVOICES)
    burst_again: list[int] = field(default_factory=list)  # the same burst again (goal 0)
    burst_seconds: list[float] = field(default_factory=list)
    lookups: dict[str, int] = field(default_factory=dict)  # over the proxies and the bursts
    store_errors: int = 0  # Redis commands failed or timed out in the bursts (goal 0)

    @property
    def ratios(self) -> list[float]:
        """WITH / WITHOUT of each round (the two measured next to each other)."""
        return [w / o for w, o in zip(self.throughput[WITH], self.throughput[WITHOUT], strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def noise(self) -> float:
        """Half the range of the rounds without [shared], relative to their median."""
        rounds = self.throughput[WITHOUT]
        return (max(rounds) - min(rounds)) / 2 / statistics.median(rounds)

    def p(self, kind: str, q: float) -> float:
        return statistics.median(r[0 if q == 0.5 else 1] for r in self.latency[kind])

    def verdicts(self) -> list[tuple[str, bool, str]]:
        return [
            (
                "local-hit throughput with [shared] equal to without, within noise"
                f" (at least {FLEET_TOLERANCE:.0%})",
                abs(self.ratio - 1) <= max(FLEET_TOLERANCE, self.noise),
                f"{self.ratio:.3f}, noise ±{self.noise:.1%}",
            ),
            (
                "no Redis command during local hits",
                self.redis_commands_on_hits == 0,
                str(self.redis_commands_on_hits),
            ),
            (
                "no upstream request for shared hits",
                self.shared_hit_upstream == 0,
                str(self.shared_hit_upstream),
            ),
            (
                f"{FLEET_INVOICES} upstream requests for {FLEET_INVOICES} fresh invoices over"
                f" {FLEET_PROXIES} proxies, {FLEET_REQUESTS} concurrent requests",
                all(n == FLEET_INVOICES for n in self.burst_upstream),
                " / ".join(map(str, self.burst_upstream)),
            ),
            (
                "no upstream request for the same burst again",
                not any(self.burst_again),
                " / ".join(map(str, self.burst_again)),
            ),
        ]


WITHOUT, WITH = "without [shared]", "with [shared], Redis up"
LATENCY_KINDS = {
    "local hit alone": "local hit without [shared] (alone, second read)",
    "local hit": "local hit with [shared] (B, second read)",
    "shared hit": "**shared hit** (B: local miss, in Redis from A)",
    "miss shared": "upstream miss through A (Redis claim, budget, stand-in, store)",
    "miss local": "upstream miss without [shared] (stand-in)",
}


@dataclass
class Results:
    started: str = ""
    throughput: dict[str, list[float]] = field(default_factory=dict)
    rate: float = 0.0
    # (p50, p99) in ms of each latency round, by server
    latency: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    fresh_upstream: dict[str, int] = field(default_factory=dict)
    fresh_seconds: dict[str, float] = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    fill_seconds: float = 0.0
    average_body: float = 0.0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    profile: profile.Profile | None = None
    fleet: Fleet = field(default_factory=Fleet)
    repeated: int = 0  # measurements repeated because other processes were busy
    worst_load: float = 0.0  # the most foreign CPU (cores) during a kept measurement

    def peak(self, server: str) -> float:
        return statistics.median(self.throughput[server])

    @property
    def ratio(self) -> float:
        return self.peak("invoice-proxy") / self.peak("nginx")

    def p(self, server: str, q: float) -> float:
        """The median over the rounds of one percentile (0.5 or 0.99), in ms."""
        return statistics.median(r[0 if q == 0.5 else 1] for r in self.latency[server])

    @property
    def rss_per_invoice(self) -> float:
        return (self.rss_after - self.rss_before) / FILL_INVOICES

    @property
    def entries(self) -> float:
        return self.metrics_after.get("invoice_proxy_cache_entries", 0.0)

    @property
    def accounted_per_entry(self) -> float:
        return self.metrics_after.get("invoice_proxy_cache_bytes", 0.0) / max(1.0, self.entries)

    def verdicts(self) -> list[tuple[str, bool, str]]:
        beyond = self.rss_per_invoice - self.average_body
        return [
            (
                f"hit throughput >= {TARGET_RATIO} of nginx",
                self.ratio >= TARGET_RATIO,
                f"{self.ratio:.2f}",
            ),
            (
                f"p99 hit latency < {TARGET_P99_MS:g} ms at {self.rate:,.0f} req/s",
                self.p("invoice-proxy", 0.99) < TARGET_P99_MS,
                f"{self.p('invoice-proxy', 0.99):.2f} ms",
            ),
            (
                f"{FRESH_INVOICES} upstream requests for {FRESH_INVOICES} fresh invoices",
                self.fresh_upstream["invoice-proxy"] == FRESH_INVOICES,
                str(self.fresh_upstream["invoice-proxy"]),
            ),
            (
                f"<= {TARGET_BYTES_BEYOND_BODY} B of memory per invoice beyond its body",
                beyond <= TARGET_BYTES_BEYOND_BODY,
                f"{beyond:,.0f} B",
            ),
            *self.fleet.verdicts(),
        ]


def quietly(
    processes: Processes, results: Results, what: str, run: Callable[[], T]
) -> tuple[T, cpu.Load]:
    """Run one measurement; repeat it (bounded) when other processes took CPU meanwhile."""
    for attempt in range(MAX_REPEATS + 1):
        # The request logs of the previous measurement (tens of MB at full load) are
        # written back first: that writeback stalls both cores for milliseconds.
        os.sync()
        meter = cpu.Meter(processes.pids)
        value = run()
        load = meter.load()
        busy = load.foreign_cores + load.steal_cores
        if (
            busy <= NOISE_LIMIT_CORES
            or attempt == MAX_REPEATS
            or results.repeated >= MAX_TOTAL_REPEATS
        ):
            break
        results.repeated += 1
        print(
            f"  ({what}: other processes took {load.foreign_cores:.2f} cores, "
            f"steal {load.steal_cores:.2f}: repeating)",
            flush=True,
        )
        cpu.wait_for_quiet(processes.pids, NOISE_LIMIT_CORES / 2, QUIET_WAIT_S)
    results.worst_load = max(results.worst_load, busy)
    return value, load


def measure(processes: Processes, setup: Setup, results: Results, want_profile: bool) -> None:
    work = setup.workdir
    auth = setup.authorization
    hot_paths = [invoice_path(f"hot-{i:03d}") for i in range(HOT_INVOICES)]
    script = work / "hot.lua"
    wrk_script(script, hot_paths, auth)

    print("warming the caches ...", flush=True)
    for server in ("invoice-proxy", "nginx"):
        port = setup.ports[server]
        first = uvloop.run(loadgen.closed_loop(port, hot_paths, auth, connections=10))
        check_all_ok(first, f"warming {server}", HOT_INVOICES)
    x_cache = uvloop.run(_warm_x_cache(setup.proxy_port, hot_paths, auth))
    if x_cache != {"HIT"}:
        raise SystemExit(f"the proxy's hot invoices are not all cache hits: X-Cache {x_cache}")
    for server in SERVERS:
        wrk(setup.ports[server], script, 2)

    print(f"hit throughput, wrk -t1 -c{WRK_CONNECTIONS} -d{WRK_DURATION_S}s:", flush=True)
    results.throughput = {server: [] for server in SERVERS}
    for round_ in range(1, ROUNDS + 1):
        for server in SERVERS:
            port = setup.ports[server]
            rps, load = quietly(
                processes, results, server, lambda port=port: wrk(port, script, WRK_DURATION_S)
            )
            results.throughput[server].append(rps)
            print(
                f"  round {round_} {server:14} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )

    results.rate = round(results.peak("invoice-proxy") / 2)
    print(f"hit latency at {results.rate:,.0f} req/s (open loop):", flush=True)
    for round_ in range(1, ROUNDS + 1):
        for server in SERVERS:
            port = setup.ports[server]
            answers, load = quietly(
                processes,
                results,
                server,
                lambda port=port: uvloop.run(
                    loadgen.open_loop(
                        port, hot_paths, auth, results.rate, LATENCY_DURATION_S, LATENCY_CONNECTIONS
                    )
                ),
            )
            check_all_ok(answers, f"latency {server}", int(results.rate * LATENCY_DURATION_S))
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

    print(f"{FRESH_REQUESTS} concurrent first requests for {FRESH_INVOICES} fresh invoices:")
    for server, tag in (("invoice-proxy", "p"), ("nginx", "n")):
        ids = [f"fresh-{tag}-{i:02d}" for i in range(FRESH_INVOICES)]
        paths = [invoice_path(ids[i % FRESH_INVOICES]) for i in range(FRESH_REQUESTS)]
        before = setup.standin_stats()
        answers = uvloop.run(loadgen.burst(setup.ports[server], paths, auth))
        after = setup.standin_stats()
        check_all_ok(answers, f"fresh invoices through {server}", FRESH_REQUESTS)
        per_invoice = sum(after["by_invoice"].get(i, 0) for i in ids)
        total = after["requests"] - before["requests"]
        if total != per_invoice:
            raise SystemExit(f"the stand-in saw {total} requests, {per_invoice} for the burst")
        results.fresh_upstream[server] = per_invoice
        results.fresh_seconds[server] = answers.elapsed_s
        print(f"  {server:14} {per_invoice} upstream requests ({answers.elapsed_s:.2f} s)")

    # Before the fill: the stand-in's per-invoice counts stay small.
    measure_fleet(processes, setup, results)

    if want_profile:
        results.profile = profile_proxy(setup, script)

    print(f"filling the proxy with {FILL_INVOICES:,} invoices ...", flush=True)
    results.metrics_before = setup.proxy_metrics()
    results.rss_before = rss_bytes(setup.proxy_pid)
    fill_paths = [invoice_path(f"fill-{i:06d}") for i in range(FILL_INVOICES)]
    answers = uvloop.run(loadgen.closed_loop(setup.proxy_port, fill_paths, auth, FILL_CONNECTIONS))
    check_all_ok(answers, "the fill", FILL_INVOICES)
    time.sleep(1.0)  # let the last log lines and task clean-ups settle
    results.rss_after = rss_bytes(setup.proxy_pid)
    results.metrics_after = setup.proxy_metrics()
    results.fill_seconds = answers.elapsed_s
    results.average_body = answers.body_bytes / FILL_INVOICES
    print(f"  {answers.elapsed_s:.0f} s, {FILL_INVOICES / answers.elapsed_s:,.0f} misses/s")


def start_redis(processes: Processes, setup: Setup) -> int:
    """redis-server on core 0 with the proxies, no persistence; its port."""
    port = free_port()
    log = setup.workdir / "redis.log"
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(setup.workdir)]
    argv += ["--loglevel", "warning"]
    redis = processes.start("redis-server", pinned(SERVER_CORE, argv), log)
    wait_until(lambda: redis_call(port, "PING") == b"+PONG", "redis-server", redis, log)
    return port


def _metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return round(after.get(name, 0.0) - before.get(name, 0.0))


def _lookups(name: str) -> str:
    return f'invoice_proxy_shared_cache_lookups_total{{result="{name}"}}'


def measure_fleet(processes: Processes, setup: Setup, results: Results) -> None:
    """The fleet level: proxies sharing one redis-server (issue 8).

    "alone" has no [shared]; A, B and C share the Redis. alone and A are twins
    otherwise: both start now, both get the same hot invoices.
    """
    fleet = results.fleet
    auth = setup.authorization
    hot_paths = [invoice_path(f"hot-{i:03d}") for i in range(HOT_INVOICES)]
    script = setup.workdir / "hot.lua"

    print("fleet: starting redis-server and four proxies ...", flush=True)
    redis_port = start_redis(processes, setup)
    version = re.search(r"redis_version:(\S+)", redis_call(redis_port, "INFO", "server").decode())
    fleet.redis_version = version[1] if version else "unknown"
    url = f"redis://127.0.0.1:{redis_port}/0"
    alone = start_proxy(processes, setup, "alone")
    a, b, c = (start_proxy(processes, setup, f"fleet-{n}", url) for n in "abc")
    sides = {WITHOUT: alone, WITH: a}
    for proxy in sides.values():
        first = uvloop.run(loadgen.closed_loop(proxy.port, hot_paths, auth, connections=10))
        check_all_ok(first, f"warming {proxy.name}", HOT_INVOICES)
        x_cache = uvloop.run(_warm_x_cache(proxy.port, hot_paths, auth))
        if x_cache != {"HIT"}:
            raise SystemExit(f"{proxy.name}'s hot invoices are not all cache hits: {x_cache}")
        wrk(proxy.port, script, 2)
    cpu.wait_for_quiet(processes.pids, NOISE_LIMIT_CORES / 2, QUIET_WAIT_S)

    print(
        f"fleet: local-hit throughput, wrk -t1 -c{WRK_CONNECTIONS} -d{WRK_DURATION_S}s:",
        flush=True,
    )
    fleet.throughput = {WITHOUT: [], WITH: []}
    for round_ in range(1, FLEET_ROUNDS + 1):
        # Alternate which side goes first: a drift of the machine favours neither.
        for side in (WITHOUT, WITH) if round_ % 2 else (WITH, WITHOUT):
            port = sides[side].port
            commands = redis_commands(redis_port)
            rps, load = quietly(
                processes, results, side, lambda port=port: wrk(port, script, WRK_DURATION_S)
            )
            if side == WITH:
                fleet.redis_commands_on_hits += redis_commands(redis_port) - commands
            fleet.throughput[side].append(rps)
            print(
                f"  round {round_} {side:24} {rps:10,.0f} req/s"
                f"  (others: {load.foreign_cores:.2f} cores)",
                flush=True,
            )
    print(
        f"  ratio {fleet.ratio:.3f} (noise ±{fleet.noise:.1%}); Redis commands during the"
        f" rounds with [shared]: {fleet.redis_commands_on_hits}"
    )

    n = FLEET_LATENCY_INVOICES
    attempts = itertools.count()

    def one_by_one(port: int, paths: list[str]) -> loadgen.Answers:
        return uvloop.run(loadgen.closed_loop(port, paths, auth, connections=1))

    def latency_round() -> dict[str, loadgen.Answers]:
        attempt = next(attempts)
        fresh = [invoice_path(f"shared-{attempt}-{i:04d}") for i in range(n)]
        answers = {"miss shared": one_by_one(a.port, fresh)}  # now in Redis
        upstream, metrics = setup.standin_stats()["requests"], proxy_metrics(b.admin_port)
        answers["shared hit"] = one_by_one(b.port, fresh)
        fleet.shared_hit_upstream += setup.standin_stats()["requests"] - upstream
        fleet.shared_hits += _metric_delta(metrics, proxy_metrics(b.admin_port), _lookups("hit"))
        fleet.shared_reads += n  # every attempt counts, a repeated one included
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
    for round_ in range(1, FLEET_LATENCY_ROUNDS + 1):
        by_kind, load = quietly(processes, results, "fleet latency", latency_round)
        for kind, got in by_kind.items():
            p50, p99 = got.percentile(0.5) * 1000, got.percentile(0.99) * 1000
            fleet.latency.setdefault(kind, []).append((p50, p99))
            print(f"  round {round_} {kind:15} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms", flush=True)
        print(f"  (others: {load.foreign_cores:.2f} cores)", flush=True)
    print(
        f"  upstream requests during B's shared hits: {fleet.shared_hit_upstream};"
        f" counted as shared hits by B: {fleet.shared_hits} of {fleet.shared_reads}"
    )

    proxies = (a, b, c)
    # C has served nothing yet: the three take the burst warm, as running replicas do
    # (a cold process's first burst is slower, and its Redis calls may time out).
    for proxy in proxies:
        paths = [invoice_path(f"warm-{proxy.name}-{i:03d}") for i in range(FLEET_WARM_INVOICES)]
        warm = uvloop.run(loadgen.closed_loop(proxy.port, paths, auth, connections=10))
        check_all_ok(warm, f"warming {proxy.name}", FLEET_WARM_INVOICES)
    print(
        f"fleet: {FLEET_REQUESTS} concurrent first requests for {FLEET_INVOICES} fresh"
        f" invoices over {FLEET_PROXIES} proxies, then the same again:"
    )
    # Request i goes to proxy (i + i // FLEET_INVOICES) % FLEET_PROXIES: every invoice
    # reaches every proxy, and each proxy gets the same number of requests.
    ports = [proxies[(i + i // FLEET_INVOICES) % FLEET_PROXIES].port for i in range(FLEET_REQUESTS)]
    fleet.lookups = dict.fromkeys(("miss", "coalesced", "hit", "unavailable"), 0)
    errors = "invoice_proxy_shared_store_errors_total"
    for round_ in range(1, FLEET_BURST_ROUNDS + 1):
        ids = [f"fleet-{round_}-{i:02d}" for i in range(FLEET_INVOICES)]
        paths = [invoice_path(ids[i % FLEET_INVOICES]) for i in range(FLEET_REQUESTS)]
        metrics = [proxy_metrics(p.admin_port) for p in proxies]
        before = setup.standin_stats()
        answers = uvloop.run(loadgen.burst(ports, paths, auth))
        middle = setup.standin_stats()
        again = uvloop.run(loadgen.burst(ports, paths, auth))
        after = setup.standin_stats()
        check_all_ok(answers, "the fleet's burst", FLEET_REQUESTS)
        check_all_ok(again, "the fleet's burst again", FLEET_REQUESTS)
        per_invoice = sum(middle["by_invoice"].get(i, 0) for i in ids)
        total = middle["requests"] - before["requests"]
        if total != per_invoice:
            raise SystemExit(f"the stand-in saw {total} requests, {per_invoice} for the burst")
        fleet.burst_upstream.append(per_invoice)
        fleet.burst_again.append(after["requests"] - middle["requests"])
        fleet.burst_seconds.append(answers.elapsed_s)
        for proxy, earlier in zip(proxies, metrics, strict=True):
            later = proxy_metrics(proxy.admin_port)
            for result in fleet.lookups:
                fleet.lookups[result] += _metric_delta(earlier, later, _lookups(result))
            fleet.store_errors += sum(
                round(v - earlier.get(k, 0.0)) for k, v in later.items() if k.startswith(errors)
            )
        print(
            f"  round {round_}: {per_invoice} upstream requests ({answers.elapsed_s:.2f} s),"
            f" again: {fleet.burst_again[-1]}",
            flush=True,
        )
    print(
        "  shared lookups over the proxies: "
        + ", ".join(f"{k} {v}" for k, v in fleet.lookups.items())
        + f"; Redis errors: {fleet.store_errors}"
    )


def profile_proxy(setup: Setup, script: Path) -> profile.Profile | None:
    executable = profile.py_spy()
    if executable is None:
        print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        return None
    print(f"profiling the proxy under wrk for {PROFILE_DURATION_S} s ...", flush=True)
    output = setup.workdir / "profile.txt"
    # py-spy runs on the client core: it must not take the server's CPU.
    recorder = profile.record(executable, setup.proxy_pid, PROFILE_DURATION_S, output)
    with contextlib.suppress(Exception):
        os.sched_setaffinity(recorder.pid, {int(CLIENT_CORE)})
    try:
        time.sleep(0.5)
        wrk(setup.proxy_port, script, PROFILE_DURATION_S)
        _, err = recorder.communicate(timeout=PROFILE_DURATION_S + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)
    if recorder.returncode != 0 or not output.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        return None
    return profile.summarise(output.read_text())


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    revision = subprocess.run(
        ["git", "-C", str(BENCH.parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "code": f"git {revision or 'unknown'}"
        + (" (uncommitted changes were measured)" if revision.endswith("-dirty") else ""),
        "nproc": str(os.cpu_count()),
        "CPU": model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "nginx": nginx_version.removeprefix("nginx version: "),
        "wrk": wrk_version.split("[", 1)[0].strip() or "wrk",
    }


def table(results: Results) -> str:
    proxy, nginx, bare = SERVERS
    rate = f"{results.rate:,.0f} req/s"
    rounds = {s: " / ".join(f"{r:,.0f}" for r in results.throughput[s]) for s in SERVERS}
    beyond_rss = results.rss_per_invoice - results.average_body
    beyond_metric = results.accounted_per_entry - results.average_body
    rows = [
        ("", proxy, nginx, bare),
        ("---", "---:", "---:", "---:"),
        (
            f"hit throughput, req/s (median of {ROUNDS})",
            f"{results.peak(proxy):,.0f}",
            f"{results.peak(nginx):,.0f}",
            f"{results.peak(bare):,.0f}",
        ),
        ("  rounds", rounds[proxy], rounds[nginx], rounds[bare]),
        (
            f"hit p50 at {rate}, ms (median of {ROUNDS})",
            *(f"{results.p(s, 0.5):.3f}" for s in SERVERS),
        ),
        (
            f"hit p99 at {rate}, ms (median of {ROUNDS})",
            *(f"{results.p(s, 0.99):.3f}" for s in SERVERS),
        ),
        (
            "  p99 of each round, ms",
            *(" / ".join(f"{r[1]:.2f}" for r in results.latency[s]) for s in SERVERS),
        ),
        (
            f"upstream requests, {FRESH_REQUESTS} concurrent for {FRESH_INVOICES} fresh invoices",
            str(results.fresh_upstream[proxy]),
            str(results.fresh_upstream[nginx]),
            "-",
        ),
        (
            "  time until the last of those answers, s",
            f"{results.fresh_seconds[proxy]:.2f}",
            f"{results.fresh_seconds[nginx]:.2f}",
            "-",
        ),
    ]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    mib = 1024 * 1024
    lines += [
        "",
        f"Ratios of hit throughput: proxy/nginx **{results.ratio:.2f}**, "
        f"proxy/bare {results.peak(proxy) / results.peak(bare):.2f}, "
        f"bare/nginx {results.peak(bare) / results.peak(nginx):.2f}.",
        "",
        f"Other processes on the machine: at most {results.worst_load:.2f} cores busy during a"
        f" kept measurement; {results.repeated} measurement(s) repeated because they took"
        f" more than {NOISE_LIMIT_CORES} cores.",
        "",
        "| invoice-proxy memory, 100,000 invoices cached | |",
        "| --- | ---: |",
        f"| RSS before the fill | {results.rss_before / mib:,.1f} MiB |",
        f"| RSS after the fill | {results.rss_after / mib:,.1f} MiB |",
        f"| RSS growth per invoice | {results.rss_per_invoice:,.0f} B |",
        f"| average body | {results.average_body:,.0f} B |",
        f"| **RSS per invoice beyond its body** | **{beyond_rss:,.0f} B** |",
        f"| `invoice_proxy_cache_entries` | {results.entries:,.0f} |",
        f"| `invoice_proxy_cache_bytes` / entries | {results.accounted_per_entry:,.0f} B |",
        f"| of which beyond the body (key and accounted overhead) | {beyond_metric:,.0f} B |",
        f"| fill: {FILL_INVOICES:,} misses through the proxy | {results.fill_seconds:.0f} s |",
    ]
    return "\n".join(lines)


def fleet_lines(fleet: Fleet) -> str:
    """The fleet subsection's figures (Markdown)."""
    rounds = {
        side: " / ".join(f"{r:,.0f}" for r in fleet.throughput[side]) for side in (WITHOUT, WITH)
    }
    n = FLEET_LATENCY_INVOICES
    lines = [
        f"| local-hit throughput, req/s | {WITHOUT} | {WITH} |",
        "| --- | ---: | ---: |",
        f"| median of {FLEET_ROUNDS} rounds"
        f" | {statistics.median(fleet.throughput[WITHOUT]):,.0f}"
        f" | {statistics.median(fleet.throughput[WITH]):,.0f} |",
        f"|   rounds | {rounds[WITHOUT]} | {rounds[WITH]} |",
        "",
        f"With / without, median of the rounds' ratios: **{fleet.ratio:.3f}**"
        f" (rounds: {' / '.join(f'{r:.3f}' for r in fleet.ratios)}); noise of the figure"
        f" without [shared] (half the range of its rounds): ±{fleet.noise:.1%}. Redis"
        f" commands during the rounds with [shared]: **{fleet.redis_commands_on_hits}**.",
        "",
        f"| latency, one request at a time, ms (median of {FLEET_LATENCY_ROUNDS} rounds"
        f" of {n:,} invoices) | p50 | p99 |",
        "| --- | ---: | ---: |",
        *(
            f"| {label} | {fleet.p(kind, 0.5):.3f} | {fleet.p(kind, 0.99):.3f} |"
            for kind, label in LATENCY_KINDS.items()
        ),
        "",
        "Upstream requests at the stand-in during B's shared hits:"
        f" **{fleet.shared_hit_upstream}**; B counted {fleet.shared_hits:,} of its"
        f" {fleet.shared_reads:,} reads as shared hits.",
        "",
        f"| {FLEET_PROXIES} proxies, one Redis: {FLEET_REQUESTS} concurrent first requests"
        f" for {FLEET_INVOICES} fresh invoices |"
        + "".join(f" round {i} |" for i in range(1, FLEET_BURST_ROUNDS + 1)),
        "| --- |" + " ---: |" * FLEET_BURST_ROUNDS,
        "| **upstream requests** (stand-in) |" + "".join(f" {v} |" for v in fleet.burst_upstream),
        "| time until the last answer, s |" + "".join(f" {v:.2f} |" for v in fleet.burst_seconds),
        "| the same requests again: upstream requests |"
        + "".join(f" {v} |" for v in fleet.burst_again),
        "",
        "Shared lookups over the three proxies and the rounds: "
        + ", ".join(f"{k} {v}" for k, v in fleet.lookups.items())
        + " (miss: this proxy took the lock and asked the stand-in; coalesced: it waited"
        " for another proxy's answer; hit: it found the answer already there; unavailable:"
        " Redis was taken for down, so the proxy asked the stand-in on its own)."
        f" Redis commands failed or timed out (`invoice_proxy_shared_store_errors_total`):"
        f" {fleet.store_errors}.",
    ]
    return "\n".join(lines)


def verdict_lines(results: Results) -> str:
    return "\n".join(
        f"- {'met' if ok else '**missed**'}: {target} ({value})"
        for target, ok, value in results.verdicts()
    )


def profile_lines(found: profile.Profile | None) -> str:
    if found is None:
        return "No profile was taken in this run."
    lines = [
        f"py-spy, {found.samples:,} samples of the busy proxy under wrk -c{WRK_CONNECTIONS} "
        "(idle samples are not recorded). Each sample counts once, for the innermost frame",
        "of a known part (standard-library frames count for their caller).",
        "",
        "| part | share |",
        "| --- | ---: |",
        *(f"| {part} | {share:.0%} |" for part, share in found.parts),
        "",
        "| function (self time) | share |",
        "| --- | ---: |",
        *(f"| `{frame}` | {share:.1%} |" for frame, share in found.self_share),
    ]
    return "\n".join(lines)


def write_results(results: Results, facts: dict[str, str]) -> None:
    notes = soak = ""
    if RESULTS.exists():
        old = RESULTS.read_text()
        if NOTES_START in old and NOTES_END in old:
            notes = old.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0].strip("\n")
        if SOAK_START in old and SOAK_END in old:  # `make soak`'s section, kept as it is
            section = old.split(SOAK_START, 1)[1].split(SOAK_END, 1)[0]
            soak = f"\n{SOAK_START}{section}{SOAK_END}\n"
    machine_lines = "\n".join(f"- {name}: {value}" for name, value in facts.items())
    fleet = results.fleet
    RESULTS.write_text(
        f"""# invoice-proxy benchmark

Run `make bench` (it installs nginx, wrk, taskset and redis-server from Debian's packages when
missing, then runs `.venv/bin/python -m bench.run`). This file is rewritten by
each run; the notes section below is kept.

Run of {results.started}, on:

{machine_lines}

Set-up, all on 127.0.0.1: each server pinned to core 0, the load generators (wrk,
and bench/loadgen.py in the bench process) to core 1. invoice-proxy runs as in
production: `invoice-proxy serve`, uvloop, one JSON log line per request written
to a file, Prometheus metrics on. nginx 1 worker, `proxy_cache` with
`proxy_cache_lock on` and `proxy_cache_valid 200 1y`, an access log line per
request to a file (bench/nginx.conf.template). "bare aiohttp" is bench/bare.py:
a handler that returns bytes from a dict, no log, no metrics. Throughput is wrk
`-t1 -c{WRK_CONNECTIONS} -d{WRK_DURATION_S}s` rotating over {HOT_INVOICES} cached
invoices, servers alternating, {ROUNDS} rounds. Latency: Debian has no wrk2, so an
open-loop Python generator (bench/loadgen.py) sends at a fixed rate, half of the
proxy's median peak, over {LATENCY_CONNECTIONS} keep-alive connections for
{LATENCY_DURATION_S} s per round, and measures each request from its *scheduled*
send time (no coordinated omission); the table gives the median over the {ROUNDS}
rounds of each round's p50 and p99 (one round disturbed by another process on this
shared machine would otherwise decide a pooled p99), and every round's p99. Before
each measurement the bench calls sync(2): writing back the previous run's request
logs (tens of MB after a throughput run) otherwise stalls both cores for milliseconds.

## Results

{table(results)}

## Fleet (shared level on Redis)

Issue 8's figures. redis-server {fleet.redis_version} (`--save '' --appendonly no`)
runs on core 0 with four more `invoice-proxy serve` processes, started for this
part: "alone" without `[shared]`, and A, B and C with `[shared] redis_url` on that
Redis (fleet budget {FLEET_RATE_PER_MINUTE:,.0f} a minute, burst {FLEET_BURST:,}, so
that it never throttles the bench); otherwise the same configuration as above.
Local-hit throughput: alone and A, both warmed with the {HOT_INVOICES} hot invoices,
the same wrk runs, {FLEET_ROUNDS} rounds alternating which goes first; the ratio is
the median of the rounds' with/without ratios, and the Redis commands are counted by
`INFO commandstats` around each round with `[shared]`. Latency: {FLEET_LATENCY_ROUNDS}
rounds, each requesting {FLEET_LATENCY_INVOICES:,} fresh invoices one at a time over one
keep-alive connection (closed loop, so no queueing) through A (upstream misses that
land in Redis), then the same through B (local misses, shared hits), then through B
again (local hits), and {FLEET_LATENCY_INVOICES:,} other fresh ones through alone
(upstream misses without Redis), then those through alone again (local hits
without Redis); the stand-in answers at once. These latencies are
one request in isolation: not comparable with the open-loop figures above. The
three-proxy burst: A, B and C first fetch {FLEET_WARM_INVOICES} invoices each (warm, as running
replicas are), then {FLEET_REQUESTS} requests, each on its own connection opened beforehand,
are sent in one event-loop turn, every invoice to each of A, B and C; the stand-in
counts the upstream requests.

{fleet_lines(fleet)}

## Targets

{verdict_lines(results)}

## Where the proxy's time goes

{profile_lines(results.profile)}

## Notes

{NOTES_START}
{notes}
{NOTES_END}
{soak}"""
    )


@contextlib.contextmanager
def client_core() -> Iterator[None]:
    """Pin this process (the Python load generator) to the client core."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(CLIENT_CORE)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--profile", action="store_true", help="always record a py-spy profile")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk", "taskset", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make bench`, which installs it")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the benchmark needs 2 cores: one for the servers, one for the load")

    results = Results(started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    hot_ids = [f"hot-{i:03d}" for i in range(HOT_INVOICES)]
    workdir = Path(tempfile.mkdtemp(prefix="invoice-proxy-bench-"))
    setup = Setup(
        workdir=workdir,
        caller_key=secrets.token_urlsafe(32),
        upstream_authorization=f"bench-token-id:pscale_tkn_{secrets.token_hex(16)}",
    )
    processes = Processes()
    try:
        with client_core():
            start_servers(processes, setup, hot_ids)
            processes.note_children()
            load = cpu.wait_for_quiet(processes.pids, NOISE_LIMIT_CORES / 2, START_QUIET_WAIT_S)
            if load.foreign_cores + load.steal_cores > NOISE_LIMIT_CORES / 2:
                print(f"other processes keep {load.foreign_cores:.2f} cores busy: noisy figures")
            measure(processes, setup, results, want_profile=args.profile)
            if not args.profile and not all(ok for _, ok, _ in results.verdicts()[:2]):
                results.profile = profile_proxy(setup, workdir / "hot.lua")
    finally:
        processes.stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(table(results))
    print()
    print(fleet_lines(results.fleet))
    print()
    print(verdict_lines(results))
    if results.profile is not None:
        print()
        print(profile_lines(results.profile))
    if not args.no_write:
        write_results(results, machine())
        print(f"\nwritten: {RESULTS.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
