"""The in-process benchmarks still measure what they say (they run without nginx or wrk)."""

from __future__ import annotations

import re

import pytest

from bench import hit_parts, log_lines, profile


def test_hit_parts_times_a_lane_hit_and_each_of_its_parts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hit_parts.main(["--calls", "100"])  # it asserts that the lane answers its hit
    rows = dict(re.findall(r"^\| +([^|]+?) \| ([\d.]+) \|$", capsys.readouterr().out, re.M))
    assert {"HeadReader.read", "FastLane.answer (all below)", "read + answer"} <= rows.keys()
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
