"""Background work that cannot die: every long-lived task runs under `supervise`.

A task that dies silently is the worst failure a service can have: everything looks
fine until the token is revoked. So a long-lived task is a `step` called again and
again; any exception a step raises (never a cancellation) is logged by class, counted
in `invoice_proxy_background_task_failures_total{task}`, and followed by a capped,
jittered backoff before the next step.

An exception's message can quote what the code was handling (a file's content, a
header): only the messages of the project's own safe error types are logged, every
other exception shows as its class and the line that raised it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import structlog

from .metrics import BACKGROUND_TASKS, Metrics

log = structlog.get_logger("proxy.tasks")

Step = Callable[[], Awaitable[object]]
Sleep = Callable[[float], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter, in seconds."""

    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """The pause after the `failures`-th failure in a row (1, 2, ...)."""
        cap = min(self.max_s, self.base_s * 2.0 ** min(max(failures, 1) - 1, 30))
        # Half fixed, half jitter: replicas that failed together spread out, and a
        # step that fails at once never spins.
        return cap * (0.5 + rng() / 2)


DEFAULT_BACKOFF = Backoff()


def safe_reason(exc: BaseException, safe: tuple[type[BaseException], ...] = ()) -> str:
    """What may be logged about `exc`: its message for our own safe types, else its class."""
    if safe and isinstance(exc, safe):
        return str(exc)
    return f"unexpected {type(exc).__name__}"


def raised_at(exc: BaseException) -> str:
    """`file.py:line` of the innermost frame: where a bug is, without any value."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


async def supervise(
    name: str,
    step: Step,
    metrics: Metrics,
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    sleep: Sleep = asyncio.sleep,
    rng: Callable[[], float] = random.random,
    safe_errors: tuple[type[BaseException], ...] = (),
) -> NoReturn:
    """Run `step` forever; a failure is logged, counted and backed off. Ends only by
    cancellation. `name` is one of `metrics.BACKGROUND_TASKS` (a bounded label)."""
    if name not in BACKGROUND_TASKS:
        raise ValueError(f"background task {name!r} is not in metrics.BACKGROUND_TASKS")
    failures_metric = metrics.background_task_failures.labels(task=name)
    failures = 0
    while True:
        try:
            await step()
        except Exception as exc:  # the point: nothing ends the task
            failures += 1
            failures_metric.inc()
            delay = backoff.delay(failures, rng)
            log.error(
                "background_task_failed",
                task=name,
                error=type(exc).__name__,
                reason=safe_reason(exc, safe_errors),
                at=raised_at(exc),
                failures=failures,
                retry_in_s=round(delay, 3),
            )
            # The traceback's frames hold the values the step was handling: drop them
            # now rather than keep them alive through the pause.
            del exc
            await sleep(delay)
        else:
            failures = 0


def start(name: str, work: Awaitable[NoReturn]) -> asyncio.Task[NoReturn]:
    """Start a supervised task; if it ever ends but by cancellation, that is logged."""
    task = asyncio.ensure_future(work)
    task.set_name(name)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[NoReturn]) -> None:
    if task.cancelled():
        return
    # Only a BaseException (SystemExit, KeyboardInterrupt) or a bug in `supervise`
    # itself gets here; it must not pass unseen.
    exc = task.exception()
    log.critical(
        "background_task_stopped",
        task=task.get_name(),
        error=type(exc).__name__ if exc is not None else None,
        at=raised_at(exc) if exc is not None else "",
    )


async def stop(task: asyncio.Task[NoReturn]) -> None:
    """Cancel a supervised task and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
