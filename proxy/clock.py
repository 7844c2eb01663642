"""Time, injected: `init_app` hands one `Clock` to everything that reads time.

Wall time decides cache freshness and what is logged; the monotonic clock measures
intervals (deadlines, backoff, rate caps, the circuit breaker); `sleep` waits on it.
Tests pass a clock they advance instead of sleeping on real time.
"""

from __future__ import annotations

import asyncio
import contextlib
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

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        """Wait until `event` is set or `seconds` have passed, whichever comes first."""
        ...


class SystemClock:
    """The real clocks: the functions themselves, so reading one costs no extra call (a
    cache hit reads the wall clock)."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(asyncio.sleep)

    @staticmethod
    async def wait(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)

    time = staticmethod(time.time)  # last: the name hides the module below it


SYSTEM_CLOCK = SystemClock()
