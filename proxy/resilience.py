"""Small building blocks that protect PlanetScale and callers: a token bucket and a circuit breaker.

Both take a clock so tests can advance time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_take(self) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is due."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def reserve(self, max_wait_s: float) -> float | None:
        """Take a token now or book the next one: the wait, or None when it is too long."""
        self._refill()
        wait = (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0
        if wait > max_wait_s:
            return None
        self._tokens -= 1.0  # may go negative: later callers queue behind this one
        return wait


class CircuitState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `open_s` lets one probe through.

    A successful probe closes it; a failed one opens it again for another `open_s`.
    """

    def __init__(
        self,
        failures: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change:
                self._on_change(state)

    def retry_after(self) -> float:
        """Seconds until a probe may go; 0 when requests may go now."""
        if self.state == CircuitState.OPEN:
            return max(0.0, self._opened_at + self._open_s - self._clock())
        return 0.0

    def allow(self) -> bool:
        """May a request go upstream now? In half-open, only one probe at a time."""
        if self.state == CircuitState.CLOSED:
            return True
        if self.state == CircuitState.OPEN:
            if self._clock() - self._opened_at < self._open_s:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)

    def release(self) -> None:
        """A request that was allowed ended without telling success or failure."""
        self._probing = False
