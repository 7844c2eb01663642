"""`invoice-proxy serve` as a real process: graceful SIGTERM, SIGHUP reloads, workers."""

from __future__ import annotations

import asyncio
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth import Authenticator, key_digest
from proxy.config import CallerConfig, parse_config
from proxy.standin import Behaviour

from . import helpers
from .helpers import (
    ADMIN,
    ADMIN_KEY,
    BILLING,
    BILLING_KEY,
    TOKEN_ID,
    Served,
    Upstream,
    config_dict,
    invoice_path,
    served_process,
    to_toml,
    write_credential,
)
from .processes import port_taken_first


@pytest.fixture
async def served(
    upstream: Upstream, credential_file: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    """`invoice-proxy serve` in a subprocess, once it has started (the first worker, with
    `server.workers`). Parametrize it indirectly with a dict of configuration sections to
    override them."""
    sections = dict(getattr(request, "param", {}))
    server = sections.pop("server", {})
    if "credential" in sections:
        sections["credential"]["file"]["path"] = str(credential_file)

    def data(ports: dict[str, Any]) -> dict[str, Any]:
        return config_dict(
            upstream.base_url, credential_file, server={**ports, **server}, **sections
        )

    async with served_process(
        data, tmp_path, workers=server.get("workers", 1), capture_stderr=True
    ) as served:
        port = int(served.url.rsplit(":", 1)[1])
        assert tomllib.loads(served.config_path.read_text())["server"]["port"] == port
        await served.read_until("started")
        yield served


async def stop(served: Served) -> str:
    """SIGTERM, a clean exit; what the process wrote to stdout and stderr on the way."""
    assert served.process.stdout is not None and served.process.stderr is not None
    served.process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(served.process.communicate(), timeout=20)
    assert served.process.returncode == 0
    return out.decode() + err.decode()


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
    path = served.config_path
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


NOT_A_CONFIG = {
    "not_utf8": (
        b'[server]\nhost = "caf\xe9"\n',
        "not UTF-8 (invalid byte at line 2, column 12); TOML files are UTF-8",
    ),
    "not_toml": (
        b"[server\nport = ",
        "not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 8))",
    ),
}


@pytest.mark.parametrize("name", NOT_A_CONFIG)
async def test_sighup_with_a_file_that_is_not_a_configuration_logs_one_line_and_serves_on(
    served: Served, name: str
) -> None:
    path = served.config_path
    content, problem = NOT_A_CONFIG[name]
    path.write_bytes(content)
    served.process.send_signal(signal.SIGHUP)
    failed = await served.read_until("config_reload_failed")
    assert failed["problems"] == [problem]
    assert failed["level"] == "error" and "exception" not in failed
    async with aiohttp.ClientSession() as session:
        response = await session.get(served.url + invoice_path(), headers=BILLING)
        assert response.status == 200
    # A second SIGHUP, the same answer: the signal handler is still in place.
    served.process.send_signal(signal.SIGHUP)
    assert (await served.read_until("config_reload_failed"))["problems"] == [problem]
    output = await stop(served)
    assert "Traceback" not in output and "During handling" not in output


async def test_sighup_reloads_the_admin_keys(served: Served) -> None:
    path = served.config_path
    new_admin = {"Authorization": f"Bearer {NEW_ADMIN_KEY}"}
    purge = served.admin_url + "/cache/organizations/acme/invoices/inv_2025_01"
    async with aiohttp.ClientSession() as session:
        assert (await session.get(served.url + invoice_path(), headers=BILLING)).status == 200
        assert (await session.delete(purge, headers=new_admin)).status == 401
        text = path.read_text()
        assert f'"{key_digest(ADMIN_KEY)}"' in text
        path.write_text(text.replace(key_digest(ADMIN_KEY), key_digest(NEW_ADMIN_KEY)))
        served.process.send_signal(signal.SIGHUP)
        reloaded = await served.read_until("config_reloaded")
        assert reloaded["admin_keys"] == 1
        assert (await session.delete(purge, headers=ADMIN)).status == 401
        assert (await session.delete(purge, headers=new_admin)).status == 204
        assert (await session.delete(purge, headers=new_admin)).status == 404
        # The purge took: the next request goes to PlanetScale again.
        response = await session.get(served.url + invoice_path(), headers=BILLING)
        assert response.headers["X-Cache"] == "MISS"


NEW_ADMIN_KEY = "admin-rotated-KEY-0123456789abcdefghijklmnopq"


@pytest.mark.parametrize("served", [{"server": {"workers": 2}}], indirect=True)
async def test_sighup_names_the_sections_whose_changes_wait_for_a_restart(
    served: Served,
) -> None:
    """Each worker applies the callers and says which other changed sections it did not."""
    await served.read_until("started")  # the other worker
    path = served.config_path

    async def reloaded() -> list[dict[str, Any]]:
        served.process.send_signal(signal.SIGHUP)
        lines = [await served.read_until("config_reloaded") for _ in range(2)]
        assert sorted(line["worker"] for line in lines) == [0, 1]
        return lines

    # The file as it started: nothing waits (worker 1's own admin port is no change).
    for line in await reloaded():
        assert line["restart_needed"] == [] and line["level"] == "info"
    new_key = "rotated-billing-key-0123456789abcdefghijklmnop"
    data = tomllib.loads(path.read_text())
    data["callers"][0]["key_sha256"].append(key_digest(new_key))
    data["cache"]["max_bytes"] *= 2
    data["logging"] = {"level": "debug"}
    data["issuers"] = [
        {
            "name": "cluster",
            "issuer": "https://kubernetes.default.svc",
            "audiences": ["invoice-proxy"],
            "jwks_url": "https://127.0.0.1:1/jwks",
        }
    ]
    path.write_text(to_toml(data))
    for line in await reloaded():
        assert line["restart_needed"] == ["cache", "logging", "issuers"]
        assert line["level"] == "warning" and line["callers"] == 2
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # new connections: the kernel spreads them over the workers
            response = await session.get(
                served.url + invoice_path(),
                headers={"Authorization": f"Bearer {new_key}", "Connection": "close"},
            )
            assert response.status == 200


class _FailingAuthenticator(Authenticator):
    """Replacing its callers fails with an exception no reload expects."""

    def __init__(self, callers: Iterable[CallerConfig]) -> None:
        super().__init__(callers)
        self.built = True

    def replace(self, callers: Iterable[CallerConfig]) -> None:
        if getattr(self, "built", False):
            raise RuntimeError(f"boom {NEW_ADMIN_KEY}")
        super().replace(callers)


def test_a_reload_that_fails_unexpectedly_logs_the_class_only(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from proxy.__main__ import _reload
    from proxy.app import CALLERS, init_app

    data = config_dict("http://127.0.0.1:1/v1", tmp_path / "cred.json")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    app = init_app(parse_config(data))
    app[CALLERS] = _FailingAuthenticator(parse_config(data).callers)
    with capture_logs() as logs:
        _reload(app, str(path), parse_config(data))
    assert [line["event"] for line in logs] == ["config_reload_failed"]
    assert logs[0]["problems"] == ["the reload failed unexpectedly (RuntimeError)"]
    assert NEW_ADMIN_KEY not in str(logs)


@pytest.mark.parametrize("served", [{"server": {"workers": 2}}], indirect=True)
async def test_two_workers_hand_out_distinct_request_ids(served: Served) -> None:
    """Each worker draws its own id prefix after the fork; no id is handed out twice."""
    await served.read_until("started")  # the other worker
    assert sorted(line["worker"] for line in served.lines if line["event"] == "started") == [0, 1]
    assert served.process.stdout is not None
    drain = asyncio.create_task(served.process.stdout.read())  # the pipe never fills
    ids: list[str] = []
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(200):  # the kernel spreads connections over the two workers
            async with session.get(served.url + invoice_path(), headers=BILLING) as response:
                assert response.status == 200
                ids.append(response.headers["X-Request-ID"])
            if len(ids) >= 40 and len({i[:16] for i in ids}) == 2:
                break
    assert len({i[:16] for i in ids}) == 2, "both workers answered, each with its own prefix"
    assert len(set(ids)) == len(ids)
    served.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(served.process.wait(), timeout=20)
    await drain


class _Failure(Exception):
    pass


def test_a_failure_in_the_service_does_not_carry_the_uvloop_import_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without uvloop the service runs on asyncio; its traceback is its own, with no
    "During handling of the above exception" about the missing module."""
    from proxy.__main__ import _run

    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError

    async def service() -> None:
        raise _Failure

    with pytest.raises(_Failure) as caught:
        _run(service())
    assert caught.value.__context__ is None and caught.value.__cause__ is None


async def test_a_port_taken_after_it_was_found_free_is_tried_again_on_other_ports(
    upstream: Upstream, credential_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race every test with a process runs: a port found free is taken by another
    process before `serve` binds it. The process logs `start_failed`, and the test
    helper starts it again on other ports instead of failing the test."""
    with port_taken_first(helpers, monkeypatch) as busy:

        def data(ports: dict[str, Any]) -> dict[str, Any]:
            return config_dict(upstream.base_url, credential_file, server=ports)

        async with served_process(data, tmp_path) as served:
            assert served.url != f"http://127.0.0.1:{busy}"
            await served.read_until("started")
            async with aiohttp.ClientSession() as session:
                response = await session.get(served.url + invoice_path(), headers=BILLING)
                assert response.status == 200
    assert (tmp_path / f"config-{busy}.toml").exists(), "the first attempt had the taken port"


GROWING_CACHE = {
    "cache": {"max_bytes": 64 << 20},
    "upstream": {"rate_per_s": 100_000.0, "burst": 10_000},
}


@pytest.mark.parametrize("served", [GROWING_CACHE], indirect=True)
async def test_a_cache_growing_under_misses_runs_the_garbage_collector_rarely(
    served: Served, upstream: Upstream
) -> None:
    """Each miss leaves an entry alive: with CPython's default threshold these 3,000
    misses ran 28 young collections and 2 of the middle generation, and a cache growing
    on ran full ones that walk every entry (0.15 s each at 200,000 entries; see
    GC_YOUNG_THRESHOLD). The proxy counts its collections on /metrics (prometheus_client's)."""

    async def collections(session: aiohttp.ClientSession) -> list[float]:
        async with session.get(served.admin_url + "/metrics") as response:
            page = helpers.scraped(await response.text())
        return [
            helpers.metric(page, "python_gc_collections_total", generation=str(g)) for g in range(3)
        ]

    async def drain() -> None:  # the request lines: a full pipe would hold the proxy
        assert served.process.stdout is not None
        while await served.process.stdout.readline():
            pass

    draining = asyncio.create_task(drain())
    connector = aiohttp.TCPConnector(limit=10)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await collections(session)

        async def fetch(n: int) -> int:
            path = invoice_path("acme", f"inv_grow_{n}")
            async with session.get(served.url + path, headers=BILLING) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(fetch(n) for n in range(3000)))
        after = await collections(session)
    draining.cancel()
    assert statuses == [200] * 3000
    assert upstream.standin.stats.requests == 3000
    young, middle, full = (a - b for a, b in zip(after, before, strict=True))
    assert young <= 1 and middle == 0 and full == 0, (young, middle, full)
