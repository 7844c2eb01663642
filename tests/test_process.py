"""`invoice-proxy serve` as a real process: graceful SIGTERM, SIGHUP reload of callers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth import key_digest
from proxy.standin import Behaviour

from .conftest import (
    BILLING,
    BILLING_KEY,
    TOKEN_ID,
    Upstream,
    config_dict,
    invoice_path,
    write_credential,
)
from .processes import free_port


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
    def __init__(self, process: asyncio.subprocess.Process, port: int, admin_port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.lines: list[dict[str, Any]] = []

    async def read_until(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                assert raw, f"process ended before {event!r}"
                line = json.loads(raw)
                self.lines.append(line)
                if line["event"] == event:
                    return line


@pytest.fixture
async def served(
    upstream: Upstream, credential_file: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    """`invoice-proxy serve` in a subprocess. Parametrize it indirectly with a dict of
    configuration sections to override them."""
    port, admin_port = free_port(), free_port()
    sections = dict(getattr(request, "param", {}))
    if "credential" in sections:
        sections["credential"]["file"]["path"] = str(credential_file)
    data = config_dict(
        upstream.base_url,
        credential_file,
        server={"port": port, "admin_port": admin_port},
        **sections,
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    assert tomllib.loads(path.read_text())["server"]["port"] == port
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(path),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    served = Served(process, port, admin_port)
    served.config_path = path  # type: ignore[attr-defined]
    try:
        await served.read_until("started")
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(
    served: Served, upstream: Upstream
) -> None:
    upstream.standin.behave("inv_slow", Behaviour("slow", delay_s=1.0))
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(
            session.get(served.url + invoice_path("acme", "inv_slow"), headers=BILLING)
        )
        await asyncio.sleep(0.3)
        served.process.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(in_flight, timeout=10)
        assert response.status == 200
        assert (await response.json())["id"] == "inv_slow"
        assert await asyncio.wait_for(served.process.wait(), timeout=15) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(served.url + invoice_path(), headers=BILLING)
    await served.read_until("stopped")
    assert any(line["event"] == "stopping" for line in served.lines)


async def test_sighup_reloads_caller_keys_and_keeps_running_on_a_bad_file(
    served: Served,
) -> None:
    path: Path = served.config_path  # type: ignore[attr-defined]
    new_key = "rotated-billing-key-0123456789abcdefghijklmnop"
    async with aiohttp.ClientSession() as session:
        url = served.url + invoice_path()
        assert (
            await session.get(url, headers={"Authorization": f"Bearer {new_key}"})
        ).status == 401
        # Overlap: the old and the new digest both valid.
        text = path.read_text().replace(
            f'"{key_digest(BILLING_KEY)}"', f'"{key_digest(BILLING_KEY)}", "{key_digest(new_key)}"'
        )
        path.write_text(text)
        served.process.send_signal(signal.SIGHUP)
        await served.read_until("config_reloaded")
        assert (
            await session.get(url, headers={"Authorization": f"Bearer {new_key}"})
        ).status == 200
        assert (await session.get(url, headers=BILLING)).status == 200
        # A broken file: every problem logged, the running configuration kept.
        path.write_text(text.replace("[cache]", "[cache]\nsize = 1\n"))
        served.process.send_signal(signal.SIGHUP)
        failed = await served.read_until("config_reload_failed")
        assert "cache.size: unknown key" in failed["problems"]
        assert (
            await session.get(url, headers={"Authorization": f"Bearer {new_key}"})
        ).status == 200


HOURLY = {"credential": {"source": "file", "file": {"path": "", "poll_interval_s": 3600}}}


@pytest.mark.parametrize("served", [HOURLY], indirect=True)
async def test_sighup_reads_the_credential_at_once(
    served: Served, upstream: Upstream, credential_file: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await session.get(served.url + invoice_path("acme", "a"), headers=BILLING)).ok
        write_credential(credential_file, TOKEN_ID, "token-after-sighup")
        served.process.send_signal(signal.SIGHUP)
        reloaded = await served.read_until("credential_reloaded")
        assert reloaded["source"] == "file"
        upstream.standin.accept_only(f"{TOKEN_ID}:token-after-sighup")
        response = await session.get(served.url + invoice_path("acme", "b"), headers=BILLING)
        assert response.status == 200
    # A refusal would have shown: the new token was in use before the first request.
    assert upstream.standin.stats.unauthorized == 0
