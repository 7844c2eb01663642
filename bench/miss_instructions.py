"""What one whole miss costs in CPU instructions, the fast lane on and off: issue 14's
miss figure without the noise of a shared machine's clock.

`invoice-proxy serve` runs under `valgrind --tool=callgrind`, which counts the
instructions the process runs in user space (the kernel's part, its reads and writes,
is the same either way and is not counted); the stand-in runs beside it, not counted.
Fresh invoices are asked one at a time over one keep-alive connection, every one a
miss the stand-in answers. A run of `few` misses and one of `few + many` give the
figure: the difference of their counts by `many`, in which starting, getting ready and
stopping cancel out. Both sides run at once, each its own process.

    python -m bench.miss_instructions [--few 100] [--many 500]

(Alone, it starts the bench's servers to have the stand-in; `make bench` counts it as
part of the miss path.)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import uvloop

from . import loadgen
from .figures import Settings
from .harness import (
    PROXY_COMMAND,
    BenchError,
    Processes,
    Proxy,
    Servers,
    client_core,
    invoice_path,
    start_servers,
)
from .instructions import collected

# The hash seed fixed, as in bench.instructions: sets and dicts laid out alike each run.
CALLGRIND = (
    "env", "PYTHONHASHSEED=0", "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
)  # fmt: skip
# A Python under callgrind takes about 40 s to import the service and start it.
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0
DEFAULTS = Settings()  # the run's sizes, as `make bench` counts them


def per_miss(
    servers: Servers, processes: Processes, sides: Mapping[str, bool], few: int, many: int
) -> dict[str, float]:
    """Instructions per miss of each side (by name: its `server.fast_lane`)."""
    names = itertools.count()
    short = _count(servers, processes, sides, few, names)
    long = _count(servers, processes, sides, few + many, names)
    return {side: (long[side] - short[side]) / many for side in sides}


def _count(
    servers: Servers, processes: Processes, sides: Mapping[str, bool], misses: int,
    names: Iterator[int],
) -> dict[str, int]:  # fmt: skip
    """The instructions of a proxy of each side that answers `misses` fresh invoices.
    The proxies start at once (each takes about 40 s), so neither idles longer."""
    command = (*CALLGRIND, *PROXY_COMMAND)

    def start(side: str) -> Proxy:
        return servers.start_proxy(
            processes,
            f"callgrind-{next(names)}",
            fast_lane=sides[side],
            core="0,1",
            command=command,
            start_timeout_s=START_TIMEOUT_S,
        )

    with concurrent.futures.ThreadPoolExecutor(len(sides)) as starting:
        proxies = dict(zip(sides, starting.map(start, sides), strict=True))
    uvloop.run(_misses(proxies, misses, servers.authorization))
    for proxy in proxies.values():
        proxy.process.terminate()
    counts = {}
    for side, proxy in proxies.items():
        try:
            proxy.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{proxy.name} did not stop within {STOP_TIMEOUT_S:.0f}s") from None
        assert proxy.log is not None
        counts[side] = collected(proxy.log.read_text(errors="replace"))
    return counts


async def _misses(proxies: Mapping[str, Proxy], misses: int, authorization: str) -> None:
    async def one_side(proxy: Proxy) -> None:
        paths = [invoice_path(f"{proxy.name}-{i}") for i in range(misses)]
        answers = await loadgen.closed_loop(proxy.port, paths, authorization, connections=1)
        if answers.statuses != {200: misses}:
            raise BenchError(f"{proxy.name}: {misses} misses, answered {dict(answers.statuses)}")

    await asyncio.gather(*(one_side(proxy) for proxy in proxies.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_instructions", description=__doc__)
    parser.add_argument("--few", type=int, default=DEFAULTS.miss_callgrind_few)
    parser.add_argument("--many", type=int, default=DEFAULTS.miss_callgrind_many)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: run `make bench`, which installs it")
    workdir = Path(tempfile.mkdtemp(prefix="invoice-proxy-callgrind-"))
    processes = Processes()
    try:
        with client_core():
            servers = start_servers(processes, workdir, hot_ids=[])
            counts = per_miss(servers, processes, {"on": True, "off": False}, args.few, args.many)
    except BenchError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"callgrind, instructions per miss ({args.many:,} misses more than {args.few:,})")
    print(f"  fast_lane = true:  {counts['on']:,.0f}")
    print(f"  fast_lane = false: {counts['off']:,.0f}")
    print(f"  on / off: {counts['on'] / counts['off']:.3f}")


if __name__ == "__main__":
    main()
