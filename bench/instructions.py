"""What each part of a fast-lane hit costs in CPU instructions (callgrind): figures the
noise of a shared VM does not move, to compare two versions of the code.

The parts of `python -m bench.hit_parts`, each called `--calls` times in a child
Python under `valgrind --tool=callgrind`; a child that makes no call is the baseline,
and a part's figure is (its child's instructions - the baseline's) / calls. The log
lines are written after each 50 calls, as under load. The hash seed is fixed, so two
runs of the same code agree to about 1 %.

    python -m bench.instructions [--calls 5000] [--part NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

from proxy import logging as proxy_logging

from .hit_parts import TURN, lane_parts, logs_to_devnull

_COLLECTED = re.compile(r"Collected : (\d+)")


def collected(stderr: str) -> int:
    """The instruction count callgrind reports at the end of a run."""
    found = _COLLECTED.findall(stderr)
    if not found:
        raise SystemExit(f"callgrind reported no count:\n{stderr[-2000:]}")
    return int(found[-1])


def child(part: str, calls: int) -> None:
    """Call one part `calls` times (none: the baseline), as a child under callgrind."""

    async def run() -> None:
        found = dict(await lane_parts())
        call = found[part]
        for done in range(calls):
            call()
            if done % TURN == TURN - 1:
                proxy_logging.flush_logs()

    with logs_to_devnull():
        asyncio.run(run())


def instructions(part: str, calls: int) -> int:
    """The instructions of a child Python calling `part` `calls` times."""
    argv = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "bench.instructions", "--child", part, str(calls),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{part}: the child failed:\n{done.stderr[-2000:]}")
    return collected(done.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--part", action="append", help="a part's name (default: every part)")
    parser.add_argument("--child", nargs=2, metavar=("PART", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: run `make bench`, which installs it")
    names = _names()
    wanted = [name for name in names if not args.part or name.strip() in args.part]
    baseline = instructions(names[0], 0)
    print(f"callgrind, {args.calls:,} calls a part, instructions per call")
    print("| part | instructions |")
    print("| --- | ---: |")
    for name in wanted:
        count = (instructions(name, args.calls) - baseline) / args.calls
        print(f"| {name} | {count:,.0f} |", flush=True)


def _names() -> list[str]:
    with logs_to_devnull():
        return [name for name, _ in asyncio.run(lane_parts())]


if __name__ == "__main__":
    main()
