"""One PlanetScale token per organization (`credential.per_organization = true`).

A PlanetScale service token reads one organization's invoices. `OrganizationCredentials`
keeps a `CredentialStore` for each organization, each with a source made from the
configured template (`{organization}` in the Vault path or the file path,
`{ORGANIZATION}` in the variable names) and its own refresher:

- the organizations named in the callers' lists are loaded at start-up and always held
  (`/readyz` waits for each of them);
- an organization reached only through `["*"]` is loaded on its first request (one load
  however many requests come at once), then held and refreshed like the others; at most
  `max_on_demand` of them, the least recently used let go first;
- a load that fails (no such secret, Vault down) is remembered for `missing_ttl_s`: the
  requests for that organization are answered at once, without asking the source again.

Each store reloads by itself, so a refusal for one organization never reloads, or
waits for, another's. With Vault, one login serves every organization's secret.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

import structlog

from .clock import SYSTEM_CLOCK
from .credential import (
    CredentialSeries,
    CredentialSource,
    CredentialStore,
    NoCredential,
    ReloadTrouble,
)
from .metrics import Metrics
from .tasks import start, stop

log = structlog.get_logger("proxy.organizations")

# The metrics label of every organization loaded on demand (labels stay bounded).
OTHER = "other"
# Organizations whose failed load is remembered; beyond it, the oldest is forgotten.
MAX_MISSING = 1024


@dataclass(slots=True)
class _Held:
    store: CredentialStore
    task: asyncio.Task[NoReturn]


class OrganizationCredentials:
    """The credential stores of every organization, by organization.

    `store_for(organization)` is what the upstream client asks, per fetch: the store
    to read the token from, or `NoCredential` (fast) when there is none to be had.
    """

    per_organization = True

    def __init__(
        self,
        named: list[str],
        make_source: Callable[[str], CredentialSource],
        metrics: Metrics,
        *,
        max_on_demand: int,
        missing_ttl_s: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[asyncio.Event, float], Awaitable[None]] = SYSTEM_CLOCK.wait,
        aclose: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._make_source = make_source
        self._metrics = metrics
        self._max_on_demand = max_on_demand
        self._missing_ttl_s = missing_ttl_s
        self._clock = clock
        self._monotonic = monotonic
        self._wait = wait
        self._aclose = aclose
        self.named: dict[str, CredentialStore] = {
            name: self._store(name, CredentialSeries(metrics, name)) for name in named
        }
        metrics.init_organizations([*named, OTHER])
        self._tasks: list[asyncio.Task[NoReturn]] = []
        self.on_demand: OrderedDict[str, _Held] = OrderedDict()
        self._loading: dict[str, asyncio.Task[CredentialStore]] = {}
        # Organization -> the monotonic time until which its failed load stands.
        self._missing: OrderedDict[str, float] = OrderedDict()

    def _store(self, organization: str, series: CredentialSeries) -> CredentialStore:
        return CredentialStore(
            self._make_source(organization),
            self._metrics,
            clock=self._clock,
            wait=self._wait,
            series=series,
            organization=organization,
        )

    async def store_for(self, organization: str) -> CredentialStore:
        """The store holding `organization`'s token, loading it on demand."""
        store = self.named.get(organization)
        if store is not None:
            return store
        held = self.on_demand.get(organization)
        if held is not None:
            self.on_demand.move_to_end(organization)
            return held.store
        until = self._missing.get(organization)
        if until is not None:
            left = until - self._monotonic()
            if left > 0:
                raise NoCredential(left)
            del self._missing[organization]
        if self._max_on_demand == 0:
            raise NoCredential(self._missing_ttl_s)
        loading = self._loading.get(organization)
        if loading is None:
            loading = asyncio.create_task(self._load(organization), name="credential-load")
            # Retrieved here, so a load whose waiters all left is not an unretrieved error.
            loading.add_done_callback(_retrieved)
            self._loading[organization] = loading
        # Shielded: a caller that goes away does not cancel the load the others wait for.
        return await asyncio.shield(loading)

    async def _load(self, organization: str) -> CredentialStore:
        try:
            store = self._store(organization, CredentialSeries(self._metrics, OTHER, pooled=True))
            # Never raises: a failure is counted and logged with the organization.
            if not await store.refresh(force=True) or store.current is None:
                await store.source.aclose()
                self._missing[organization] = self._monotonic() + self._missing_ttl_s
                self._missing.move_to_end(organization)
                while len(self._missing) > MAX_MISSING:
                    self._missing.popitem(last=False)
                raise NoCredential(self._missing_ttl_s)
            while len(self.on_demand) >= self._max_on_demand:
                name, evicted = self.on_demand.popitem(last=False)
                await self._let_go(evicted)
                log.info("credential_evicted", organization=name, held=len(self.on_demand))
            task = start("credential_refresher", store.run())
            self.on_demand[organization] = _Held(store, task)
            log.info("credential_loaded_on_demand", organization=organization)
            return store
        finally:
            self._loading.pop(organization, None)

    async def _let_go(self, held: _Held) -> None:
        await stop(held.task)
        held.store.dropped()
        await held.store.source.aclose()

    def stores(self) -> list[tuple[str, CredentialStore]]:
        return [*self.named.items(), *((n, h.store) for n, h in self.on_demand.items())]

    def wake(self) -> None:
        """SIGHUP: every store fetches now, and no failed load is remembered any more."""
        self._missing.clear()
        for _, store in self.stores():
            store.wake()

    def not_ready_reason(self) -> str | None:
        """None when every named organization's token is loaded; else which are not."""
        missing = [(n, s) for n, s in self.named.items() if s.current is None]
        if not missing:
            return None
        names = ", ".join(repr(n) for n, _ in missing)
        return f"no token loaded for organization {names}: {missing[0][1].not_ready_reason}"

    @property
    def trouble(self) -> ReloadTrouble | None:
        """The first store whose fetches fail persistently, its organization named."""
        for name, store in self.stores():
            trouble = store.trouble
            if trouble is not None:
                reason = f"organization {name!r}: {trouble.reason}"
                return ReloadTrouble(reason, trouble.since, trouble.failures)
        return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[OrganizationCredentials]:
        """The named tokens' first fetch (side by side), then their refreshers, until the
        block ends; then every refresher stops and every source closes."""
        stores = list(self.named.values())
        await asyncio.gather(*(store.refresh(force=True) for store in stores))
        self._tasks = [start("credential_refresher", store.run()) for store in stores]
        try:
            yield self
        finally:
            loading = list(self._loading.values())
            for task in loading:
                task.cancel()
            await asyncio.gather(*loading, return_exceptions=True)
            for refresher in self._tasks:
                await stop(refresher)
            while self.on_demand:
                await self._let_go(self.on_demand.popitem()[1])
            for store in stores:
                await store.source.aclose()
            if self._aclose is not None:
                await self._aclose()


def _retrieved(task: asyncio.Task[CredentialStore]) -> None:
    if not task.cancelled():
        task.exception()
