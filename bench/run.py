"""`make bench`: invoice-proxy against nginx `proxy_cache`, and a bare aiohttp floor.

One run on 127.0.0.1: the PlanetScale stand-in, invoice-proxy (JSON request log to a
file, metrics on; the hit fast lane on, as by default), its twin with
`server.fast_lane = false`, nginx (one worker, an equivalent cache) and a bare aiohttp
app. The proxies run this checkout's code (`python -m proxy serve`). Every server is
pinned to core 0; the load generators (wrk, and this process, which runs the Python
generator in bench/loadgen.py) to core 1. It measures, alternating between the
servers, round by round:

- hit throughput: wrk -t1 -c50 over 100 cached invoices (median of the rounds), and
  the ratios proxy/nginx and proxy/(fast_lane=false) (issue 14);
- hit latency p50/p99 at a fixed rate, half of the proxy's peak (open loop);
- upstream requests caused by 500 concurrent first requests for 50 fresh invoices;
- the miss path (issue 14), with four more proxies, two with the fast lane on and two
  off: misses/s under wrk (every request a fresh invoice), the proxy's CPU per miss,
  and misses one at a time;
- workers (issue 14): hit throughput with `server.workers = 2` (worker 0 on core 0,
  worker 1 on core 1 beside wrk) against the one-worker proxy, and the CPU each used;
- the proxy's resident memory before and after caching 100,000 invoices;
- the fleet level (issue 8), with redis-server and four more proxies: local-hit
  throughput with `[shared]` configured against without it, the latency of a shared
  hit (a local miss answered from Redis), and the upstream requests of 300 concurrent
  first requests for 30 fresh invoices spread over three proxies sharing one Redis;
- callers and TLS (issue 15), with two more proxies and a static JWKS server: hit
  throughput of a JWT caller against a key caller (target: at least 0.9), and over
  HTTPS against plain HTTP (recorded);

The machine may be shared: before each measurement the bench syncs the page cache
(the request logs), and a measurement during which other processes took CPU is
repeated (bounded); the table says how loaded the kept ones were.

Then it prints a table and writes bench/RESULTS.md. When a target is missed and py-spy
is installed (or with --profile), it also records where the proxy's time goes: under
hits (the fast lane's proxy) when a hit target is missed, under misses when the miss
path's is.

    python -m bench.run [--profile] [--no-write] [--keep] [--quick]

--quick runs every measurement once and as short as it can be (1 round, 1-second wrk
runs, a few fresh invoices, a fill of 1,000; bench/figures.py's QUICK): a check that
the bench works end to end, not figures. It never writes RESULTS.md.

The parts: bench/harness.py starts and asks the processes, bench/scenarios.py
measures, bench/figures.py holds the sizes, the figures and the targets,
bench/report.py prints the table and writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
from pathlib import Path

from . import report, scenarios
from .figures import QUICK, Results, Settings
from .harness import (
    NOISE_LIMIT_CORES,
    BenchError,
    Processes,
    Quiet,
    client_core,
    start_servers,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--profile", action="store_true", help="always record a py-spy profile")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--quick", action="store_true", help="every measurement once, shortest (implies --no-write)"
    )
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk", "taskset", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make bench`, which installs it")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the benchmark needs 2 cores: one for the servers, one for the load")

    settings = QUICK if args.quick else Settings()
    results = Results(
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        settings=settings,
    )
    workdir = Path(tempfile.mkdtemp(prefix="invoice-proxy-bench-"))
    processes = Processes()
    quiet = Quiet(
        processes,
        results.noise,
        max_repeats=settings.max_repeats,
        max_total_repeats=settings.max_total_repeats,
        wait_s=settings.quiet_wait_s,
    )
    try:
        with client_core():
            servers = start_servers(processes, workdir, hot_ids=scenarios.hot_ids(settings))
            processes.note_children()
            load = quiet.wait(settings.start_quiet_wait_s)
            if load.foreign_cores + load.steal_cores > NOISE_LIMIT_CORES / 2:
                print(f"other processes keep {load.foreign_cores:.2f} cores busy: noisy figures")
            bench = scenarios.prepare(processes, servers, quiet, settings)
            scenarios.measure(bench, results, want_profile=args.profile)
            if not args.profile:
                scenarios.profile_all(bench, results, results.missed_profiles())
    except BenchError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        processes.stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(report.table(results))
    print()
    print(report.misses_lines(results.misses, settings))
    print()
    print(report.workers_lines(results.workers, settings))
    print()
    print(report.fleet_lines(results.fleet, settings))
    print()
    print(report.callers_lines(results.callers, settings))
    print()
    print(report.verdict_lines(results))
    if results.profiles:
        print()
        print(report.profile_lines(results.profiles, settings))
    if not (args.no_write or args.quick):
        report.write_results(results, report.machine())
        print(f"\nwritten: {report.RESULTS.relative_to(report.BENCH.parent)}")


if __name__ == "__main__":
    main()
