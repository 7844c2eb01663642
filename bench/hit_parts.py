"""What each part of a fast-lane hit costs, in-process, without the network.

The objects `init_app` builds for the lane (`Authenticator`, `InvoiceCache` with the
lane's `prepare` hook, `Metrics`, `FastLane`, `HeadReader`), the request line through
`proxy.logging.configure`'s pipeline into /dev/null, a final invoice in the cache, and
wrk's request head of the hit rounds. Each row is the best of 5 runs of `--calls`
calls (microseconds per call); "read + answer" is the whole of the lane's Python work
for one hit but the protocol's few checks (its `_idle`, which `answer` asks of a hit,
is a function here that says yes) and the write itself. Compare it with
`python -m bench.calibrate`: the Python a hit may cost for a share of nginx's rate.
"a miss: read + answer" is what the lane adds to a miss before aiohttp takes it: the
same head for an invoice not cached (a different one each call, as wrk's miss rounds).

    python -m bench.hit_parts [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from proxy import logging as proxy_logging
from proxy.auth import Authenticator, KnownKey
from proxy.cache import InvoiceCache
from proxy.config import CacheConfig, CallerConfig
from proxy.invoice import InvoiceFacts
from proxy.lane import FastLane, HeadReader
from proxy.metrics import Metrics
from proxy.middleware import log_request, request_id_for
from proxy.upstream import Fetched

KEY = "k" * 43
HEAD = (
    b"GET /v1/organizations/acme/invoices/hot-000 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
)
TURN = 50  # calls per event-loop turn
FINAL = InvoiceFacts(
    period_end=datetime(2025, 1, 31, tzinfo=UTC),
    paid=True,
    overdue=False,
    extra_fields=(),
    string_total=False,
)


def best_of_five(call: Callable[[], Any], calls: int) -> float:
    """Microseconds per call, the best of 5 runs. The log lines are written after each 50
    calls, as the writer does once per event-loop turn under load (its cost included)."""
    call()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // TURN):
            for _ in range(TURN):
                call()
            proxy_logging.flush_logs()
        best = min(best, (time.perf_counter() - start) / (calls // TURN * TURN))
    return best * 1e6


@contextlib.contextmanager
def logs_to_devnull() -> Iterator[None]:
    """`proxy.logging.configure`'s JSON pipeline into /dev/null while the block runs."""
    with open(os.devnull, "wb") as devnull:
        proxy_logging.configure("info", "json", stream=devnull)
        try:
            yield
        finally:
            proxy_logging.flush_logs()
            proxy_logging.reset()


async def lane_parts() -> list[tuple[str, Callable[[], Any]]]:
    """Each part of a lane hit as a call, by name, on objects as `init_app` builds them."""
    metrics = Metrics()
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    callers = Authenticator(
        [CallerConfig(name="bench", key_sha256=(digest,), organizations=("acme",))], metrics
    )
    cache = InvoiceCache(CacheConfig(), metrics, prepare=FastLane.prepare)
    body = b'{"id":"hot-000","total":12345}' * 4

    async def fetch(organization: str, invoice_id: str) -> Fetched:
        return Fetched(200, body, FINAL)

    await cache.load("acme", "hot-000", fetch)
    lane = FastLane(callers, cache, metrics)
    reader = HeadReader(8190, 100)
    heads = reader.read(HEAD)
    connection = KnownKey()  # one keep-alive connection's, as under wrk

    def idle() -> bool:
        return True  # as the protocol's check finds a keep-alive connection between requests

    assert heads is not None, "not a clean head"
    assert lane.answer(heads[0], None, connection, idle) is not None, "not a hit"
    head = heads[0]
    fields: dict[str, Any] = {
        "request_id": request_id_for(None), "method": "GET", "caller": "bench", "auth": "key",
        "organization": "acme", "invoice_id": "hot-000", "status": 200, "cache": "hit",
        "seconds": 0.000006,
    }  # fmt: skip

    def read_and_answer() -> None:
        found = reader.read(HEAD)
        assert found is not None
        lane.answer(found[0], None, connection, idle)

    misses = itertools.cycle([HEAD.replace(b"hot-000", b"new-%04d" % i) for i in range(1000)])

    def miss_look() -> None:
        found = reader.read(next(misses))
        assert found is not None and lane.answer(found[0], None, connection, idle) is None

    return [
        ("HeadReader.read", lambda: reader.read(HEAD)),
        ("FastLane.answer (all below)", lambda: lane.answer(head, None, connection, idle)),
        ("  middleware.log_request", lambda: log_request(**fields)),
        ("  Metrics.request_done", lambda: metrics.request_done("bench", 200, "hit", 6e-6)),
        ("  InvoiceCache.count_hit", cache.count_hit),
        ("  Authenticator.known_on", lambda: callers.known_on(connection, "Bearer " + KEY, None)),
        (
            "  (Authenticator.known_on: a new connection)",
            lambda: callers.known_on(KnownKey(), "Bearer " + KEY, None),
        ),
        ("  InvoiceCache.peek", lambda: cache.peek(("acme", "hot-000"))),
        ("  request_id_for", lambda: request_id_for(None)),
        ("read + answer", read_and_answer),
        ("a miss: read + answer (aiohttp answers it)", miss_look),
    ]


async def parts(calls: int) -> list[tuple[str, float]]:
    return [(name, best_of_five(call, calls)) for name, call in await lane_parts()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hit_parts", description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args(argv)
    with logs_to_devnull():
        rows = asyncio.run(parts(args.calls))
    print(f"best of 5 runs of {args.calls:,} calls, us per call")
    print("| part | us |")
    print("| --- | ---: |")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
