"""The invoice cache: bytes-bounded LRU, freshness by content, coalescing, stale-if-error.

An issued invoice never changes, so a final one stays until evicted or purged; one
whose billing period is still open (or not yet paid) lives `open_period_ttl_s`. A
404 is remembered briefly. Concurrent misses for one invoice share one fetch. The
cache knows nothing of HTTP: it stores bodies and answers with `Entry` objects.

With `[shared]`, a local miss goes to the fleet level below (`Fleet`, given by
`init_app`) before PlanetScale: the fleet's answer, or this replica's fetch, whose
lifetimes are decided here once and shared with the fleet.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

from .config import CacheConfig
from .metrics import Metrics
from .upstream import Fetched, UpstreamFailure

Key = tuple[str, str]
Fetcher = Callable[[str, str], Awaitable[Fetched]]

# Memory an entry costs beyond its body and key strings: the Entry object, the bytes
# and str headers, the key tuple, and its slot and link in the store's ordered dict.
# tracemalloc over 100,000 stored entries gave about 645 B; the memory fill of `make
# bench` sets the RSS an invoice costs beside what `invoice_proxy_cache_bytes` counts.
ENTRY_OVERHEAD = 640
# What a final invoice tells the caller's own cache: it does not change.
FINAL_CACHE_CONTROL = "private, max-age=31536000, immutable"

HIT, MISS, STALE = "hit", "miss", "stale"


class FleetTurn(Protocol):
    """One local miss's dealings with the fleet level (`proxy.shared.Turn`)."""

    @property
    def found(self) -> tuple[Fetched, float, float] | None:
        """The fleet's answer, its fresh_until and stale_until; None: this replica fetches."""
        ...

    async def fetch(self, upstream: Callable[[], Awaitable[Fetched]]) -> Fetched:
        """Call `upstream` within the fleet's budget."""
        ...

    async def share(self, fetched: Fetched, fresh_until: float, stale_until: float) -> None:
        """Give the answer to the fleet, kept as long as this cache keeps it."""
        ...


class Fleet(Protocol):
    """The shared level below the cache (`proxy.shared.SharedLevel`), as the cache uses it."""

    def claim(self, organization: str, invoice_id: str) -> AbstractAsyncContextManager[FleetTurn]:
        """The fleet's answer, or this replica's turn to fetch it, for as long as the block."""
        ...


class Entry:
    """One cached answer: a 200 body or a 404, with its validators and lifetimes."""

    __slots__ = (
        "body", "cache_control", "etag", "fresh_until", "prepared", "size", "stale_until", "status",
    )  # fmt: skip

    def __init__(
        self, status: int, body: bytes, fresh_until: float, stale_until: float, key: Key
    ) -> None:
        self.status = status
        self.body = body
        # A strong validator: the same bytes always give the same tag, in every replica.
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        # Final entries share one header string; open ones compute theirs per answer.
        self.cache_control = FINAL_CACHE_CONTROL if fresh_until == math.inf else ""
        self.size = len(body) + len(key[0]) + len(key[1]) + ENTRY_OVERHEAD
        # What the listener prepared to answer from this entry (`proxy.lane`), opaque here.
        self.prepared: object = None

    def cache_control_at(self, now: float) -> str:
        if self.cache_control:
            return self.cache_control
        return f"private, max-age={max(0, int(self.fresh_until - now))}"


class _Store:
    """Entries by key, the least recently used first, bounded by the bytes they account
    for (`Entry.size`, which does not change once stored); counts its evictions.

    One `OrderedDict` (C), not cachetools' LRU: looking an entry up is on every hit,
    and cachetools' look-up runs four Python calls where this runs two C ones.
    """

    __slots__ = ("_entries", "_max_bytes", "_on_evict", "currsize")

    def __init__(self, max_bytes: int, on_evict: Callable[[], None]) -> None:
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._max_bytes = max_bytes
        self._on_evict = on_evict
        self.currsize = 0  # the bytes of the entries stored

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def get(self, key: Key) -> Entry | None:
        """The key's entry, now the most recently used; None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, entry: Entry) -> bool:
        """Store `entry` in place of the key's, evicting the least recently used until
        it fits; False, and nothing changed, when it is larger than the whole store."""
        if entry.size > self._max_bytes:
            return False
        self.pop(key)
        entries = self._entries
        while self.currsize + entry.size > self._max_bytes:
            _, evicted = entries.popitem(last=False)
            self.currsize -= evicted.size
            self._on_evict()
        entries[key] = entry
        self.currsize += entry.size
        return True

    def pop(self, key: Key) -> Entry | None:
        """Remove the key's entry (not an eviction): that entry, or None."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.currsize -= entry.size
        return entry

    def clear(self) -> None:
        """Remove every entry (not evictions)."""
        self._entries.clear()
        self.currsize = 0


class InvoiceCache:
    """Cached invoices by (organization, id), and the fetches under way for missing ones."""

    def __init__(
        self,
        config: CacheConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        fleet: Fleet | None = None,
        prepare: Callable[[Entry], int] | None = None,
    ) -> None:
        self._config = config
        # Called with each 200 entry before it is stored; fills `entry.prepared` and
        # returns the bytes that costs, which count against max_bytes.
        self._prepare = prepare
        self._metrics = metrics
        self._clock = clock
        self._fleet = fleet  # None: [shared] is off, a miss goes straight to `fetch`
        self._store = _Store(config.max_bytes, metrics.cache_evictions.inc)
        self._inflight: dict[Key, asyncio.Task[Entry]] = {}
        # Fetches under way when their key was purged: their answer goes to the callers
        # already waiting for it, never into the cache (it may be what was purged).
        self._purged: set[asyncio.Task[Entry]] = set()
        lookups = metrics.cache_lookups
        self._hit = lookups[HIT]
        self._miss = lookups[MISS]
        self._coalesced = lookups["coalesced"]
        self._stale = lookups[STALE]

    def __len__(self) -> int:
        return len(self._store)

    @property
    def bytes(self) -> int:
        return self._store.currsize

    def fresh(self, key: Key) -> Entry | None:
        """The hot path: a fresh entry, or None. Counts the hit."""
        entry = self.peek(key)
        if entry is not None:
            self._hit.value += 1
        return entry

    def peek(self, key: Key) -> Entry | None:
        """A fresh entry, or None, without counting a hit: the caller counts it
        (`count_hit`) once it answers from the entry."""
        entry = self._store.get(key)
        if entry is not None and entry.fresh_until > self._clock():
            return entry
        return None

    def count_hit(self) -> None:
        self._hit.value += 1

    async def load(self, organization: str, invoice_id: str, fetch: Fetcher) -> tuple[Entry, str]:
        """After `fresh` missed: join or start the one fetch for this key.

        `fetch` asks PlanetScale; with a fleet level, only when the fleet has no answer.
        A caller that is cancelled does not cancel the fetch for the others. When the
        fetch fails and an expired entry is still within its stale window, that entry
        is served instead (`stale`); otherwise every waiter gets the same error.
        """
        key = (organization, invoice_id)
        task = self._inflight.get(key)
        if task is None:
            self._miss.value += 1
            task = asyncio.create_task(self._fetch(key, fetch), name="invoice-fetch")
            self._inflight[key] = task
            task.add_done_callback(partial(self._fetch_done, key))
        else:
            self._coalesced.value += 1
        try:
            return await asyncio.shield(task), MISS
        except UpstreamFailure:
            stale = self._stale_entry(key)
            if stale is None:
                raise
            self._stale.value += 1
            return stale, STALE

    def _lifetimes(self, fetched: Fetched) -> tuple[float, float]:
        """Until when an answer is fresh, and until when it may still be served stale."""
        now = self._clock()
        if fetched.status == 200:
            facts = fetched.facts
            final = facts is not None and facts.is_final(datetime.fromtimestamp(now, UTC))
            fresh_until = math.inf if final else now + self._config.open_period_ttl_s
            return fresh_until, fresh_until + self._config.stale_if_error_s
        expires = now + self._config.not_found_ttl_s
        return expires, expires

    async def _fetch(self, key: Key, fetch: Fetcher) -> Entry:
        if self._fleet is None:
            fetched = await fetch(*key)
            now = self._clock()
            fresh_until, stale_until = self._lifetimes(fetched)
        else:
            fetched, fresh_until, stale_until = await self._fetch_in_fleet(self._fleet, key, fetch)
            now = self._clock()
        entry = Entry(fetched.status, fetched.body, fresh_until, stale_until, key)
        if asyncio.current_task() in self._purged:
            return entry
        if stale_until > now:
            self._put(key, entry)
        elif self._store.pop(key) is not None:
            self._update_gauges()  # an older answer must not outlive this one
        return entry

    async def _fetch_in_fleet(
        self, fleet: Fleet, key: Key, fetch: Fetcher
    ) -> tuple[Fetched, float, float]:
        """The fleet's answer, or this replica's fetch shared with the fleet; and lifetimes."""
        async with fleet.claim(*key) as turn:
            if turn.found is not None:
                fetched, fresh_until, stale_until = turn.found
                # Never longer than this replica would keep the same answer fetched now:
                # a forged "final" open invoice, or a lifetime far ahead, is cut to that.
                own_fresh, own_stale = self._lifetimes(fetched)
                return fetched, min(fresh_until, own_fresh), min(stale_until, own_stale)
            fetched = await turn.fetch(partial(fetch, *key))
            fresh_until, stale_until = self._lifetimes(fetched)
            await turn.share(fetched, fresh_until, stale_until)
            return fetched, fresh_until, stale_until

    def _fetch_done(self, key: Key, task: asyncio.Task[Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        self._purged.discard(task)
        if not task.cancelled():
            # Every waiter may have gone; the error must still count as retrieved.
            task.exception()

    def _put(self, key: Key, entry: Entry) -> None:
        if self._prepare is not None and entry.status == 200:
            entry.size += self._prepare(entry)
        self._store.put(key, entry)  # not when larger than the whole cache: served, not kept
        self._update_gauges()

    def _stale_entry(self, key: Key) -> Entry | None:
        entry = self._store.get(key)
        if entry is None or entry.status != 200:
            return None
        if entry.stale_until <= self._clock():
            self.purge(key)
            return None
        return entry

    def purge(self, key: Key) -> bool:
        """Drop one entry; False when it was not cached.

        A fetch under way for the key is let go: its callers get its answer, the cache
        does not keep it, and the next caller starts a fetch of its own.
        """
        task = self._inflight.pop(key, None)
        if task is not None:
            self._purged.add(task)
        found = self._store.pop(key) is not None
        self._update_gauges()
        return found

    def clear(self) -> None:
        """Drop every entry (purges were missed): as `purge` for each key."""
        self._purged.update(self._inflight.values())
        self._inflight.clear()
        self._store.clear()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.cache_entries.set(len(self._store))
        self._metrics.cache_bytes.set(self._store.currsize)

    async def close(self) -> None:
        """Cancel fetches still under way (shutdown)."""
        tasks = [*self._inflight.values(), *self._purged]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
