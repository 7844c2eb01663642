"""The connection to the fleet's Redis (or Valkey): one bounded pool per process.

`make_client` builds the client without connecting (redis-py opens connections when a
command needs one); `warm_up` opens the pool's connections at start-up. The password is
read from its file for each new connection, so it can rotate without a restart.

Three shapes, one client interface: a standalone server (`redis_url`); a primary found
through Sentinel (`sentinels`: each new connection asks a sentinel where the primary
is, and connections to a primary that was demoted are dropped, so a failover is
followed by itself); a Redis Cluster (`cluster`: redis-py's `RedisCluster` keeps the
slot map and follows MOVED/ASK and topology changes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from .config import SharedConfig


# What a busy event loop may add to a Redis command's `timeout_s` before it counts as
# failed (`resilience.loop_timeout`, in the store). The client's own timeouts are this
# much longer, so they never cut a command the store still waits for.
LAG_SLACK_S = 0.25


class PasswordFile(CredentialProvider):
    """The Redis password, read from its file for each new connection (so it can rotate)."""

    def __init__(self, path: str, username: str) -> None:
        self._path = Path(path)
        self._username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text().strip()
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (the primary's address asked for each new connection), bounded and
    waited for as the standalone pool is, rather than failing when all are in use."""


def make_client(config: SharedConfig, *, socket_timeout: float | None = None) -> Redis:
    """A client with a bounded pool, short timeouts and no retries of its own.

    It connects nothing yet: the first command (or `warm_up`) opens a connection.
    `socket_timeout` (default `timeout_s` and the busy loop's slack) is for a client
    that blocks on purpose.
    """
    limit = config.timeout_s + LAG_SLACK_S
    options: dict[str, Any] = {
        "socket_timeout": limit if socket_timeout is None else socket_timeout,
        "socket_connect_timeout": limit,
        "retry": Retry(NoBackoff(), 0),  # ours is the circuit; a retry would double the wait
        # A new connection costs one round trip: no HELLO (RESP2 is all we need) and no
        # CLIENT SETINFO. A burst of misses opens many at once; redis-py's defaults make
        # each cost ten times more, which shows as timeouts under load.
        "protocol": 2,
        "driver_info": None,
    }
    if config.password_file:
        options["credential_provider"] = PasswordFile(config.password_file, config.username)
    if config.ca_file:
        options["ssl_ca_certs"] = config.ca_file
    if config.cluster:
        # Per node; redis-py's cluster client has no blocking pool: past the cap a
        # command fails at once (MaxConnectionsError), which the store counts as any
        # other failure. MOVED/ASK are followed inside the client whatever the retries.
        return RedisCluster.from_url(  # type: ignore[return-value]
            config.redis_url, max_connections=config.max_connections, **options
        )
    options["max_connections"] = config.max_connections
    options["timeout"] = limit  # waiting for a pooled connection
    if config.sentinels:
        return _sentinel_client(config, options)
    return Redis.from_pool(BlockingConnectionPool.from_url(config.redis_url, **options))


def _sentinel_client(config: SharedConfig, options: dict[str, Any]) -> Redis:
    """The primary of `sentinel_service`, as the sentinels name it, for each new connection.

    The URL gives the scheme (TLS for the data nodes and the sentinels alike) and the
    database; its host is not used.
    """
    url = urlsplit(config.redis_url)
    tls = url.scheme.lower() == "rediss"
    database = int(url.path.strip("/") or 0)
    limit = config.timeout_s + LAG_SLACK_S
    sentinel_options: dict[str, Any] = {
        "socket_timeout": limit,
        "socket_connect_timeout": limit,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "driver_info": None,
    }
    if config.sentinel_password_file:
        sentinel_options["credential_provider"] = PasswordFile(
            config.sentinel_password_file, config.sentinel_username
        )
    if tls:
        sentinel_options["ssl"] = True
        options["ssl"] = True
        if config.ca_file:
            sentinel_options["ssl_ca_certs"] = config.ca_file
    sentinels = []
    for address in config.sentinels:
        host, _, port = address.rpartition(":")
        sentinels.append((host, int(port)))
    # redis-py annotates Sentinel's constructor from 8.2 on: called through a typed name,
    # the call type-checks with the versions before too.
    new_manager: Callable[..., Sentinel] = Sentinel
    manager = new_manager(sentinels, sentinel_kwargs=sentinel_options)
    # Reads stay on the primary too (master_for): a replica may lag behind a lock or
    # the budget, and both must be read where they are written.
    return manager.master_for(  # type: ignore[no-any-return]
        config.sentinel_service,
        connection_pool_class=_BlockingSentinelPool,
        db=database,
        **options,
    )


async def warm_up(client: Redis, connections: int) -> None:
    """Open the pool's connections now: a burst of misses then opens none of its own.

    A cluster client instead learns the slot map (its first command would).
    """
    if isinstance(client, RedisCluster):
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await client.initialize()
        return
    pool = client.connection_pool
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            opened = await asyncio.gather(
                *(
                    pool.get_connection()  # type: ignore[no-untyped-call]
                    for _ in range(connections)
                )
            )
            for connection in opened:
                await pool.release(connection)


async def close(client: Redis) -> None:
    """Close the client, and the connections to the sentinels that named its primary."""
    pool = getattr(client, "connection_pool", None)
    await client.aclose()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()
