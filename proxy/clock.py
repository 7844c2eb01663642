"""Time, injected: `init_app` hands one `Clock` to everything that reads time.

Wall time decides cache freshness and what is logged; the monotonic clock measures
intervals (deadlines, backoff, rate caps, the circuit breaker); `sleep` waits on it.
Tests pass a clock they advance instead of sleeping on real time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Where the service reads time."""

    def time(self) -> float:
        """Wall time, Unix seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's monotonic time."""
        ...


class SystemClock:
    """The real clocks."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
