"""The helpers every test module uses: one of each.

- `metric()` reads one series, from a registry the test holds or from a scraped page;
- `get()` asks a proxy for one invoice as a caller;
- `running_proxy()` starts a proxy in this process (behind aiohttp's test clients, or on
  the real listener), and `served_process()` starts `python -m proxy serve` as a process;
- `to_toml()` writes the test configuration for a process; `wait_until()` polls a state.

Fixtures built on these (`make_proxy`, `upstream`, `credential_file`) are in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.app import ADMIN_APP, LANE, METRICS, init_app
from proxy.auth import key_digest
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config import Config
from proxy.credential import CredentialSource
from proxy.metrics import Metrics
from proxy.server import ProxyRunner
from proxy.standin import StandIn

from .processes import free_port, free_ports

TOKEN_ID = "pscale_tkn_id_test01"
TOKEN = "pscale_tkn_SECRETVALUE0123456789abcdefABCDEF"
UPSTREAM_HEADER = f"{TOKEN_ID}:{TOKEN}"
# Caller keys as `invoice-proxy new-caller-key` makes them.
BILLING_KEY = "billing-KEY-0123456789abcdefghijklmnopqrstuvwxyz"
REPORTING_KEY = "reporting-KEY-0123456789abcdefghijklmnopqrstuvwx"
ADMIN_KEY = "admin-KEY-0123456789abcdefghijklmnopqrstuvwxyzAB"
# A caller a test gives a tiny rate of its own (not among config_dict's callers).
METERED_KEY = "metered-KEY-0123456789abcdefghijklmnopqrstuvwxy"
SECRETS = (TOKEN, BILLING_KEY, REPORTING_KEY, ADMIN_KEY, METERED_KEY)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BILLING = bearer(BILLING_KEY)
REPORTING = bearer(REPORTING_KEY)
ADMIN = bearer(ADMIN_KEY)

INVOICE_PATH = "/v1/organizations/{org}/invoices/{id}"


def invoice_path(org: str = "acme", invoice_id: str = "inv_2025_01") -> str:
    return INVOICE_PATH.format(org=org, id=invoice_id)


@dataclass
class Upstream:
    """The running stand-in: its state (`.standin`) and its base URL."""

    standin: StandIn
    base_url: str
    port: int


def write_credential(path: Path, token_id: str = TOKEN_ID, token: str = TOKEN) -> None:
    """Write the credential file atomically, as Vault Agent does (rename over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"token_id": token_id, "token": token}))
    os.replace(tmp, path)


def config_dict(base_url: str, credential_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A valid configuration as a TOML-shaped dict; `sections` are merged over it."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 18080, "admin_port": 19090},
        "upstream": {
            "base_url": base_url,
            "timeout_s": 2.0,
            "deadline_s": 4.0,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "rate_per_s": 1000.0,
            "burst": 1000,
        },
        "credential": {
            "source": "file",
            "file": {"path": str(credential_path), "poll_interval_s": 0.05},
        },
        "cache": {"max_bytes": 1 << 20},
        "admin": {"key_sha256": [key_digest(ADMIN_KEY)]},
        "callers": [
            {
                "name": "billing-service",
                "key_sha256": [key_digest(BILLING_KEY)],
                "organizations": ["acme"],
            },
            {
                "name": "reporting",
                "key_sha256": [key_digest(REPORTING_KEY)],
                "organizations": ["*"],
            },
        ],
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return data


class FakeClock:
    """Time that moves only when the test advances it, given to `init_app` as its `Clock`.

    By default it fakes wall time only (cache freshness); the monotonic clock and sleeps
    stay real, so deadlines and timeouts still end. With `monotonic=True` the monotonic
    clock is fake too (the circuit breaker, rate caps, retry intervals, the credential
    refresher): `advance` moves both, and a `sleep` ends when the test has advanced the
    clock past it, never by itself.
    """

    def __init__(self, start: float = 1_800_000_000.0, *, monotonic: bool = False) -> None:
        self.now = start
        self.fake_monotonic = monotonic
        self.monotonic_now = 1_000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.monotonic_now if self.fake_monotonic else time.monotonic()

    async def sleep(self, seconds: float) -> None:
        if not self.fake_monotonic:
            await asyncio.sleep(seconds)
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.monotonic_now + seconds, woken))
        await woken

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        if not self.fake_monotonic:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=seconds)
            return
        waits = (asyncio.ensure_future(self.sleep(seconds)), asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.monotonic_now += seconds
        due = [(at, woken) for at, woken in self._sleepers if at <= self.monotonic_now]
        self._sleepers = [s for s in self._sleepers if s not in due]
        for _, woken in due:
            if not woken.done():
                woken.set_result(None)

    async def run_for(self, seconds: float, step: float) -> None:
        """Advance `seconds` in steps of `step`, letting the loop run what each step wakes."""
        for _ in range(round(seconds / step)):
            self.advance(step)
            for _ in range(5):
                await asyncio.sleep(0)


# --- metrics -----------------------------------------------------------------------------

# The sample names a metric family exports, by the family's name.
_SAMPLE_SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created", "_info")


class _Scraped(Collector):
    """The families of a scraped page, as a collector a registry can hold."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def scraped(page: str) -> CollectorRegistry:
    """A metrics page (another process's /metrics) as a registry `metric()` can read."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scraped(text_string_to_metric_families(page)))
    return registry


def _registry(where: Any) -> CollectorRegistry:
    if isinstance(where, CollectorRegistry):
        return where
    if isinstance(where, str):
        return scraped(where)
    if isinstance(where, Metrics):
        return where.registry
    if isinstance(where, web.Application):
        return where[METRICS].registry
    if isinstance(where, Proxy):
        return where.app[METRICS].registry
    raise TypeError(f"no metrics in {type(where).__name__}")


def metric(where: Any, name: str, **labels: str) -> float:
    """The value of the series `name{labels}` in `where` (a proxy, its app, its `Metrics`,
    a registry, or a scraped page).

    A labelled series of a registered metric that nothing has counted yet is 0, as
    Prometheus reads it; a name no metric exports fails the test (a typo is not a 0).
    """
    registry = _registry(where)
    value = registry.get_sample_value(name, labels)
    if value is not None:
        return value
    exported = {f.name + s for f in registry.collect() for s in _SAMPLE_SUFFIXES}
    assert name in exported, f"no metric exports {name}"
    return 0.0


def metric_by(where: Any, name: str, label: str) -> dict[str, float]:
    """Every series of `name` that has `label`, by the label's value."""
    return {
        sample.labels[label]: sample.value
        for family in _registry(where).collect()
        for sample in family.samples
        if sample.name == name and label in sample.labels
    }


async def assert_error(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, str]:
    """The response is SPEC's JSON error with `status` and `code`; its body."""
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["code"] == code
    assert set(body) == {"code", "message"} and body["message"]
    assert response.headers["X-Request-ID"]
    return dict(body)


# --- in-process proxies ------------------------------------------------------------------

Client = TestClient[web.Request, web.Application] | aiohttp.ClientSession


@dataclass
class Proxy:
    """A running proxy: API and admin clients (paths relative to each listener), its
    ports, and the app for its objects."""

    api: Client
    admin: Client
    app: web.Application
    config: Config
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@asynccontextmanager
async def running_proxy(
    config: Config,
    *,
    clock: Clock = SYSTEM_CLOCK,
    source: CredentialSource | None = None,
    metrics: Metrics | None = None,
    listen: bool = False,
) -> AsyncIterator[Proxy]:
    """`init_app(config)` served on 127.0.0.1, for as long as the block runs.

    By default behind aiohttp's test servers (`api`, `admin` are `TestClient`s); with
    `listen`, on the service's own listener (`ProxyRunner`: its header limits, timeouts
    and protocol), with `api`, `admin` plain client sessions on its ports (HTTPS with
    `[server.tls]`, the admin listener's with its `admin`; the sessions do not trust the
    test's CA: a test brings its own client context).
    """
    app = init_app(config, source=source, metrics=metrics, clock=clock)
    async with AsyncExitStack() as stack:
        clients: list[Client] = []
        ports: list[int] = []
        for served in (app, app[ADMIN_APP]):
            if listen:
                runner = ProxyRunner(served, config.server, served.get(LANE))
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                tls = config.server.tls
                context = None
                if tls is not None and (served is app or tls.admin):
                    from proxy.app import TLS

                    context = app[TLS].context  # loaded by the application's start-up
                port = await runner.listen("127.0.0.1", 0, ssl_context=context)
                scheme = "https" if context is not None else "http"
                session = aiohttp.ClientSession(f"{scheme}://127.0.0.1:{port}")
                clients.append(await stack.enter_async_context(session))
            else:
                client = await stack.enter_async_context(TestClient(TestServer(served)))
                port = client.port
                clients.append(client)
            ports.append(port)
        yield Proxy(clients[0], clients[1], app, config, ports[0], ports[1])


ProxyFactory = Callable[..., Awaitable[Proxy]]


async def get(
    proxy: Proxy,
    invoice_id: str = "inv_2025_01",
    *,
    org: str = "acme",
    headers: dict[str, str] = BILLING,
    **extra: str,
) -> aiohttp.ClientResponse:
    """GET one invoice as the caller of `headers` (billing-service), with `extra` headers;
    the body is read (`read()`, `json()` return it) and the connection released."""
    response = await proxy.api.get(invoice_path(org, invoice_id), headers={**headers, **extra})
    await response.read()
    return response


@dataclass
class Timed:
    response: aiohttp.ClientResponse
    elapsed: float


async def timed_get(proxy: Proxy, invoice_id: str = "inv_2025_01", **kwargs: Any) -> Timed:
    """`get`, and how long it took on the monotonic clock."""
    start = time.monotonic()
    response = await get(proxy, invoice_id, **kwargs)
    return Timed(response, time.monotonic() - start)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll a state of the proxy (nothing to wait on) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- proxies as processes -----------------------------------------------------------------


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for our config dicts (tables, arrays of tables, scalars, lists)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append((f"[{key}]", item))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}{key}" if not key.startswith("[") else f"[{prefix}{key[1:-1]}]"
        out += f"\n[{name}]\n" + to_toml(
            value, f"{prefix}{key}." if not key.startswith("[") else ""
        )
    return out


class Served:
    """`python -m proxy serve` in a subprocess: its JSON log lines on stdout, its URLs."""

    def __init__(
        self, process: asyncio.subprocess.Process, port: int, admin_port: int, config_path: Path
    ) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.config_path = config_path
        self.lines: list[dict[str, Any]] = []  # every line read, in order
        self._unseen = 0  # how many of the last `lines` no `read_until` has passed yet

    async def read_until(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        """The next line of `event` (past the lines an earlier call returned or passed)."""
        async with asyncio.timeout(timeout):
            while True:
                if self._unseen:
                    line = self.lines[-self._unseen]
                    self._unseen -= 1
                else:
                    line = await self._read_line(event)
                if line["event"] == event:
                    return line

    async def _read_line(self, waiting_for: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            await asyncio.wait_for(self.process.wait(), timeout=10)
            raise AssertionError(
                f"process ended (exit code {self.process.returncode}) before"
                f" {waiting_for!r}; its last lines: {self.lines[-5:]}"
            )
        line: dict[str, Any] = json.loads(raw)
        self.lines.append(line)
        return line

    async def start(self, workers: int) -> bool:
        """Read until each worker has started (the lines stay for `read_until`); False if
        one could not bind its port (another process took it since it was found free)."""
        started = 0
        while started < workers:
            line = await asyncio.wait_for(self._read_line("started"), timeout=15)
            self._unseen += 1
            if line["event"] == "start_failed" and "Address already in use" in line["error"]:
                return False
            started += line["event"] == "started"
        return True


@asynccontextmanager
async def served_process(
    data: Callable[[dict[str, Any]], dict[str, Any]],
    tmp_path: Path,
    *,
    workers: int = 1,
    capture_stderr: bool = False,
    attempts: int = 3,
) -> AsyncIterator[Served]:
    """`python -m proxy serve` on free ports, once each worker has started; `data(server)`
    is its configuration, given the [server] table with those ports. A port found free
    can be taken before the process binds it: then it starts again, on other ports, up to
    `attempts` times. Killed with its workers at the end, whatever happened (the test
    stops it itself to see a clean exit)."""
    for attempt in range(1, attempts + 1):
        admin_ports = free_ports(workers)
        port = free_port()
        while port in admin_ports:
            port = free_port()
        config = data({"port": port, "admin_port": admin_ports[0]})
        path = tmp_path / f"config-{port}.toml"
        path.write_text(to_toml(config))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if capture_stderr else None,
            start_new_session=True,
        )  # fmt: skip
        try:
            served = Served(process, port, admin_ports[0], path)
            if await served.start(workers):
                yield served
                return
            assert attempt < attempts, f"no free ports in {attempts} attempts: {served.lines}"
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)  # the workers too, whatever happened
            await asyncio.wait_for(process.wait(), timeout=10)


async def one_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and head of the next answer on a connection (its body read past)."""
    async with asyncio.timeout(5):
        answer_head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", answer_head)
        await reader.readexactly(int(length[1]) if length else 0)
    return int(answer_head[9:12]), answer_head
