"""The token is read when the request is sent: after every wait, and for the retry after a
refusal; while a reload after a refusal is under way, new sends wait for it.

File-source rotations against the stand-in (the real-OpenBao run under a contended CPU is
in test_vault.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from aiohttp import web

from proxy.app import CREDENTIALS
from proxy.credential import Credential, FileSource

from .helpers import (
    Proxy,
    ProxyFactory,
    Upstream,
    get,
    wait_until,
    write_credential,
)

NEW_TOKEN_ID = "pscale_tkn_id_test02"
NEW_TOKEN = "pscale_tkn_NEWSECRETVALUE0123456789abcdefABC"
NEW_HEADER = f"{NEW_TOKEN_ID}:{NEW_TOKEN}"


async def status(proxy: Proxy, invoice_id: str) -> int:
    return (await get(proxy, invoice_id)).status


def header_in_use(app: web.Application) -> str | None:
    current = app[CREDENTIALS].current
    return None if current is None else current.header


async def test_fetches_that_waited_for_the_rate_cap_send_the_token_current_then(
    make_proxy: ProxyFactory, upstream: Upstream, credential_file: Path
) -> None:
    """Ten fetches queue for the rate cap; the token rotates and the old one is revoked."""
    proxy = await make_proxy(upstream={"rate_per_s": 5.0, "burst": 1, "deadline_s": 10.0})
    waiting = [asyncio.create_task(status(proxy, f"inv_q{i}")) for i in range(10)]
    await wait_until(lambda: upstream.standin.stats.requests >= 1, "the first request")
    write_credential(credential_file, NEW_TOKEN_ID, NEW_TOKEN)
    await wait_until(lambda: header_in_use(proxy.app) == NEW_HEADER, "the refresher")
    upstream.standin.accept_only(NEW_HEADER)
    assert Counter(await asyncio.gather(*waiting)) == {200: 10}
    assert upstream.standin.stats.unauthorized == 0, "no queued fetch carried the old token"
    assert upstream.standin.stats.requests == 10


class SlowFile(FileSource):
    """The credential file, read `delay_s` late when forced (a reload after a refusal)."""

    def __init__(self, path: Path, delay_s: float) -> None:
        super().__init__(str(path), poll_interval_s=3600.0)
        self.delay_s = delay_s
        self.forced = 0

    async def fetch(self, force: bool) -> Credential | None:
        if force and self.forced:
            await asyncio.sleep(self.delay_s)
        self.forced += force
        return await super().fetch(force)


async def test_sends_during_a_reload_after_a_refusal_wait_for_it(
    make_proxy: ProxyFactory, upstream: Upstream, credential_file: Path
) -> None:
    """The first 401 starts a reload (0.3 s); the 20 misses sent meanwhile wait for it."""
    source = SlowFile(credential_file, 0.3)
    proxy = await make_proxy(source=source)
    assert await status(proxy, "inv_before") == 200

    write_credential(credential_file, NEW_TOKEN_ID, NEW_TOKEN)  # the refresher sleeps on
    upstream.standin.accept_only(NEW_HEADER)
    first = asyncio.create_task(status(proxy, "inv_first"))
    await wait_until(lambda: upstream.standin.stats.unauthorized == 1, "the first refusal")
    rest = [asyncio.create_task(status(proxy, f"inv_next{i}")) for i in range(20)]
    statuses = await asyncio.gather(first, *rest)
    assert Counter(statuses) == {200: 21}
    assert upstream.standin.stats.unauthorized == 1, "one refused request for the rotation"
    assert source.forced == 2, "the first load and one reload"
    assert header_in_use(proxy.app) == NEW_HEADER
