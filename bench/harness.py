"""What the bench and the soak run on: processes, ports, the servers, and the quiet machine.

Everything here starts, waits for, asks or measures a process; nothing here decides
what a figure means (bench/scenarios.py measures, bench/figures.py judges,
bench/report.py writes). Servers are pinned to SERVER_CORE (but for the second worker
of the workers measurement, which bench/scenarios.py moves), load generators to
CLIENT_CORE. A failure is a `BenchError` with a message for the person at the terminal.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import jwt
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from . import cpu

T = TypeVar("T")

BENCH = Path(__file__).resolve().parent
# The checkout the bench belongs to: every Python process the bench starts (the proxies,
# the stand-in, the bare app) imports `proxy` from here (Processes.start puts it first on
# PYTHONPATH), not from wherever the virtualenv's editable install points.
ROOT = BENCH.parent
# `invoice-proxy serve` is this: the entry point's `main`, run from the checkout.
PROXY_COMMAND = (sys.executable, "-m", "proxy")

SERVER_CORE = "0"
CLIENT_CORE = "1"
ORGANIZATION = "acme"
# The servers of the hit rounds. "invoice-proxy" is the product as configured by
# default (`server.fast_lane = true`); the other proxy differs only in that key.
PROXY, PROXY_OFF, NGINX, BARE = (
    "invoice-proxy",
    "invoice-proxy (fast_lane=false)",
    "nginx",
    "bare aiohttp",
)
SERVERS = (PROXY, PROXY_OFF, NGINX, BARE)
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# Starts of a server on ports found free, one of which another process may take first.
PORT_ATTEMPTS = 3
# A measurement during which other processes used more CPU than this (in cores) is
# repeated (bounded, see Quiet); the table says how loaded the kept ones were.
NOISE_LIMIT_CORES = 0.15
# The fleet budget of the bench's proxies is set far above what the bench asks: it
# must not throttle.
FLEET_RATE_PER_MINUTE = 600_000.0
FLEET_BURST = 100_000
# Issue 15: the bench proxies' JWT caller, and the audience of its token.
JWT_CALLER = "bench-jwt"
JWT_SUBJECT = "system:serviceaccount:bench:bench-jwt"
JWT_AUDIENCE = "invoice-proxy"


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


class Stalled(BenchError):
    """wrk itself was not scheduled for a while (the VM's steal, seconds long at times
    here): its run outlasted its duration, and the requests it had in flight then counted
    as timeouts. Such a run says nothing of the server; it is measured again."""


def invoice_path(invoice_id: str) -> str:
    return f"/v1/organizations/{ORGANIZATION}/invoices/{invoice_id}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports_in_a_row(n: int, attempts: int = 50) -> int:
    """The first of `n` consecutive free ports (`server.workers = n` needs admin ports
    admin_port .. admin_port + n - 1)."""
    for _ in range(attempts):
        first = free_port()
        if first + n - 1 > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise BenchError(f"found no {n} consecutive free ports in {attempts} attempts")


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


def listens_on(pid: int, port: int) -> bool:
    """Process `pid` has a socket listening on 127.0.0.1:`port` (Linux's /proc), not just
    anyone: a port found free may be taken by another process before `pid` binds it."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and local == f"0100007F:{port:04X}":  # LISTEN, little-endian
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return False
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"{fds}/{fd}") in inodes:
                return True
    return False


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - 127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def parse_metrics(text: str) -> dict[str, float]:
    """The `invoice_proxy_*` samples of a /metrics page, by name with labels."""
    values = {}
    for line in text.splitlines():
        if line.startswith("invoice_proxy_") and " " in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def proxy_metrics(admin_port: int) -> dict[str, float]:
    """One proxy's `invoice_proxy_*` samples, by name with labels."""
    _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    return parse_metrics(body.decode())


def metric_sum(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for sample, value in metrics.items():
        ours = sample == name or sample.startswith(name + "{")
        if ours and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += value
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


class Processes:
    """Every process the bench starts; `stop_all` ends each of them, by its own id."""

    def __init__(self) -> None:
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []
        self._children: list[int] = []

    def start(self, name: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        self._files.append(out)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path}
        )
        self._running.append((name, process))
        return process

    def note_children(self) -> None:
        """Remember the children of the started processes (nginx's worker)."""
        self._children = [c for _, p in self._running for c in cpu.children_of(p.pid)]

    def pids(self) -> list[int]:
        return [p.pid for _, p in self._running] + self._children

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to each, newest first; a process still there after `timeout_s` is killed."""
        for _, process in reversed(self._running):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self._running):
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop on SIGTERM; killing it", file=sys.stderr)
                process.kill()
                process.wait(timeout=10)
        for out in self._files:
            out.close()


def wait_until(
    check: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError, redis.ConnectionError, redis.TimeoutError):
            if check():
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not start within {timeout_s:.0f}s (see {log})")


def _tail(log: Path) -> str:
    """The end of a process's log, or why there is none."""
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError as exc:
        return f"({log}: {exc.strerror})"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def proxy_config(
    *,
    port: int,
    admin_port: int,
    upstream_url: str,
    credential: Path,
    caller: str,
    caller_key: str,
    server: Mapping[str, object],
    upstream: Mapping[str, object],
    cache: Mapping[str, object],
    logging: Mapping[str, object],
    shared: Mapping[str, object] | None = None,
    tls: Mapping[str, object] | None = None,
    issuer: Mapping[str, object] | None = None,
) -> str:
    """An `invoice-proxy serve` configuration: on 127.0.0.1, a file credential, one caller
    (a key); with `issuer`, an [[issuers]] table and a second caller named by JWT_SUBJECT;
    with `tls`, [server.tls]."""
    tables: dict[str, Mapping[str, object]] = {
        "server": {"host": "127.0.0.1", "port": port, "admin_port": admin_port, **server},
        **({"server.tls": tls} if tls else {}),
        "upstream": {"base_url": upstream_url, **upstream},
        **({"shared": shared} if shared else {}),
        "credential": {"source": "file"},
        "credential.file": {"path": str(credential)},
        "cache": cache,
        "logging": logging,
    }
    lines = []
    for table, values in tables.items():
        lines += [f"[{table}]", *(f"{key} = {_toml(v)}" for key, v in values.items()), ""]
    digest = hashlib.sha256(caller_key.encode()).hexdigest()
    lines += [
        "[[callers]]",
        f"name = {_toml(caller)}",
        f"key_sha256 = {_toml([digest])}",
        f"organizations = {_toml([ORGANIZATION])}",
    ]
    if issuer:
        lines += ["", "[[issuers]]", *(f"{key} = {_toml(v)}" for key, v in issuer.items())]
        lines += [
            "",
            "[[callers]]",
            f"name = {_toml(JWT_CALLER)}",
            f"jwt_subjects = {_toml([JWT_SUBJECT])}",
            f"organizations = {_toml([ORGANIZATION])}",
        ]
    return "\n".join(lines) + "\n"


def write_credential(workdir: Path, token_id: str, token: str) -> Path:
    """The PlanetScale credential file the proxies read."""
    path = workdir / "planetscale.json"
    path.write_text(json.dumps({"token_id": token_id, "token": token}))
    return path


@dataclass(frozen=True)
class Proxy:
    """One running `invoice-proxy serve`; with `workers` > 1, the supervising parent and
    its workers, worker i with its own admin listener on `admin_port + i`."""

    name: str
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    tls: bool = False  # the API listener serves HTTPS
    workers: int = 1
    log: Path | None = None  # its output: the JSON log lines

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def admin_ports(self) -> list[int]:
        return [self.admin_port + i for i in range(self.workers)]

    def ready(self) -> bool:
        return all(
            http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200 for port in self.admin_ports
        )

    def metrics(self) -> dict[str, float]:
        """The `invoice_proxy_*` samples, summed over the workers."""
        total: dict[str, float] = {}
        for each in self.worker_metrics():
            for sample, value in each.items():
                total[sample] = total.get(sample, 0.0) + value
        return total

    def worker_metrics(self) -> list[dict[str, float]]:
        """Each worker's own samples, by worker index."""
        return [proxy_metrics(port) for port in self.admin_ports]

    def worker_pids(self) -> list[int]:
        """The processes that serve: the process itself, or its forked workers by index
        (as the parent's `workers_started` log line lists them)."""
        if self.workers == 1:
            return [self.pid]
        assert self.log is not None
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "workers_started":
                    pids = [int(pid) for pid in event["pids"]]
                    if sorted(pids) != sorted(cpu.children_of(self.pid)):
                        raise BenchError(f"{self.name}: its workers are not {pids}")
                    return pids
        raise BenchError(f"{self.name}: no workers_started line in {self.log}")

    def rss(self) -> int:
        return rss_bytes(self.pid)


def start_proxy(
    processes: Processes,
    workdir: Path,
    name: str,
    config: Callable[[int, int], str],
    core: str | None = SERVER_CORE,
    command: Sequence[str] = PROXY_COMMAND,
    tls: bool = False,
    workers: int = 1,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Proxy:
    """`invoice-proxy serve` with `config(port, admin_port)`, its output in `{name}.log`;
    pinned to `core` (None: not pinned; "0,1": either core). Returns once it is ready,
    within `start_timeout_s` (`tls`: its API listener serves HTTPS; the admin one stays
    HTTP); with `workers`, once every worker is (the configuration must set
    `server.workers` to as many)."""
    what = f"invoice-proxy ({name})"
    log = workdir / f"{name}.log"  # the JSON request log: written, as in production

    def launch() -> Launched[Proxy]:
        port, admin_port = free_port(), free_ports_in_a_row(workers)
        while admin_port <= port < admin_port + workers:
            port = free_port()
        path = workdir / f"{name}.toml"
        path.write_text(config(port, admin_port))
        argv = [*command, "serve", "--config", str(path)]
        # taskset execs the command: the same process
        process = processes.start(what, argv if core is None else pinned(core, argv), log)
        proxy = Proxy(name, port, admin_port, process, tls, workers, log)
        return Launched(proxy, process, proxy.ready)

    return _on_free_ports(what, launch, log, start_timeout_s)


@dataclass(frozen=True)
class Launched(Generic[T]):
    """A server just started on ports found free: what it is, its process, and whether
    it is ready yet."""

    value: T
    process: subprocess.Popen[bytes]
    ready: Callable[[], bool]


def _on_free_ports(
    what: str, launch: Callable[[], Launched[T]], log: Path, timeout_s: float = START_TIMEOUT_S
) -> T:
    """`launch()`'s server once it is ready (within `timeout_s`, its output in `log`). When
    it ended because a port found free was taken before it bound it, it is launched
    again on other ports, up to PORT_ATTEMPTS times in all."""
    attempt = 0
    while True:
        attempt += 1
        launched = launch()
        try:
            wait_until(launched.ready, what, launched.process, log, timeout_s)
        except BenchError:
            if attempt == PORT_ATTEMPTS or not _port_taken(launched.process, log):
                raise
            print(f"  ({what}: a port was taken before it bound it; trying others)", flush=True)
            continue
        return launched.value


def _port_taken(process: subprocess.Popen[bytes], log: Path) -> bool:
    """The server ended because a port it was given was in use: the proxy's `start_failed`
    line, aiohttp's, http.server's, nginx's and redis-server's errors all say so."""
    return process.poll() is not None and "address already in use" in _tail(log).lower()


def pin(pid: int, core: str) -> None:
    """Move a running process (one of the bench's own) to `core`."""
    os.sched_setaffinity(pid, {int(c) for c in core.split(",")})


@dataclass(frozen=True)
class Servers:
    """The stand-in, the two proxies, nginx and the bare app, running; and how to call them."""

    workdir: Path
    caller_key: str
    upstream_authorization: str
    credential: Path
    standin_port: int
    proxy: Proxy  # PROXY: the fast lane on
    proxy_off: Proxy  # PROXY_OFF: its twin with `server.fast_lane = false`
    ports: dict[str, int]  # by server name (SERVERS)

    @property
    def authorization(self) -> str:
        return f"Bearer {self.caller_key}"

    def standin_stats(self) -> dict[str, Any]:
        _, body = http_get(f"http://127.0.0.1:{self.standin_port}/_control/stats")
        return dict(json.loads(body))

    def start_proxy(
        self,
        processes: Processes,
        name: str,
        redis_url: str = "",
        *,
        issuer: Issuer | None = None,
        tls: TlsPair | None = None,
        fast_lane: bool = True,
        workers: int = 1,
        core: str | None = SERVER_CORE,
        command: Sequence[str] = PROXY_COMMAND,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> Proxy:
        """One more bench proxy; with `redis_url`, the fleet level is on; with `issuer`,
        it has a JWT caller; with `tls`, its API listener serves HTTPS with that pair;
        `fast_lane` and `workers` are the `[server]` keys, `core` where it runs (None:
        either), `command` what runs `invoice-proxy`."""
        return _start_bench_proxy(
            processes, self.workdir, name, self.standin_port, self.credential, self.caller_key,
            redis_url, issuer, tls, fast_lane=fast_lane, workers=workers, core=core,
            command=command, start_timeout_s=start_timeout_s,
        )  # fmt: skip


def _start_bench_proxy(
    processes: Processes,
    workdir: Path,
    name: str,
    standin_port: int,
    credential: Path,
    caller_key: str,
    redis_url: str = "",
    issuer: Issuer | None = None,
    tls: TlsPair | None = None,
    *,
    fast_lane: bool = True,
    workers: int = 1,
    core: str | None = SERVER_CORE,
    command: Sequence[str] = PROXY_COMMAND,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Proxy:
    """A proxy as in production: uvloop, a JSON request log line per request, metrics."""
    upstream: dict[str, object] = {
        # The proxy's own cap on PlanetScale traffic would throttle the fill and the burst.
        "rate_per_s": 100000.0,
        "burst": 100000,
    }
    if redis_url:
        upstream |= {"fleet_rate_per_minute": FLEET_RATE_PER_MINUTE, "fleet_burst": FLEET_BURST}

    def config(port: int, admin_port: int) -> str:
        return proxy_config(
            port=port,
            admin_port=admin_port,
            upstream_url=f"http://127.0.0.1:{standin_port}/v1",
            credential=credential,
            caller="bench",
            caller_key=caller_key,
            server={"max_connections": 4096, "fast_lane": fast_lane, "workers": workers},
            upstream=upstream,
            cache={"max_bytes": 1 << 30},
            logging={"level": "info", "format": "json"},
            shared={"redis_url": redis_url} if redis_url else None,
            tls={"cert_file": str(tls.cert), "key_file": str(tls.key)} if tls else None,
            issuer=issuer.table() if issuer else None,
        )

    return start_proxy(
        processes, workdir, name, config, core=core, command=command, tls=tls is not None,
        workers=workers, start_timeout_s=start_timeout_s,
    )  # fmt: skip


@dataclass(frozen=True)
class TlsPair:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""

    cert: Path
    key: Path


def write_tls_pair(workdir: Path) -> TlsPair:
    """An ECDSA P-256 pair, as cert-manager would issue it (wrk does not verify it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "invoice-proxy bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pair = TlsPair(workdir / "tls.crt", workdir / "tls.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


@dataclass(frozen=True)
class Issuer:
    """A JWT issuer for the bench: its JWKS served as a file by `python -m http.server`
    (on the client core; idle while hits are measured), and the key that signs."""

    port: int
    private_key: rsa.RSAPrivateKey

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def table(self) -> dict[str, object]:
        return {
            "name": "bench",
            "issuer": self.issuer,
            "jwks_url": f"{self.issuer}/jwks.json",
            "audiences": [JWT_AUDIENCE],
        }

    def token(self, lifetime_s: float = 86400.0) -> str:
        """An RS256 token for the JWT caller, as a projected service-account token is."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": [JWT_AUDIENCE],
            "sub": JWT_SUBJECT,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s),
        }
        return jwt.encode(claims, self.private_key, "RS256", headers={"kid": "bench-1"})


def start_issuer(processes: Processes, workdir: Path) -> Issuer:
    """An RSA key, its JWKS in a file, and a static file server for it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    directory = workdir / "issuer"
    directory.mkdir()
    jwks = {"keys": [{**jwk, "kid": "bench-1", "alg": "RS256", "use": "sig"}]}
    (directory / "jwks.json").write_text(json.dumps(jwks))
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    argv += ["--directory", str(directory)]
    port, _ = start_listening(
        processes, "the JWKS server", CLIENT_CORE, lambda port: [*argv, str(port)],
        workdir / "issuer.log",
    )  # fmt: skip
    return Issuer(port, key)


def _nginx_config(prefix: Path, port: int, standin_port: int, authorization: str) -> str:
    text = (BENCH / "nginx.conf.template").read_text()
    values = {
        "@USER@": "user root;" if os.geteuid() == 0 else "",
        "@PREFIX@": str(prefix),
        "@PORT@": str(port),
        "@UPSTREAM_PORT@": str(standin_port),
        "@UPSTREAM_AUTHORIZATION@": authorization,
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def start_listening(
    processes: Processes,
    name: str,
    core: str | None,
    argv: Callable[[int], Sequence[str]],
    log: Path,
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start `argv(port)` on `core` (None: not pinned), on a port found free, and wait
    until it listens there; its port and process. A port taken before it was bound:
    other ports (`PORT_ATTEMPTS`)."""

    def launch() -> Launched[tuple[int, subprocess.Popen[bytes]]]:
        port = free_port()
        command = argv(port)
        process = processes.start(name, command if core is None else pinned(core, command), log)
        return Launched((port, process), process, partial(listens_on, process.pid, port))

    return _on_free_ports(name, launch, log)


def start_servers(processes: Processes, workdir: Path, hot_ids: list[str]) -> Servers:
    """The stand-in, the two proxies, nginx and the bare app, with a fresh caller key and
    upstream token for this run."""
    caller_key = secrets.token_urlsafe(32)
    upstream_authorization = f"bench-token-id:pscale_tkn_{secrets.token_hex(16)}"
    python = sys.executable
    token_id, _, token = upstream_authorization.partition(":")

    # The stand-in is idle while hits are measured; it shares the client core.
    standin_argv = [python, "-m", "proxy.standin", "--token", upstream_authorization]
    standin_port, _ = start_listening(
        processes, "the stand-in", CLIENT_CORE,
        lambda port: [*standin_argv, "--port", str(port)], workdir / "standin.log",
    )  # fmt: skip

    credential = write_credential(workdir, token_id, token)
    proxy = _start_bench_proxy(processes, workdir, "proxy", standin_port, credential, caller_key)
    proxy_off = _start_bench_proxy(
        processes, workdir, "proxy-off", standin_port, credential, caller_key, fast_lane=False
    )

    prefix = workdir / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"

    def nginx_argv(port: int) -> list[str]:
        conf.write_text(_nginx_config(prefix, port, standin_port, upstream_authorization))
        return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                "-g", "daemon off;"]  # fmt: skip

    # Its start-up errors go to its stderr as well as error.log, and so do taskset's.
    nginx_port, _ = start_listening(
        processes, "nginx", SERVER_CORE, nginx_argv, workdir / "nginx.out"
    )

    bare_argv = [python, "-m", "bench.bare", "--organization", ORGANIZATION]
    bare_argv += ["--ids", ",".join(hot_ids)]
    bare_port, _ = start_listening(
        processes, "the bare aiohttp app", SERVER_CORE,
        lambda port: [*bare_argv, "--port", str(port)], workdir / "bare.log",
    )  # fmt: skip

    ports = dict(zip(SERVERS, (proxy.port, proxy_off.port, nginx_port, bare_port), strict=True))
    return Servers(
        workdir, caller_key, upstream_authorization, credential, standin_port, proxy, proxy_off,
        ports,
    )  # fmt: skip


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server and a client for the bench's own questions."""

    port: int
    client: redis.Redis

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        return str(self.client.info("server").get("redis_version", "unknown"))

    def commands(self) -> int:
        """Commands Redis has run since it started, other than the bench's own INFO and the
        fleet purge listener's blocking XREAD (one a second per process, whatever the
        traffic: proxy/purges.py)."""
        stats = self.client.info("commandstats")
        return sum(
            int(value["calls"])
            for name, value in stats.items()
            if name.startswith("cmdstat_") and name not in ("cmdstat_info", "cmdstat_xread")
        )


def start_redis(processes: Processes, workdir: Path) -> RedisServer:
    """redis-server on core 0 with the proxies, no persistence."""
    log = workdir / "redis.log"
    argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--loglevel", "warning"]
    port, process = start_listening(
        processes, "redis-server", SERVER_CORE, lambda port: [*argv, "--port", str(port)], log
    )
    # One connection for the run, opened by the PING below (with redis-py's HELLO), so
    # the bench's own commands after it are the INFO that `commands` leaves out;
    # driver_info=None: no CLIENT SETINFO.
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, driver_info=None)
    wait_until(lambda: bool(client.ping()), "redis-server", process, log)
    return RedisServer(port, client)


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


def wrk_miss_script(path: Path, prefix: str, authorization: str) -> None:
    """Every request a new invoice: `{prefix}1`, `{prefix}2`, ... (one wrk thread, one
    Lua state, so no id comes twice); the stand-in answers each."""
    path.write_text(
        "-- Each request a fresh invoice id: every one is a cache miss.\n"
        f'local prefix = "{invoice_path(prefix)}"\n'
        "local i = 0\n"
        f'wrk.headers["Authorization"] = "{authorization}"\n'
        "request = function()\n"
        "  i = i + 1\n"
        '  return wrk.format("GET", prefix .. i)\n'
        "end\n"
    )


def wrk(port: int, script: Path, duration_s: int, connections: int, scheme: str = "http") -> float:
    """Requests/s of one wrk run on the client core; every answer must be a 2xx.
    `scheme` https: over TLS (Debian's wrk is built with OpenSSL; it does not verify the
    server's certificate), keep-alive connections as for http."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "-s", str(script)]
    argv.append(f"{scheme}://127.0.0.1:{port}")
    out = subprocess.run(
        pinned(CLIENT_CORE, argv),
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        elapsed = _stalled_for(out, duration_s, connections)
        if elapsed is not None:
            raise Stalled(
                f"wrk's {duration_s} s run on port {port} took {elapsed:.1f} s, its requests"
                " in flight timed out"
            )
        raise BenchError(f"wrk saw errors on port {port}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise BenchError(f"no Requests/sec in wrk's output:\n{out}")
    return float(match[1])


_WRK_ELAPSED = re.compile(r"requests in ([\d.]+)(us|ms|s|m),")
_WRK_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def _stalled_for(out: str, duration_s: int, connections: int) -> float | None:
    """How long a wrk run that stalled took (see `Stalled`); None: it did not stall. A
    stall: no error but timeouts, no more of them than connections (the requests in
    flight), and the run at least a second longer than asked."""
    errors, elapsed = _WRK_SOCKET_ERRORS.search(out), _WRK_ELAPSED.search(out)
    if "Non-2xx" in out or errors is None or elapsed is None:
        return None
    connect, read, write, timeouts = (int(n) for n in errors.groups())
    took = float(elapsed[1]) * _WRK_UNITS_S[elapsed[2]]
    if connect or read or write or not 0 < timeouts <= connections or took < duration_s + 1:
        return None
    return took


@contextlib.contextmanager
def client_core() -> Iterator[None]:
    """Pin this process (the Python load generator) to the client core."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(CLIENT_CORE)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Noise:
    """How loaded the machine was during the kept measurements (the table reports it)."""

    repeated: int = 0  # measurements repeated because other processes were busy
    stalled: int = 0  # measurements repeated because wrk stalled (`Stalled`)
    worst_load: float = 0.0  # the most foreign CPU (cores) during a kept measurement


class Quiet:
    """Measurements on a machine that may be shared: each is repeated (at most
    `max_repeats` times, `max_total_repeats` in the run, so the run stays within
    minutes on a busy machine) when other processes took more than NOISE_LIMIT_CORES,
    and (at most `max_repeats` times) when wrk stalled in it."""

    def __init__(
        self,
        processes: Processes,
        noise: Noise,
        *,
        max_repeats: int,
        max_total_repeats: int,
        wait_s: float,
    ) -> None:
        self._processes = processes
        self._noise = noise
        self._max_repeats = max_repeats
        self._max_total_repeats = max_total_repeats
        self._wait_s = wait_s

    def wait(self, timeout_s: float | None = None) -> cpu.Load:
        """Wait (bounded) until other processes use less than half the noise limit."""
        return cpu.wait_for_quiet(
            self._processes.pids,
            NOISE_LIMIT_CORES / 2,
            self._wait_s if timeout_s is None else timeout_s,
        )

    def measure(self, what: str, run: Callable[[], T]) -> tuple[T, cpu.Load]:
        """Run one measurement; repeat it (bounded) when other processes took CPU meanwhile,
        or when wrk stalled in it (`Stalled`: at most `max_repeats` times, whatever the
        run's total, as a stalled run has no figure to keep)."""
        noise = self._noise
        for attempt in range(self._max_repeats + 1):
            # The request logs of the previous measurement (tens of MB at full load) are
            # written back first: that writeback stalls both cores for milliseconds.
            os.sync()
            meter = cpu.Meter(self._processes.pids)
            try:
                value = run()
            except Stalled as exc:
                if attempt == self._max_repeats:
                    raise
                noise.stalled += 1
                print(f"  ({what}: {exc}: repeating)", flush=True)
                self.wait()
                continue
            load = meter.load()
            busy = load.foreign_cores + load.steal_cores
            if (
                busy <= NOISE_LIMIT_CORES
                or attempt == self._max_repeats
                or noise.repeated >= self._max_total_repeats
            ):
                break
            noise.repeated += 1
            print(
                f"  ({what}: other processes took {load.foreign_cores:.2f} cores, "
                f"steal {load.steal_cores:.2f}: repeating)",
                flush=True,
            )
            self.wait()
        noise.worst_load = max(noise.worst_load, busy)
        return value, load
