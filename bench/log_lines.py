"""What the request log line costs, against the pipeline before orjson, in one run.

The line proxy/middleware.py writes for each request, through the pipeline
`proxy.logging.configure` installs, into /dev/null: many lines per event-loop turn, as
under load, so the writer flushes once per turn. In the same run and the same rounds:

- now: `middleware.log_request`, through `proxy.logging.request_line`, which runs the
  configured processors inline, with JSONRenderer's job done by orjson (bytes), the
  bytes writer on a binary stream;
- lazy proxy: the same pipeline through the module's `structlog.get_logger(...)` and
  `info(**fields)`, as proxy/middleware.py wrote the line before `BoundOnce`;
- before: the standard library's json renderer and the str writer (rebuilt below as they
  were), through the lazy proxy, on a text stream, as stdout was written before orjson;
- filtered: `log_request` with the level at warning: the floor.

CPU time (time.process_time: this process, user and system), the median of the rounds;
the ratio now/before is the median of each round's own ratio.

    python -m bench.log_lines [--rounds 7] [--lines 20000] [--batch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import select
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TextIO

import orjson
import structlog

from proxy import logging as proxy_logging
from proxy.middleware import log_request

from .cpu import Meter

RATE = 50_000  # lines a second: issue 14's figure


class StrLineWriter:
    """proxy/logging.py's LineWriter before orjson: str lines, a text stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def msg(self, message: str) -> None:
        self._lines.append(message)
        if self._loop is not None and not self._loop.is_closed():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)
        self._loop = loop

    info = msg

    def flush(self) -> None:
        self._loop = None
        if self._lines:
            lines, self._lines = self._lines, []
            for chunk in _whole_lines(lines, select.PIPE_BUF):
                self._stream.write(chunk)
                self._stream.flush()


def _whole_lines(lines: list[str], limit: int) -> Iterator[str]:
    start, size = 0, 0
    for i, line in enumerate(lines):
        if size and size + len(line) + 1 > limit:
            yield "\n".join(lines[start:i]) + "\n"
            start, size = i, 0
        size += len(line) + 1
    yield "\n".join(lines[start:]) + "\n"


def configure_before(stream: TextIO) -> None:
    """`proxy.logging.configure("info", "json")` as it was before orjson."""
    writer = StrLineWriter(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            proxy_logging.UTCTimestamper(),
            structlog.processors.format_exc_info,
            proxy_logging.redact_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=True,
    )


def configure_now(stream: Any, level: str = "info") -> None:
    proxy_logging.configure(level, "json", stream=stream)


REQUEST_IDS = [f"{os.urandom(8).hex()}{i:016x}" for i in range(1024)]


FIELDS = {
    "method": "GET",
    "caller": "billing-service",
    "auth": "key",
    "organization": "acme",
    "invoice_id": "inv_2025_01",
    "status": 200,
    "cache": "HIT",
}


def log_requests(emit: Callable[[str], None], count: int, offset: int) -> None:
    """`count` request lines (a cache hit), `emit(request_id)` writing each."""
    for i in range(offset, offset + count):
        emit(REQUEST_IDS[i % 1024])


def through_log_request(request_id: str) -> None:
    """The line as proxy/middleware.py writes it."""
    log_request(request_id=request_id, seconds=0.000412, **FIELDS)  # type: ignore[arg-type]


def through(log: Any) -> Callable[[str], None]:
    """The same line through `log.info(**fields)` (a lazy proxy)."""

    def emit(request_id: str) -> None:
        log.info(
            "request",
            request_id=request_id,
            **FIELDS,
            duration_ms=round(0.000412 * 1_000_000) / 1000,
        )

    return emit


async def _cpu_per_line(emit: Callable[[str], None], lines: int, batch: int) -> float:
    """CPU seconds per line for `lines` lines, `batch` per loop turn, flushes included."""
    start = time.process_time()
    for offset in range(0, lines, batch):
        log_requests(emit, min(batch, lines - offset), offset)
        await asyncio.sleep(0)  # the turn ends: the writer's flush runs
    return (time.process_time() - start) / lines


class Variant:
    def __init__(self, name: str, label: str, make_logger: Callable[[], Any]) -> None:
        self.name, self.label, self.logger = name, label, make_logger
        self.seconds: list[float] = []


def lazy_proxy(configure: Callable[[], None]) -> Callable[[], Callable[[str], None]]:
    """Configure, then a fresh lazy proxy, as a module's `structlog.get_logger(...)`."""

    def make() -> Callable[[str], None]:
        configure()
        return through(structlog.get_logger("proxy.access"))

    return make


def bound_once(configure: Callable[[], None]) -> Callable[[], Callable[[str], None]]:
    def make() -> Callable[[str], None]:
        configure()
        return through_log_request

    return make


def check_same_lines() -> None:
    """The three ways write the same line (apart from the timestamp)."""
    streams: list[Any] = [io.BytesIO(), io.BytesIO(), io.StringIO()]
    try:
        configure_now(streams[0])
        log_requests(through_log_request, 1, 0)
        configure_now(streams[1])
        log_requests(through(structlog.get_logger("proxy.access")), 1, 0)
        configure_before(streams[2])
        log_requests(through(structlog.get_logger("proxy.access")), 1, 0)
        proxy_logging.flush_logs()
    finally:
        proxy_logging.reset()
    lines = [json.loads(stream.getvalue()) for stream in streams]
    for line in lines:
        line.pop("timestamp")
    assert lines[0] == lines[1] == lines[2], lines


async def measure(
    rounds: int, lines: int, batch: int, binary: BinaryIO, text: TextIO
) -> list[Variant]:
    variants = [
        Variant("now", "log_request, bound once, orjson, bytes writer (now)",
                bound_once(lambda: configure_now(binary))),
        Variant("proxy", "the same through the lazy proxy (before BoundOnce)",
                lazy_proxy(lambda: configure_now(binary))),
        Variant("before", "lazy proxy, stdlib json, str writer (before orjson)",
                lazy_proxy(lambda: configure_before(text))),
        Variant("filtered", "log_request filtered out (level warning)",
                bound_once(lambda: configure_now(binary, "warning"))),
    ]  # fmt: skip
    try:
        for variant in variants:  # warm-up: caches, the regex, the first allocations
            await _cpu_per_line(variant.logger(), min(lines, 5000), batch)
        for _ in range(rounds):
            for variant in variants:
                variant.seconds.append(await _cpu_per_line(variant.logger(), lines, batch))
    finally:
        proxy_logging.reset()
        proxy_logging.flush_logs()
    return variants


def renderers_alone() -> tuple[float, float]:
    """Seconds per call of each renderer on the request line's event dict (best of 5)."""
    event_dict = {
        "request_id": REQUEST_IDS[0],
        **FIELDS,
        "duration_ms": 0.412,
        "event": "request",
        "level": "info",
        "timestamp": "2026-12-01T23:02:34.123456Z",
    }
    before = structlog.processors.JSONRenderer()
    calls = 20_000
    figures = []
    for render in (proxy_logging.render_json, before):
        timer = timeit.Timer(lambda render=render: render(None, "info", event_dict))
        figures.append(min(timer.repeat(5, calls)) / calls)
    return figures[0], figures[1]


def report(
    variants: list[Variant], renderers: tuple[float, float], rounds: int, lines: int, batch: int
) -> str:
    by_name = {variant.name: variant for variant in variants}
    rows = [
        f"The request line of proxy/middleware.py into /dev/null, {batch} lines per loop turn;"
        f" {rounds} rounds of {lines:,} lines each, medians of CPU time.",
        "",
        "| pipeline | us per line | lines/s (one core) | core at 50,000 lines/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for variant in variants:
        per_line = statistics.median(variant.seconds)
        rows.append(
            f"| {variant.label} | {per_line * 1e6:.2f} | {1 / per_line:,.0f} |"
            f" {RATE * per_line:.3f} |"
        )
    ratios = [
        now / before
        for now, before in zip(by_name["now"].seconds, by_name["before"].seconds, strict=True)
    ]
    rows += [
        "",
        f"ratio now/before: {statistics.median(ratios):.2f}"
        f" (rounds: {min(ratios):.2f}-{max(ratios):.2f})",
        f"the renderers alone: orjson {renderers[0] * 1e6:.2f} us, stdlib json"
        f" {renderers[1] * 1e6:.2f} us a line (ratio {renderers[0] / renderers[1]:.2f})",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.log_lines", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--lines", type=int, default=20_000, help="lines per variant and round")
    parser.add_argument("--batch", type=int, default=50, help="lines per event-loop turn")
    args = parser.parse_args(argv)
    check_same_lines()
    try:
        import uvloop
    except ImportError:
        run: Callable[[Any], list[Variant]] = asyncio.run
    else:
        run = uvloop.run
    meter = Meter(lambda: ())
    with open(os.devnull, "wb") as binary, open(os.devnull, "w") as text:
        variants = run(measure(args.rounds, args.lines, args.batch, binary, text))
    load = meter.load()
    print(
        f"Python {sys.version.split()[0]}, structlog {structlog.__version__},"
        f" orjson {orjson.__version__}; {os.cpu_count()} CPUs, other processes used"
        f" {load.foreign_cores:.1f} cores (steal {load.steal_cores:.1f}) during the run"
    )
    print(report(variants, renderers_alone(), args.rounds, args.lines, args.batch))


if __name__ == "__main__":
    main()
