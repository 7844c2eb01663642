"""`server.workers = N`: N processes serving one API port, each a whole proxy.

The workers bind the API port with SO_REUSEPORT, so the kernel spreads connections
over them. Each has its own local cache, upstream session, rate cap and metrics;
with `[shared]` they share Redis as replicas do. Worker i serves the admin listener
on `admin_port + i`: its /metrics, /healthz, /readyz and purge are its own, and
Prometheus scrapes each port (per-process metrics: counters never mix or reset
when another worker restarts; sum them by pod).

The parent only supervises: it forwards SIGTERM, SIGINT and SIGHUP to the workers,
and when a worker ends by itself it stops the others and exits 1, so that the
container (or systemd) restarts the whole set.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

import structlog

from .config import Config

log = structlog.get_logger("proxy.workers")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long after the shutdown grace period a worker may take before it is killed.
_EXIT_MARGIN_S = 5.0


def worker_config(config: Config, index: int) -> Config:
    """Worker `index`'s configuration: the same, but its own admin port."""
    return replace(
        config, server=replace(config.server, admin_port=config.server.admin_port + index)
    )


def run_workers(count: int, target: Callable[[int], int], grace_s: float) -> int:
    """Run `target(i)` in `count` forked processes until a signal stops them; the exit code.

    Call it before any event loop or thread exists (fork copies only the caller's thread).
    """
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker, args=(target, i), name=f"invoice-proxy-worker-{i}")
        for i in range(count)
    ]
    stopping = False  # a signal asked the workers to stop
    unprompted = False  # a worker ended by itself

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    # Signals wait until every worker exists and the handlers are in place; the workers
    # inherit the mask and unblock it once their own handlers are set.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    try:
        for worker in workers:
            worker.start()
        for signum in _SIGNALS:
            signal.signal(signum, forward)
        log.info("workers_started", workers=count, pids=[w.pid for w in workers])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

        ended = multiprocessing.connection.wait([w.sentinel for w in workers])
        if not stopping:
            unprompted = True
            index = next(i for i, w in enumerate(workers) if w.sentinel in ended)
            workers[index].join()  # reaped: its exit code is known
            log.error("worker_exited", worker=index, exitcode=workers[index].exitcode)
            forward(signal.SIGTERM, None)
        for worker in workers:
            worker.join(grace_s + _EXIT_MARGIN_S)
            if worker.exitcode is None:
                log.error("worker_killed", pid=worker.pid, after_s=grace_s + _EXIT_MARGIN_S)
                worker.kill()
                worker.join()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    failed = unprompted or any(w.exitcode != 0 for w in workers)
    log.info("workers_stopped", exitcodes=[w.exitcode for w in workers])
    return 1 if failed else 0


def _worker(target: Callable[[int], int], index: int) -> None:
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    _stop_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    structlog.contextvars.bind_contextvars(worker=index)
    sys.exit(target(index))


def _stop_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, even by SIGKILL (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl: stop now
        os.kill(os.getpid(), signal.SIGTERM)
