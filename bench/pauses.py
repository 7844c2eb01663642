"""How long this machine stops a running program on its own: the floor under a p99.

A loop pinned to one core reads the clock as fast as it can; each gap between two
readings longer than `GAP_S` is a pause, time in which the core ran something else or
nothing (the hypervisor's steal, a kernel thread, an interrupt). A request that arrives
at a core during a pause waits for the rest of it, whatever the server: the share of
the time in which such a wait would exceed a limit L is the sum over the pauses of
max(0, pause - L), over the window. An open-loop request waits on two cores, the
generator's and the server's; where that share reaches about 1 % (what a p99 leaves
out), no server measured here can show a p99 under L.

bench/scenarios.py probes both cores at once between the hit-latency rounds, with the
servers idle (a probe beside a server would take its CPU):

    python -m bench.pauses --seconds 5   # the child: "spinning", then the gaps as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .harness import BenchError, pinned

# A gap between two clock readings longer than this is a pause: a turn of the loop
# costs well under a microsecond, and a page fault a few microseconds.
GAP_S = 0.0002
_READY = "spinning"


@dataclass(frozen=True, slots=True)
class Pauses:
    """The pauses one core made while the probe ran for `seconds`."""

    core: str
    seconds: float
    gaps: tuple[float, ...]  # each longer than GAP_S, in seconds

    @property
    def paused(self) -> float:
        """The share of the window spent in pauses."""
        return sum(self.gaps) / self.seconds

    @property
    def longest(self) -> float:
        return max(self.gaps, default=0.0)

    def waiting_over(self, limit_s: float) -> float:
        """The share of the window in which work arriving would wait more than `limit_s`
        for this core alone."""
        return sum(gap - limit_s for gap in self.gaps if gap > limit_s) / self.seconds


def spin(seconds: float, gap_s: float = GAP_S) -> list[float]:
    """Read the clock for `seconds`; the gaps between readings longer than `gap_s`."""
    clock = time.perf_counter
    gaps = []
    last = clock()
    end = last + seconds
    while last < end:
        now = clock()
        if now - last > gap_s:
            gaps.append(now - last)
        last = now
    return gaps


class Probe:
    """A probe running on `core` (`python -m bench.pauses` pinned to it), once it spins."""

    def __init__(self, core: str, seconds: float) -> None:
        self.core = core
        self.seconds = seconds
        argv = [sys.executable, "-m", "bench.pauses", "--seconds", str(seconds)]
        self.process = subprocess.Popen(pinned(core, argv), stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != _READY:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"the pause probe on core {core} did not start")

    def result(self) -> Pauses:
        """Its pauses, once it has run its time."""
        out, _ = self.process.communicate(timeout=self.seconds + 30)
        if self.process.returncode != 0:
            raise BenchError(f"the pause probe on core {self.core} failed")
        return Pauses(self.core, self.seconds, tuple(json.loads(out)))


def probe(cores: Sequence[str], seconds: float) -> list[Pauses]:
    """The pauses of each of `cores`, probed at the same time for `seconds`."""
    probes: list[Probe] = []
    try:
        for core in cores:
            probes.append(Probe(core, seconds))
        return [p.result() for p in probes]
    finally:  # a probe that failed or timed out: none is left spinning
        for started in probes:
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pauses", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    gc.disable()  # a collection of the probe's own would read as a pause
    print(_READY, flush=True)
    print(json.dumps(spin(args.seconds)))


if __name__ == "__main__":
    main()
