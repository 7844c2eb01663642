"""The in-process benchmarks still measure what they say (they run without nginx or wrk)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from bench import hit_parts, instructions, log_lines, pauses, profile


def test_hit_parts_times_a_lane_hit_and_each_of_its_parts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hit_parts.main(["--calls", "100"])  # it asserts that the lane answers its hit
    rows = dict(re.findall(r"^\| +([^|]+?) \| ([\d.]+) \|$", capsys.readouterr().out, re.M))
    assert {
        "HeadReader.read", "FastLane.answer (all below)", "read + answer",
        "a miss: read + answer (aiohttp answers it)",
    } <= rows.keys()  # fmt: skip
    assert all(float(us) > 0 for us in rows.values())


def test_the_log_line_benchmark_compares_the_same_line_three_ways() -> None:
    log_lines.check_same_lines()  # raises if the pipelines' lines differ


def test_a_profile_counts_the_request_metrics_where_they_run() -> None:
    """The hit's counts are proxy/metrics.py's own code, with no prometheus_client below."""
    lane = "answer (/work/proxy/lane.py:310)"
    collapsed = (
        f"run (/usr/lib/python3.11/asyncio/runners.py:118);{lane};"
        "request_done (/work/proxy/metrics.py:112) 3\n"
        f"run (/usr/lib/python3.11/asyncio/runners.py:118);{lane} 1\n"
    )
    parts = dict(profile.summarise(collapsed).parts)
    assert parts["request metrics (proxy/metrics.py, prometheus_client)"] == 0.75


def test_the_instruction_count_child_calls_each_part_of_a_hit() -> None:
    """What `python -m bench.instructions` runs under callgrind: every part, as named."""
    for name in ("HeadReader.read", "  middleware.log_request", "read + answer"):
        instructions.child(name, 120)  # a part that is no longer a lane hit raises
    with pytest.raises(KeyError):
        instructions.child("no such part", 1)


def test_the_instruction_count_is_callgrinds_last_total() -> None:
    stderr = "==1== Events    : Ir\n==1== Collected : 123456789\n==1==\n==1== I   refs: 1\n"
    assert instructions.collected(stderr) == 123456789
    with pytest.raises(SystemExit):
        instructions.collected("valgrind: not found")


def test_the_pause_probe_reports_the_time_its_core_was_taken_from_it() -> None:
    """A probe stopped for 100 ms (as a stalled core would stop it) reports that pause,
    and the share of its window in which arriving work would have waited over 1 ms."""
    probe = pauses.Probe("0", 1.0)  # returns once the probe spins
    try:
        time.sleep(0.2)
        os.kill(probe.process.pid, signal.SIGSTOP)
        time.sleep(0.1)
    finally:
        os.kill(probe.process.pid, signal.SIGCONT)
    found = probe.result()
    assert found.longest >= 0.1
    assert found.waiting_over(0.001) >= 0.099
    assert found.paused >= found.waiting_over(0.001) + 0.001
