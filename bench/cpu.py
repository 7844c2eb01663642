"""How much CPU *other* processes took while a figure was measured.

The machine may be shared (another session running its tests, a noisy VM neighbour).
A `Meter` compares the CPU time all cores spent busy (/proc/stat) with the CPU time
of the bench's own processes (/proc/PID/stat, this process's waited children, such
as wrk, included); the difference is foreign load, in cores. Steal time (the
hypervisor running someone else) is reported apart. Both are approximate (jiffies).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _system() -> tuple[int, int]:
    """(busy, steal) jiffies of all cores together."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq, steal


def _process(pid: int, with_children: bool = False) -> int:
    """utime + stime jiffies of `pid` (and of its waited children); 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text.rsplit(")", 1)[1].split()
    # Fields after "(comm)": state is [0], utime [11], stime [12], cutime [13], cstime [14].
    used = int(fields[11]) + int(fields[12])
    if with_children:
        used += int(fields[13]) + int(fields[14])
    return used


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) the processes have used so far, in seconds."""
    return sum(_process(pid) for pid in pids) / TICK


def waited_children_seconds() -> float:
    """CPU time of this process's children that have ended and been waited for (wrk)."""
    times = os.times()
    return times.children_user + times.children_system


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Load:
    foreign_cores: float  # CPU other processes used, in cores (1.0: a whole core)
    steal_cores: float


class Meter:
    """Measure foreign load over a stretch of time; `ours` lists the bench's processes."""

    def __init__(self, ours: Callable[[], Iterable[int]]) -> None:
        self._ours = ours
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, int, int, int]:
        busy, steal = _system()
        mine = _process(os.getpid(), with_children=True)
        mine += sum(_process(pid) for pid in self._ours())
        return time.monotonic(), busy, steal, mine

    def restart(self) -> None:
        self._start = self._snapshot()

    def load(self) -> Load:
        t0, busy0, steal0, mine0 = self._start
        t1, busy1, steal1, mine1 = self._snapshot()
        seconds = max(t1 - t0, 1e-3) * TICK
        foreign = max(0, (busy1 - busy0) - (mine1 - mine0))
        return Load(foreign / seconds, (steal1 - steal0) / seconds)


def wait_for_quiet(ours: Callable[[], Iterable[int]], limit_cores: float, timeout_s: float) -> Load:
    """Wait (at most `timeout_s`) until other processes use less than `limit_cores`."""
    deadline = time.monotonic() + timeout_s
    while True:
        meter = Meter(ours)
        time.sleep(1.0)
        load = meter.load()
        if load.foreign_cores + load.steal_cores < limit_cores or time.monotonic() > deadline:
            return load
