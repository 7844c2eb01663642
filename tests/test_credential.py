"""The file and env credential sources: readiness, bad files, rotation under load."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from proxy.app import CREDENTIALS
from proxy.credential import CredentialError, EnvSource, FileSource
from proxy.metrics import Metrics

from .helpers import (
    BILLING,
    TOKEN,
    TOKEN_ID,
    UPSTREAM_HEADER,
    ProxyFactory,
    Upstream,
    invoice_path,
    wait_until,
    write_credential,
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "is empty"),
        ('{"token_id": "a", "token": ', "is not valid JSON"),
        ('{"token_id": "a"}', "field 'token' is missing"),
        ('{"token_id": "a", "token": "  "}', "field 'token' is empty"),
        ('{"token_id": "a", "token": 5}', "field 'token' is not a string"),
        ('["a", "b"]', "expected a JSON object"),
        # The parser's own limits: nesting deeper than it goes, an integer too long.
        ("[" * 60_000, "is not valid JSON"),
        ('{"token_id": "a", "token": ' + "1" * 5000 + "}", "is not valid JSON"),
    ],
)
async def test_bad_file_is_refused_with_a_reason_and_never_the_value(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(CredentialError) as caught:
        await FileSource(str(path)).fetch(force=True)
    assert reason in str(caught.value)
    assert '"a"' not in str(caught.value)


async def test_env_source_names_the_missing_variable() -> None:
    with pytest.raises(CredentialError, match="PS_TOKEN is not set"):
        await EnvSource("PS_ID", "PS_TOKEN", {"PS_ID": "x"}).fetch(force=True)
    credential = await EnvSource("PS_ID", "PS_TOKEN", {"PS_ID": "x", "PS_TOKEN": "y"}).fetch(True)
    assert credential is not None and credential.header == "x:y"
    assert "y" not in repr(credential)


async def test_service_becomes_ready_by_itself_when_the_file_appears(
    make_proxy: ProxyFactory, credential_file: Path
) -> None:
    credential_file.unlink()
    proxy = await make_proxy()
    assert (await proxy.admin.get("/readyz")).status == 503
    assert (await proxy.api.get(invoice_path(), headers=BILLING)).status == 503
    write_credential(credential_file)
    store = proxy.app[CREDENTIALS]
    await wait_until(lambda: store.current is not None, "the first load")
    assert (await proxy.admin.get("/readyz")).status == 200
    assert (await proxy.api.get(invoice_path(), headers=BILLING)).status == 200


async def test_half_written_file_keeps_the_last_good_credential(
    make_proxy: ProxyFactory, credential_file: Path
) -> None:
    proxy = await make_proxy()
    store = proxy.app[CREDENTIALS]
    credential_file.write_text('{"token_id": "new", "tok')
    await store.refresh()
    assert store.current is not None and store.current.token == TOKEN
    assert (await proxy.api.get(invoice_path(), headers=BILLING)).status == 200
    page = await (await proxy.admin.get("/metrics")).text()
    assert 'invoice_proxy_credential_reloads_total{result="failure"} 1.0' in page
    assert "invoice_proxy_credential_loaded 1.0" in page


async def run_load_during(
    proxy_get: object, rotate: object, duration: float = 1.5, workers: int = 20
) -> list[int]:
    """`workers` callers request fresh invoices for `duration` s while `rotate` runs."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            statuses.append(await proxy_get(f"inv_w{n}_{i}"))  # type: ignore[operator]

    tasks = [asyncio.create_task(worker(n)) for n in range(workers)]
    await asyncio.sleep(duration / 3)
    await rotate()  # type: ignore[operator]
    await asyncio.sleep(duration * 2 / 3)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    return statuses


@pytest.mark.parametrize("grace", [0.0, 0.3], ids=["hard-switch", "overlap"])
async def test_atomic_file_replace_under_load_fails_no_request(
    make_proxy: ProxyFactory, upstream: Upstream, credential_file: Path, grace: float
) -> None:
    proxy = await make_proxy()

    async def get(invoice_id: str) -> int:
        response = await proxy.api.get(invoice_path("acme", invoice_id), headers=BILLING)
        return response.status

    async def rotate() -> None:
        # PlanetScale accepts both tokens during `grace`, then only the new one.
        upstream.standin.accept_only(UPSTREAM_HEADER, f"{TOKEN_ID}:rotated-token")
        write_credential(credential_file, TOKEN_ID, "rotated-token")
        await asyncio.sleep(grace)
        upstream.standin.accept_only(f"{TOKEN_ID}:rotated-token")

    statuses = await run_load_during(get, rotate)
    assert len(statuses) > 50
    assert set(statuses) == {200}
    store = proxy.app[CREDENTIALS]
    assert store.current is not None and store.current.token == "rotated-token"


async def test_kubernetes_secret_symlink_swap_under_load_fails_no_request(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """A Secret volume: file -> ..data/file, and ..data is swapped by an atomic rename."""
    mount = tmp_path / "secret"
    mount.mkdir()

    def render(version: str, token: str) -> None:
        data_dir = mount / f"..{version}"
        data_dir.mkdir()
        (data_dir / "planetscale.json").write_text(
            json.dumps({"token_id": TOKEN_ID, "token": token})
        )
        link = mount / "..data_tmp"
        link.symlink_to(data_dir.name)
        os.replace(link, mount / "..data")

    render("v1", TOKEN)
    (mount / "planetscale.json").symlink_to("..data/planetscale.json")
    proxy = await make_proxy(
        credential={
            "source": "file",
            "file": {"path": str(mount / "planetscale.json"), "poll_interval_s": 0.05},
        }
    )

    async def get(invoice_id: str) -> int:
        response = await proxy.api.get(invoice_path("acme", invoice_id), headers=BILLING)
        return response.status

    async def rotate() -> None:
        render("v2", "swapped-token")
        upstream.standin.accept_only(f"{TOKEN_ID}:swapped-token")

    statuses = await run_load_during(get, rotate)
    assert set(statuses) == {200}
    store = proxy.app[CREDENTIALS]
    assert store.current is not None and store.current.token == "swapped-token"


async def test_a_burst_of_refusals_reloads_the_credential_once(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_credential(path)

    class CountingFileSource(FileSource):
        forced = 0

        async def fetch(self, force: bool):  # type: ignore[no-untyped-def]
            if force:
                CountingFileSource.forced += 1
            return await super().fetch(force)

    from proxy.credential import CredentialStore

    store = CredentialStore(CountingFileSource(str(path)), Metrics())
    await store.refresh(force=True)
    rejected = store.current
    assert rejected is not None
    write_credential(path, TOKEN_ID, "new-token")
    results = await asyncio.gather(*(store.reload_after_rejection(rejected) for _ in range(50)))
    assert CountingFileSource.forced == 2  # the first load, then one reload for all 50
    assert {r.token for r in results if r} == {"new-token"}
