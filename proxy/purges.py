"""Fleet-wide purges: every process drops a purged invoice from its local cache.

A purge on any replica's admin listener drops the fleet's copy in Redis (`SharedLevel`)
and appends the invoice to a Redis stream, `{namespace}:v1:purges` (`announce`). Each
process of the fleet reads that stream (`PurgeListener`, a supervised task): a blocking
XREAD that returns as soon as an entry is added, so every worker of every replica drops
the invoice within milliseconds. The local-hit path does nothing for this.

A stream, not pub/sub: a process that lost its connection (a failover, a restart of
Redis, a partition) reads on from the last entry it saw, so it misses nothing that is
still in the stream. The stream keeps the last `STREAM_LENGTH` purges; a process that
was away for longer than that (more entries were added since its position than the
stream holds, by XINFO's `entries-added`), or finds the stream gone or restarted behind
its position (Redis lost its data), drops its whole local cache instead: it cannot
know what it missed.

The cache is reached through two callables (`drop`, `drop_all`): this module knows no
cache, no HTTP answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .config import SharedConfig
from .metrics import SharedMetrics

log = structlog.get_logger("proxy.purges")

# The purges the stream keeps (about: trimmed with ~, which Redis does cheaply).
STREAM_LENGTH = 10_000
# How long one XREAD waits for a purge before it is sent again (milliseconds).
BLOCK_MS = 1_000
# Entries read at once.
BATCH = 500
START = "0-0"

Key = tuple[str, str]


def stream_key(config: SharedConfig) -> str:
    # A key of its own (one Cluster slot); the version is the layout of its entries.
    return f"{config.namespace}:v1:purges"


async def announce(client: Redis, key: str, organization: str, invoice_id: str) -> None:
    """Tell every process of the fleet that this invoice was purged."""
    await client.xadd(
        key,
        {"o": organization, "i": invoice_id},
        maxlen=STREAM_LENGTH,
        approximate=True,
    )


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PurgeListener:
    """One process's reader of the fleet's purge stream; `step` for `tasks.supervise`.

    Its client is its own (`socket_timeout` past the XREAD's block), so a blocking read
    never holds a connection of the store's pool.
    """

    def __init__(
        self,
        client: Redis,
        config: SharedConfig,
        metrics: SharedMetrics,
        *,
        drop: Callable[[Key], object],
        drop_all: Callable[[], object],
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._redis = client
        self._config = config
        self._key = stream_key(config)
        self._errors = metrics.errors.labels(operation="listen")
        self._drop = drop
        self._drop_all = drop_all
        self._sleep = sleep
        self._last: str | None = None  # the last entry read; None: not yet connected
        self._added = 0  # the stream's entries-added as of `_last`
        self._away = True  # since the last read, the connection failed (or never was)
        self._outage = False

    @property
    def client(self) -> Redis:
        return self._redis

    async def step(self) -> None:
        """Catch up after a gap, then wait for purges and apply them."""
        try:
            if self._away:
                await self._catch_up()
                self._away = False
            reply: Any = await self._redis.xread({self._key: self._last or START}, BATCH, BLOCK_MS)
        except (RedisError, OSError, TimeoutError) as exc:
            self._away = True
            self._errors.inc()
            if not self._outage:
                self._outage = True
                log.warning("purge_stream_unavailable", error=type(exc).__name__)
            await self._sleep(self._config.retry_interval_s)
            return
        if self._outage:
            self._outage = False
            log.info("purge_stream_recovered")
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._apply(_text(entry_id), fields)

    def _apply(self, entry_id: str, fields: dict[Any, Any]) -> None:
        self._last = entry_id
        self._added += 1
        organization = fields.get(b"o", fields.get("o"))
        invoice_id = fields.get(b"i", fields.get("i"))
        if organization is None or invoice_id is None:
            return  # not an entry this service wrote: nothing to drop
        self._drop((_text(organization), _text(invoice_id)))

    async def _catch_up(self) -> None:
        """Where to read from after a gap; the whole local cache goes when purges were
        missed that the stream no longer holds."""
        try:
            info = await self._redis.xinfo_stream(self._key)
        except RedisError as exc:
            if "no such key" not in str(exc).lower():
                raise
            info = None
        if self._last is None:
            # The first connection: the local cache holds only what this process fetched
            # since it started; purges before that are in Redis already.
            last = _text(info["last-generated-id"]) if info else START
            # Applied from here on; an entry added in between is read, not lost.
            self._last = last if info and _id(last) > (0, 0) else START
            self._added = int(info.get("entries-added") or 0) if info else 0
            return
        seen = _id(self._last)
        if info is None:
            if seen > (0, 0):
                self._missed("stream_gone")
                self._last = START
                self._added = 0
            return
        added = info.get("entries-added")
        if _id(_text(info["last-generated-id"])) < seen or (
            added is not None and int(added) < self._added
        ):
            self._missed("stream_restarted")  # Redis lost its data and began again
            self._last = START
            self._added = 0
            return
        first = info.get("first-entry")
        if not first or _id(_text(first[0])) <= seen:
            return  # trimming drops the oldest first: nothing after `seen` was dropped
        # Every entry in the stream came after `seen`: were more added since than it holds?
        if added is None or int(added) - self._added > int(info["length"]):
            self._missed("stream_trimmed")
        if added is not None:
            self._added = int(added) - int(info["length"])

    def _missed(self, reason: str) -> None:
        log.warning("purges_missed_local_cache_dropped", reason=reason)
        self._drop_all()
