"""The connection to the fleet's Redis (or Valkey): one bounded pool per process.

`make_client` builds the client without connecting (redis-py opens connections when a
command needs one); `warm_up` opens the pool's connections at start-up. The password is
read from its file for each new connection, so it can rotate without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from .config import SharedConfig


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


def make_client(config: SharedConfig) -> Redis:
    """A client with a bounded pool, short timeouts and no retries of its own.

    It connects nothing yet: the first command (or `warm_up`) opens a connection.
    """
    options: dict[str, Any] = {
        "max_connections": config.max_connections,
        "timeout": config.timeout_s,  # waiting for a pooled connection
        "socket_timeout": config.timeout_s,
        "socket_connect_timeout": config.timeout_s,
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
    return Redis.from_pool(BlockingConnectionPool.from_url(config.redis_url, **options))


async def warm_up(client: Redis, connections: int) -> None:
    """Open the pool's connections now: a burst of misses then opens none of its own."""
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
