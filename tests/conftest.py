"""Shared fixtures: a real PlanetScale stand-in, a real credential file, the real app.

What they build (and every other helper) is in helpers.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config import Config, parse_config
from proxy.credential import CredentialSource
from proxy.metrics import Metrics
from proxy.standin import StandIn, start

from .helpers import (
    SECRETS,
    UPSTREAM_HEADER,
    Proxy,
    ProxyFactory,
    Upstream,
    config_dict,
    running_proxy,
    write_credential,
)
from .redis_server import RedisServer


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    standin = StandIn([UPSTREAM_HEADER])
    runner, port = await start(standin)
    try:
        yield Upstream(standin, f"http://127.0.0.1:{port}/v1", port)
    finally:
        await runner.cleanup()


@pytest.fixture
def credential_file(tmp_path: Path) -> Path:
    path = tmp_path / "planetscale.json"
    write_credential(path)
    return path


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis of its own for the test."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def inspect(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the proxy stored."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make_proxy(upstream: Upstream, credential_file: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxies against the stand-in, stopped at the end of the test (the last first).

    Keyword arguments override config sections, or `config` replaces the configuration;
    `clock`, `source` and `metrics` go to `init_app`; `listen` serves on the real listener
    (see `running_proxy`).
    """
    async with AsyncExitStack() as stack:

        async def make(
            clock: Clock = SYSTEM_CLOCK,
            *,
            config: Config | None = None,
            source: CredentialSource | None = None,
            metrics: Metrics | None = None,
            listen: bool = False,
            **sections: dict[str, Any],
        ) -> Proxy:
            if config is None:
                config = parse_config(config_dict(upstream.base_url, credential_file, **sections))
            running = running_proxy(
                config, clock=clock, source=source, metrics=metrics, listen=listen
            )
            return await stack.enter_async_context(running)

        yield make


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


# What must never reach a log line, an error or anything else the proxy prints, in any
# test: the test's own token and keys, any JWT, any private key. Everything the proxy
# logs in-process goes to the output pytest captures for each test; a test whose
# captured output holds one fails, whatever it asserted itself.
_LEAKS = re.compile(
    "|".join(re.escape(secret) for secret in SECRETS)
    + r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    + r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed:
        return
    captured = report.capstdout + report.capstderr + report.caplog
    leak = _LEAKS.search(captured)
    if leak is not None:
        report.outcome = "failed"
        kind = "a JWT" if leak.group().startswith("eyJ") else "a secret"
        report.longrepr = f"{kind} reached the captured output (log lines, errors, prints)"
