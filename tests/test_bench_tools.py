"""The in-process benchmarks still measure what they say (they run without nginx or wrk)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import harness, hit_parts, instructions, log_lines, pauses, profile
from bench.figures import LANE_OFF, LANE_ON, Misses

from .processes import port_taken_first


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


def test_a_bench_proxy_whose_port_was_taken_first_starts_again_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench` starts a dozen proxies on ports found free; one taken by another
    process before the proxy binds it is a `start_failed`, and the bench starts that
    proxy again on other ports instead of stopping half-way."""
    processes = harness.Processes()
    credential = harness.write_credential(tmp_path, "bench-token-id", "pscale_tkn_bench")

    def config(port: int, admin_port: int) -> str:
        return harness.proxy_config(
            port=port, admin_port=admin_port, upstream_url="http://127.0.0.1:9",
            credential=credential, caller="bench", caller_key="k" * 43, server={},
            upstream={}, cache={}, logging={},
        )  # fmt: skip

    with port_taken_first(harness, monkeypatch) as busy:
        try:
            proxy = harness.start_proxy(processes, tmp_path, "taken", config, core=None)
            assert proxy.port != busy
            assert proxy.ready()
        finally:
            processes.stop_all()
    assert "a port was taken before it bound it; trying others" in capsys.readouterr().out


def test_any_bench_server_whose_port_was_taken_first_starts_again_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stand-in, nginx, the bare app, Redis and the JWKS server start as the proxies
    do: on a port found free, again on another when it was taken first. The port counts
    as theirs only when they listen on it: the socket that took it does not."""
    processes = harness.Processes()
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    serve = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    serve += ["--directory", str(tmp_path)]
    with port_taken_first(harness, monkeypatch) as busy:
        try:
            port, process = harness.start_listening(
                processes, "a static server", None, lambda port: [*serve, str(port)],
                tmp_path / "static.log",
            )  # fmt: skip
            assert port != busy
            assert harness.listens_on(process.pid, port)
            assert harness.http_get(f"http://127.0.0.1:{port}/jwks.json") == (200, b'{"keys": []}')
        finally:
            processes.stop_all()
    out = capsys.readouterr().out
    assert "a static server: a port was taken before it bound it; trying others" in out


def test_a_port_is_a_servers_own_only_while_that_server_listens_on_it() -> None:
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        port = int(ours.getsockname()[1])
        assert not harness.listens_on(os.getpid(), port), "bound, not listening"
        ours.listen()
        assert harness.listens_on(os.getpid(), port)
        child = subprocess.Popen(["sleep", "30"])
        try:
            assert not harness.listens_on(child.pid, port), "another process's listener"
        finally:
            child.kill()
            child.wait()
    assert not harness.listens_on(os.getpid(), port)


def test_a_server_that_ends_before_writing_its_log_is_reported_with_its_exit_code(
    tmp_path: Path,
) -> None:
    """A server the bench cannot start (a tool missing, a command failing at once) may
    end before its log exists: the bench says how it ended, not FileNotFoundError."""
    processes = harness.Processes()
    try:
        process = processes.start("quitter", ["sh", "-c", "exit 3"], tmp_path / "out.log")
        with pytest.raises(harness.BenchError, match=r"quitter exited with 3:\n\(.*No such file"):
            harness.wait_until(lambda: False, "quitter", process, tmp_path / "never.log", 10)
    finally:
        processes.stop_all()


@given(
    st.lists(
        st.tuples(
            st.floats(500, 5000), st.floats(0.5, 1.5), st.floats(0.6, 1.6)
        ),  # misses/s with the lane off, on/off, the host's speed in that pair
        min_size=2,
        max_size=20,
    )
)
def test_the_miss_figure_and_its_noise_do_not_move_with_the_hosts_speed(
    pairs: list[tuple[float, float, float]],
) -> None:
    """Each round of the miss part is a pair measured seconds apart, which shares the
    host's speed of the moment: the figure (the median of the pairs' on/off) and its
    noise are those of the pairs' ratios, however the speed drifts between the pairs."""
    steady, drifting = Misses(), Misses()
    steady.throughput = {
        LANE_ON: [off * ratio for off, ratio, _ in pairs],
        LANE_OFF: [off for off, _, _ in pairs],
    }
    drifting.throughput = {
        LANE_ON: [off * ratio * speed for off, ratio, speed in pairs],
        LANE_OFF: [off * speed for off, _, speed in pairs],
    }
    assert drifting.ratio == pytest.approx(steady.ratio)
    assert drifting.noise == pytest.approx(steady.noise, abs=1e-9)
    ratios = sorted(steady.ratios())  # each pair's on/off, as divided from its rounds
    assert ratios[0] <= steady.ratio <= ratios[-1]
    assert 0 <= steady.noise <= (ratios[-1] - ratios[0]) / 2 + 1e-9


# What wrk printed in a `make bench` run on this VM when it was not scheduled for 3 s: a
# 5 s run that took 8.04 s, the 50 requests in flight then counted as timeouts.
STALLED_WRK = """Running 5s test @ http://127.0.0.1:32817
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   801.82us  783.30us  36.41ms   98.31%
    Req/Sec    64.72k    11.00k   83.04k    86.27%
  327891 requests in 8.04s, 93.43MB read
  Socket errors: connect 0, read 0, write 0, timeout 50
Requests/sec:  40770.20
Transfer/sec:     11.62MB
"""


@pytest.mark.parametrize(
    ("out", "stalled"),
    [
        (STALLED_WRK, True),
        # The server itself too slow: the run ended on time, its requests timed out.
        (STALLED_WRK.replace("in 8.04s", "in 5.01s"), False),
        # Refused or broken connections, or more timeouts than requests in flight.
        (STALLED_WRK.replace("read 0", "read 3"), False),
        (STALLED_WRK.replace("timeout 50", "timeout 51"), False),
        (STALLED_WRK.replace("Socket", "Non-2xx or 3xx responses: 7\n  Socket"), False),
        (STALLED_WRK.replace("in 8.04s", "in 1.02m"), True),
    ],
)
def test_a_wrk_run_that_stalled_is_told_from_one_that_saw_errors(
    monkeypatch: pytest.MonkeyPatch, out: str, stalled: bool
) -> None:
    """A stalled run says nothing of the server and is measured again (`Stalled`); a run
    with any other error stops the bench, as a server that fails must."""

    def wrk_printed(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    # wrk comes with `make bench`, not `make test`: what it printed is what is read here.
    monkeypatch.setattr(harness.subprocess, "run", wrk_printed)
    with pytest.raises(harness.BenchError) as raised:
        harness.wrk(32817, Path("hot.lua"), 5, 50)
    assert isinstance(raised.value, harness.Stalled) is stalled


def test_a_measurement_in_which_wrk_stalled_is_taken_again() -> None:
    noise = harness.Noise()
    quiet = harness.Quiet(
        harness.Processes(), noise, max_repeats=1, max_total_repeats=0, wait_s=0
    )  # the run's other repeats are used up: a stalled run is repeated all the same
    runs = iter([harness.Stalled("wrk stalled"), 1234.0])

    def measurement() -> float:
        got = next(runs)
        if isinstance(got, Exception):
            raise got
        return got

    assert quiet.measure("a round", measurement)[0] == 1234.0
    assert noise.stalled == 1
    runs = iter([harness.Stalled("wrk stalled"), harness.Stalled("again")])
    with pytest.raises(harness.Stalled, match="again"):
        quiet.measure("a round", measurement)
