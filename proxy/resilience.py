"""Small building blocks that protect PlanetScale and callers: a token bucket, a fair
queue in front of a rate limit, and a circuit breaker.

Each takes a clock so tests can advance time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from enum import IntEnum
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("proxy.resilience")

G = TypeVar("G")

# How far past its bound a waiter still takes the grant it was promised (seconds).
_GRACE_S = 0.05

# The fairness lane of the work under way in this task: waiters of one lane are served
# in turn with those of every other lane. Set by whoever starts the work (the handler
# names it after the caller); tasks inherit it when they are created.
FAIR_LANE: ContextVar[str] = ContextVar("fair_lane", default="")


# A timer that runs this much later than due shows a busy loop (an idle one runs it
# within a fraction of a millisecond).
_LATE_S = 0.005


@contextlib.asynccontextmanager
async def loop_timeout(seconds: float, slack_s: float) -> AsyncIterator[None]:
    """`asyncio.timeout(seconds)` that does not count the event loop's own lag.

    On a busy loop a timer runs late, and a reply that has arrived waits for the loop to
    get to it: a plain timeout then cancels work that was not slow, only queued. Here,
    when the deadline's timer runs late (the loop was busy), the time it was late is
    given back, up to `slack_s` in all; when it runs on time, the work gets the turn of
    the loop it was already woken for (a reply read in this turn goes first), and is
    then cancelled (TimeoutError). A server that does not answer costs `seconds` on an
    idle loop, and at most `seconds + slack_s` on a busy one.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    limit = start + seconds + slack_s
    timer = asyncio.timeout(None)
    handle: asyncio.TimerHandle | None = None

    def due(when: float) -> None:
        nonlocal handle
        now = loop.time()
        late = now - when
        if late > _LATE_S and now < limit:
            again = min(now + late, limit)
            handle = loop.call_at(again, due, again)
        else:
            timer.reschedule(now)  # call_soon: after what this turn already woke

    async with timer:
        handle = loop.call_at(start + seconds, due, start + seconds)
        try:
            yield
        finally:
            if handle is not None:
                handle.cancel()


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

    def debt(self, grants: int) -> float:
        """Seconds until `grants` more tokens could be handed out, at the current state."""
        self._refill()
        return max(0.0, (grants - self._tokens) / self.rate)


class Refused(Exception):
    """No grant within the wait allowed; `retry_after_s` is when one is likely."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"no grant within the wait allowed; retry after {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s

    def again(self) -> Refused:
        """The same refusal, for another waiter (a subclass keeps what it carries)."""
        return Refused(self.retry_after_s)


class _Waiter(Generic[G]):
    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[G], deadline: float) -> None:
        self.future = future
        self.deadline = deadline


class FairQueue(Generic[G]):
    """Grants of a rate-limited resource, served in turn between lanes.

    `book(max_wait_s)` books the resource's next grant and returns `(wait_s, grant)`:
    the grant is due after `wait_s`; it raises `Refused` when the next one is due later
    than `max_wait_s`. One dispatcher books a grant at a time, sleeps until it is due,
    and only then picks who gets it, so a waiter that arrived meanwhile takes part.
    Lanes are served round robin; a lane that had no waiter goes first (as the new
    flows of fq_codel do), so one waiting request of a quiet lane is next however long
    a busy lane's queue is. A waiter that gives up (cancelled, or past its own wait
    bound) leaves the queue; a grant it was handed in that instant goes to the next.

    `take_now()` (optional) takes a grant at once if one is free, for the path with
    nobody waiting; `estimate(n)` is the wait for `n` more grants, for refusing at once
    a waiter whose turn cannot come within its bound.
    """

    def __init__(
        self,
        book: Callable[[float], Awaitable[tuple[float, G]]],
        estimate: Callable[[int], float],
        *,
        take_now: Callable[[], G | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        name: str = "fair-queue",
    ) -> None:
        self._book = book
        self._estimate = estimate
        self._take_now = take_now
        self._clock = clock
        self._sleep = sleep
        self._name = name
        self._lanes: dict[str, deque[_Waiter[G]]] = {}
        self._new: deque[str] = deque()  # lanes not served since they began to wait
        self._old: deque[str] = deque()  # lanes served at least once, round robin
        self._waiting = 0
        self._held: list[G] = []  # grants whose waiter had gone: the next acquire's
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self, lane: str, max_wait_s: float, *, first: bool = False) -> G:
        """A grant within `max_wait_s`, in this lane's turn; else `Refused`.

        `first`: ahead of the lane's other waiters (work that already waited its turn
        once and must be done again through no fault of its own).
        """
        if not self._waiting:
            if self._held:
                return self._held.pop()
            if self._take_now is not None:
                grant = self._take_now()
                if grant is not None:
                    return grant
        queue = self._lanes.get(lane)
        position = 0 if queue is None or first else len(queue)
        ahead = position + sum(
            min(len(q), position + 1) for name, q in self._lanes.items() if name != lane
        )
        estimate = self._estimate(ahead + 1)
        if estimate > max_wait_s:
            raise Refused(estimate)
        waiter: _Waiter[G] = _Waiter(
            asyncio.get_running_loop().create_future(), self._clock() + max_wait_s
        )
        if queue is None:
            queue = self._lanes[lane] = deque()
            self._new.append(lane)
        if first:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._waiting += 1
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name=self._name)
        try:
            # A turn estimated in time is not lost to a scheduling hiccup at the bound.
            async with asyncio.timeout(max_wait_s + _GRACE_S):
                return await waiter.future
        except TimeoutError:
            if _granted(waiter.future):
                return waiter.future.result()  # handed over in the same instant: ours
            self._remove(lane, waiter)
            raise Refused(self._estimate(self._waiting + 1)) from None
        except asyncio.CancelledError:
            if _granted(waiter.future):
                self._give(waiter.future.result())
            else:
                self._remove(lane, waiter)
            raise

    def _remove(self, lane: str, waiter: _Waiter[G]) -> None:
        queue = self._lanes.get(lane)
        if queue is None or waiter not in queue:
            return  # already taken off by the dispatcher
        queue.remove(waiter)
        self._waiting -= 1
        if not queue:
            self._drop_lane(lane)

    def _drop_lane(self, lane: str) -> None:
        del self._lanes[lane]
        for order in (self._new, self._old):
            with contextlib.suppress(ValueError):
                order.remove(lane)

    def _give(self, grant: G) -> None:
        """Hand a grant to the head of the next lane in turn, or keep it for the next."""
        while self._new or self._old:
            order = self._new if self._new else self._old
            lane = order.popleft()
            queue = self._lanes[lane]
            waiter = queue.popleft()
            self._waiting -= 1
            if queue:
                self._old.append(lane)
            else:
                del self._lanes[lane]
            if not waiter.future.done():
                waiter.future.set_result(grant)
                return
        self._held.append(grant)

    def _fail(self, error: Callable[[], BaseException]) -> None:
        """Every waiter gets an `error()` of its own (and leaves the queue)."""
        for queue in self._lanes.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(error())
        self._lanes.clear()
        self._new.clear()
        self._old.clear()
        self._waiting = 0

    async def _dispatch(self) -> None:
        try:
            while self._waiting:
                patience = max(w.deadline for q in self._lanes.values() for w in q)
                try:
                    wait, grant = await self._book(max(0.0, patience - self._clock()))
                except Refused as refused:
                    # The next grant comes after even the most patient waiter's bound.
                    self._fail(refused.again)
                    continue
                if wait > 0:
                    await self._sleep(wait)
                self._give(grant)
        except asyncio.CancelledError:
            self._fail(functools.partial(Refused, 1.0))
            raise
        except Exception as exc:
            # A fault of the source, not of a waiter: each waiter gets it (the caller's
            # documented error), and the next acquire starts a new dispatcher.
            log.error("fair_queue_failed", queue=self._name, error=type(exc).__name__)
            self._fail(functools.partial(_same, exc))
        finally:
            self._dispatcher = None


def _same(error: BaseException) -> BaseException:
    return error


def _granted(future: asyncio.Future[G]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


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
