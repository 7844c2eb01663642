"""Shared set-up: a real PlanetScale stand-in, a real credential file, the real app."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import ADMIN_APP, init_app
from proxy.auth import key_digest
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config import Config, parse_config
from proxy.standin import StandIn, start

TOKEN_ID = "pscale_tkn_id_test01"
TOKEN = "pscale_tkn_SECRETVALUE0123456789abcdefABCDEF"
UPSTREAM_HEADER = f"{TOKEN_ID}:{TOKEN}"
# Caller keys as `invoice-proxy new-caller-key` makes them.
BILLING_KEY = "billing-KEY-0123456789abcdefghijklmnopqrstuvwxyz"
REPORTING_KEY = "reporting-KEY-0123456789abcdefghijklmnopqrstuvwx"
ADMIN_KEY = "admin-KEY-0123456789abcdefghijklmnopqrstuvwxyzAB"
SECRETS = (TOKEN, BILLING_KEY, REPORTING_KEY, ADMIN_KEY)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BILLING = bearer(BILLING_KEY)
REPORTING = bearer(REPORTING_KEY)
ADMIN = bearer(ADMIN_KEY)


@dataclass
class Upstream:
    """The running stand-in: its state (`.standin`) and its base URL."""

    standin: StandIn
    base_url: str
    port: int


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    standin = StandIn([UPSTREAM_HEADER])
    runner, port = await start(standin)
    try:
        yield Upstream(standin, f"http://127.0.0.1:{port}/v1", port)
    finally:
        await runner.cleanup()


def write_credential(path: Path, token_id: str = TOKEN_ID, token: str = TOKEN) -> None:
    """Write the credential file atomically, as Vault Agent does (rename over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"token_id": token_id, "token": token}))
    os.replace(tmp, path)


@pytest.fixture
def credential_file(tmp_path: Path) -> Path:
    path = tmp_path / "planetscale.json"
    write_credential(path)
    return path


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


@dataclass
class Proxy:
    """A running proxy: API and admin clients, and the app for its objects."""

    api: TestClient[web.Request, web.Application]
    admin: TestClient[web.Request, web.Application]
    app: web.Application
    config: Config


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def make_proxy(aiohttp_client: Any, upstream: Upstream, credential_file: Path) -> ProxyFactory:
    """Start a proxy against the stand-in; keyword arguments override config sections."""

    async def make(clock: Clock = SYSTEM_CLOCK, **sections: dict[str, Any]) -> Proxy:
        config = parse_config(config_dict(upstream.base_url, credential_file, **sections))
        app = init_app(config, clock=clock)
        api = await aiohttp_client(app)
        admin = await aiohttp_client(app[ADMIN_APP])
        return Proxy(api, admin, app, config)

    return make


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


class FakeClock:
    """Time (wall or monotonic, as the code under test reads it) that moves only when
    the test advances it.

    Given to `init_app` as its `Clock`, it fakes wall time only (cache freshness); the
    monotonic clock and sleeps stay real, so deadlines and timeouts still end.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


INVOICE_PATH = "/v1/organizations/{org}/invoices/{id}"


def invoice_path(org: str = "acme", invoice_id: str = "inv_2025_01") -> str:
    return INVOICE_PATH.format(org=org, id=invoice_id)
