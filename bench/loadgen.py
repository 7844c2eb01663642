"""A small HTTP/1.1 load generator on raw asyncio protocols, for what wrk cannot do.

Debian has no wrk2, so the fixed-rate latency figures come from `open_loop`: requests
are scheduled at a constant rate, whether or not earlier ones have been answered, and
each latency is measured from the request's *scheduled* send time (as wrk2 does, so a
stalled server cannot hide its stall by slowing the generator down). The scheduler
spins on the event loop instead of sleeping on timers (which have a 1 ms resolution),
so a request leaves within a few microseconds of its schedule; the generator owns its
core, so the spinning costs the measured server nothing.

`closed_loop` fills a cache as fast as the server answers; `burst` sends one request
on each of many connections opened beforehand (to one server or spread over several),
all in the same event-loop turn.
Keep-alive connections, no pipelining: one request in flight per connection.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

HOST = "127.0.0.1"
# Upper bound on waiting for the last answers once the schedule has been sent.
DRAIN_TIMEOUT_S = 30.0


def request_bytes(port: int, path: str, authorization: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: {authorization}\r\nUser-Agent: invoice-proxy-bench\r\n\r\n"
    ).encode()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, parse its answer, report it."""

    def __init__(self, on_answer: Callable[[_Connection, int, int], None]) -> None:
        self._on_answer = on_answer
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0  # the scheduled (open loop) or actual send time
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, request: bytes, at: float) -> None:
        assert self.transport is not None
        self.sent_at = at
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                length = 0  # 304, 204: no body
            else:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop > 0 else len(head)])
            total = end + 4 + length
            if len(buffer) < total:
                return
            del buffer[:total]
            self._on_answer(self, status, length)


async def _connect(
    n: int, on_answer: Callable[[_Connection, int, int], None], port: int
) -> list[_Connection]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(n):
        _, protocol = await loop.create_connection(lambda: _Connection(on_answer), HOST, port)
        connections.append(protocol)
    return connections


def _close(connections: Sequence[_Connection]) -> None:
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()


@dataclass
class Answers:
    """What came back: status counts, body bytes, latencies (seconds) in arrival order."""

    statuses: Counter[int] = field(default_factory=Counter)
    body_bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    max_send_lag_s: float = 0.0  # open loop: the latest a request left after its schedule

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_loop(
    port: int,
    paths: Sequence[str],
    authorization: str,
    rate_per_s: float,
    duration_s: float,
    connections: int = 50,
) -> Answers:
    """Send `rate_per_s` requests a second for `duration_s`, rotating over `paths`."""
    requests = [request_bytes(port, path, authorization) for path in paths]
    answers = Answers()
    idle: deque[_Connection] = deque()
    backlog: deque[tuple[float, bytes]] = deque()  # scheduled, no connection free yet
    clock = time.perf_counter
    total = int(rate_per_s * duration_s)
    all_answered = asyncio.get_running_loop().create_future()

    def on_answer(connection: _Connection, status: int, length: int) -> None:
        answers.latencies.append(clock() - connection.sent_at)
        answers.statuses[status] += 1
        answers.body_bytes += length
        if answers.count == total:
            all_answered.set_result(None)
        if backlog:
            at, request = backlog.popleft()
            connection.send(request, at)
        else:
            idle.append(connection)

    pool = await _connect(connections, on_answer, port)
    idle.extend(pool)
    # A collection of the generator's own heap would show up as server latency.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    interval = 1.0 / rate_per_s
    try:
        start = clock() + 0.01
        sent = 0
        while sent < total:
            now = clock()
            while sent < total and start + sent * interval <= now:
                at = start + sent * interval
                request = requests[sent % len(requests)]
                if idle:
                    idle.popleft().send(request, at)
                    answers.max_send_lag_s = max(answers.max_send_lag_s, now - at)
                else:
                    backlog.append((at, request))
                sent += 1
            await asyncio.sleep(0)  # one event-loop turn: poll sockets without blocking
        await asyncio.wait([all_answered], timeout=DRAIN_TIMEOUT_S)
        answers.elapsed_s = clock() - start
    finally:
        _close(pool)
        if gc_was_enabled:
            gc.enable()
    return answers


async def closed_loop(
    port: int,
    paths: Sequence[str],
    authorization: str,
    connections: int = 100,
    timeout_s: float = 600.0,
) -> Answers:
    """Request every path once, `connections` at a time, as fast as the server answers."""
    answers = Answers()
    pending = deque(paths)
    done = asyncio.get_running_loop().create_future()
    clock = time.perf_counter

    def on_answer(connection: _Connection, status: int, length: int) -> None:
        answers.latencies.append(clock() - connection.sent_at)
        answers.statuses[status] += 1
        answers.body_bytes += length
        if pending:
            connection.send(request_bytes(port, pending.popleft(), authorization), clock())
        elif answers.count == len(paths) and not done.done():
            done.set_result(None)

    pool = await _connect(min(connections, len(paths)), on_answer, port)
    start = clock()
    try:
        for connection in pool:
            connection.send(request_bytes(port, pending.popleft(), authorization), clock())
        await asyncio.wait_for(done, timeout_s)
        answers.elapsed_s = clock() - start
    finally:
        _close(pool)
    return answers


async def burst(
    port: int | Sequence[int], paths: Sequence[str], authorization: str, timeout_s: float = 30.0
) -> Answers:
    """One request per path, each on its own connection opened beforehand, all at once.

    `port` is one server's, or one per path (requests spread over several servers).
    """
    ports = [port] * len(paths) if isinstance(port, int) else list(port)
    if len(ports) != len(paths):
        raise ValueError(f"{len(ports)} ports for {len(paths)} paths")
    answers = Answers()
    done = asyncio.get_running_loop().create_future()
    clock = time.perf_counter

    def on_answer(connection: _Connection, status: int, length: int) -> None:
        answers.latencies.append(clock() - connection.sent_at)
        answers.statuses[status] += 1
        answers.body_bytes += length
        if answers.count == len(paths) and not done.done():
            done.set_result(None)

    pool: list[_Connection] = []
    try:
        for each in ports:
            pool += await _connect(1, on_answer, each)
        requests = [
            request_bytes(p, path, authorization) for p, path in zip(ports, paths, strict=True)
        ]
        start = clock()
        for connection, request in zip(pool, requests, strict=True):
            connection.send(request, start)
        await asyncio.wait_for(done, timeout_s)
        answers.elapsed_s = clock() - start
    finally:
        _close(pool)
    return answers
