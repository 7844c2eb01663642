"""Background work that cannot die: the supervisor, the credential refresher's failure
handling, /readyz during a persistent failure, and an on-demand reload that fails."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from proxy.app import CREDENTIALS, METRICS
from proxy.credential import Credential, CredentialStore, FileSource, running
from proxy.metrics import Metrics
from proxy.tasks import Backoff, supervise

from .helpers import (
    BILLING,
    TOKEN,
    TOKEN_ID,
    UPSTREAM_HEADER,
    FakeClock,
    ProxyFactory,
    Upstream,
    invoice_path,
    metric,
    wait_until,
    write_credential,
)

# Shaped like a PlanetScale token: it is in every bad input, and must be in no log line.
MARKER = "pscale_tkn_LEAKCHECK0123456789abcdef"
RELOADS = "invoice_proxy_credential_reloads_total"
TASK_FAILURES = "invoice_proxy_background_task_failures_total"
WAIT_S = 5.0  # upper bound for anything a test waits for

Logs = list[MutableMapping[str, Any]]


def events(logs: Logs, name: str) -> Logs:
    return [e for e in logs if e["event"] == name]


class ScriptedSource:
    """A credential source that fails on demand, with any exception class."""

    name = "scripted"

    def __init__(self, credential: Credential, poll_interval_s: float = 0.01) -> None:
        self.credential = credential
        self.poll_s = poll_interval_s
        self.fetch_failure: Exception | None = None
        self.poll_failure: Exception | None = None
        self.forced = 0

    @property
    def poll_interval_s(self) -> float:
        # Read by the refresher outside the fetch: a failure here reaches the supervisor.
        if self.poll_failure is not None:
            raise self.poll_failure
        return self.poll_s

    async def fetch(self, force: bool) -> Credential:
        self.forced += force
        if self.fetch_failure is not None:
            raise self.fetch_failure
        return self.credential

    async def aclose(self) -> None:
        return None


def token(store: CredentialStore) -> str | None:
    return None if store.current is None else store.current.token


# -- the supervisor -----------------------------------------------------------------------


async def test_supervisor_counts_logs_by_class_backs_off_and_carries_on() -> None:
    metrics = Metrics()
    script: list[Exception | None] = [KeyError(MARKER)] * 6 + [None, ZeroDivisionError(MARKER)]
    pauses: list[float] = []
    done = asyncio.Event()

    async def step() -> None:
        if not script:
            done.set()
            await asyncio.Event().wait()  # the last step: idle until cancelled
        failure = script.pop(0)
        if failure is not None:
            raise failure

    async def sleep(delay: float) -> None:
        pauses.append(delay)

    with capture_logs() as logs:
        task = asyncio.create_task(
            supervise(
                "credential_refresher",
                step,
                metrics,
                backoff=Backoff(base_s=1.0, max_s=8.0),
                sleep=sleep,
                rng=lambda: 1.0,  # the top of the jitter range
            )
        )
        async with asyncio.timeout(WAIT_S):
            await done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Doubling up to the cap; the success in between starts again from the base.
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 1.0]
    assert metric(metrics, TASK_FAILURES, task="credential_refresher") == 7
    failed = events(logs, "background_task_failed")
    assert [e["error"] for e in failed] == ["KeyError"] * 6 + ["ZeroDivisionError"]
    assert {e["reason"] for e in failed} == {"unexpected KeyError", "unexpected ZeroDivisionError"}
    assert all(e["at"].startswith("test_supervision.py:") for e in failed)
    assert MARKER not in repr(logs)


async def test_supervisor_jitter_spreads_pauses_between_half_and_the_whole_step() -> None:
    metrics = Metrics()
    pauses: list[float] = []
    draws = itertools.cycle([0.0, 0.5, 1.0])

    async def step() -> NoReturn:
        raise RuntimeError(MARKER)

    async def sleep(delay: float) -> None:
        pauses.append(delay)
        if len(pauses) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervise(
            "credential_refresher",
            step,
            metrics,
            backoff=Backoff(base_s=2.0, max_s=60.0),
            sleep=sleep,
            rng=lambda: next(draws),
        )
    assert pauses == [1.0, 3.0, 8.0]  # 2 * [0.5, 1], 4 * [0.5, 1], 8 * [0.5, 1]


# -- the credential refresher ---------------------------------------------------------------


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[CredentialStore, ScriptedSource, Metrics]]:
    source = ScriptedSource(Credential(TOKEN_ID, TOKEN, 1))
    metrics = Metrics()
    store = CredentialStore(
        source, metrics, max_backoff_s=0.05, task_backoff=Backoff(base_s=0.01, max_s=0.05)
    )
    async with running(store):
        yield store, source, metrics


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(MARKER),
        ZeroDivisionError(MARKER),
        KeyError(MARKER),
        ValueError(MARKER),
        RecursionError(MARKER),
        OverflowError(MARKER),
        AttributeError(MARKER),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_source_raising_any_exception_is_a_counted_failure_and_wake_still_reloads(
    scripted: tuple[CredentialStore, ScriptedSource, Metrics], failure: Exception
) -> None:
    store, source, metrics = scripted
    with capture_logs() as logs:
        source.fetch_failure = failure
        # More than one: the refresher went on polling after the first failure.
        await wait_until(
            lambda: metric(metrics, RELOADS, result="failure") >= 3, "failures counted"
        )
        assert token(store) == TOKEN  # the last good credential is kept
        source.poll_s = 3600.0  # from now on only a wake makes the refresher fetch
        successes = metric(metrics, RELOADS, result="success")
        source.fetch_failure = None
        await wait_until(
            lambda: metric(metrics, RELOADS, result="success") > successes, "recovered"
        )
        source.credential = Credential(TOKEN_ID, "rotated-token", 2)
        forced = source.forced
        store.wake()
        await wait_until(lambda: token(store) == "rotated-token", "reloaded on wake")
    assert source.forced == forced + 1
    name = type(failure).__name__
    failed = events(logs, "credential_reload_failed")
    assert failed and {e["error"] for e in failed} == {name}
    assert {e["reason"] for e in failed} == {f"the scripted source failed: unexpected {name}"}
    assert all(e["keeping_last"] for e in failed)
    assert MARKER not in repr(logs)


async def test_an_exception_outside_the_fetch_reaches_the_supervisor_and_wake_still_reloads() -> (
    None
):
    """On a clock the test advances: the supervisor's pauses and the polls end only then."""
    clock = FakeClock(monotonic=True)
    source = ScriptedSource(Credential(TOKEN_ID, TOKEN, 1))
    metrics = Metrics()
    store = CredentialStore(
        source,
        metrics,
        clock=clock.time,
        wait=clock.wait,
        max_backoff_s=0.05,
        task_backoff=Backoff(base_s=0.01, max_s=0.05),
    )
    with capture_logs() as logs:
        async with running(store):
            source.poll_failure = ZeroDivisionError(MARKER)
            await clock.run_for(1.0, step=0.01)  # 1 s of pauses of at most 0.05 s
            assert metric(metrics, TASK_FAILURES, task="credential_refresher") >= 3
            source.credential = Credential(TOKEN_ID, "rotated-token", 2)
            store.wake()
            # The wake ends the supervisor's pause, and the fetch it asks for succeeds
            # even while the refresher's own code still fails.
            await wait_until(lambda: token(store) == "rotated-token", "reloaded on wake")
            source.poll_failure = None
            failures = metric(metrics, TASK_FAILURES, task="credential_refresher")
            fetched = metric(metrics, RELOADS, result="success")
            await clock.run_for(1.0, step=0.01)  # about 100 polls of 0.01 s
            assert metric(metrics, RELOADS, result="success") > fetched + 10  # it polls
    assert (
        metric(metrics, TASK_FAILURES, task="credential_refresher") == failures
    )  # recovered: no more failures
    failed = events(logs, "background_task_failed")
    assert failed and {e["error"] for e in failed} == {"ZeroDivisionError"}
    assert {e["task"] for e in failed} == {"credential_refresher"}
    assert all(e["at"] == f"{Path(__file__).name}:{_POLL_RAISE_LINE}" for e in failed)
    assert MARKER not in repr(logs)


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


_POLL_RAISE_LINE = _line_of("raise self.poll_failure")


async def test_a_wake_during_the_supervisor_backoff_is_served_at_once() -> None:
    source = ScriptedSource(Credential(TOKEN_ID, TOKEN, 1))
    metrics = Metrics()
    # A long pause after a failure: only the wake can end it within the test's wait.
    store = CredentialStore(source, metrics, task_backoff=Backoff(base_s=600.0, max_s=600.0))
    async with running(store):
        source.poll_failure = RuntimeError(MARKER)
        await wait_until(
            lambda: metric(metrics, TASK_FAILURES, task="credential_refresher") == 1,
            "the task failed",
        )
        source.credential = Credential(TOKEN_ID, "rotated-token", 2)
        store.wake()
        await wait_until(lambda: token(store) == "rotated-token", "reloaded on wake")


# -- hostile credential files --------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_non_strings = _json_values.filter(lambda v: not isinstance(v, str))


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity as Python writes them


_BAD_JSON = st.one_of(
    # An object with the marker as token_id and a token of the wrong type.
    st.builds(
        lambda extra, tok: _dumps({**extra, "token_id": MARKER, "token": tok}),
        st.dictionaries(st.text(max_size=8), _json_values, max_size=3),
        _non_strings,
    ),
    # The marker as token next to an unusable token_id, or with a control character.
    st.builds(lambda tid: _dumps({"token_id": tid, "token": MARKER}), _non_strings),
    st.builds(lambda tid: _dumps({"token_id": tid, "token": MARKER + "\x7f"}), _json_values),
    # Valid JSON that is not an object.
    st.builds(lambda v: _dumps([MARKER, v]), _json_values),
)
_ADVERSARIAL = st.sampled_from(
    [
        b"[" * 100_000 + MARKER.encode(),  # beyond the file size limit
        b"[" * 60_000 + MARKER.encode(),  # within it: deeper than the parser goes
        b'{"token_id": "%s", "token": %s}' % (MARKER.encode(), b"[" * 30_000),
        b'{"token_id": "%s", "token": %s}' % (MARKER.encode(), b"1" * 10_000),
        b'{"token_id": "%s", "token": %s}' % (MARKER.encode(), b"1" * 4000),
        b'{"token_id": "%s", "token": NaN}' % MARKER.encode(),
        b'{"token_id": "%s", "token": -Infinity}' % MARKER.encode(),
        b'{"token_id": "%s", "token": 1e999}' % MARKER.encode(),
        b'{"token_id": "%s", "token": "\\ud800"}' % MARKER.encode(),
        b'{"token_id": "a", "token": "%s", "token": 5}' % MARKER.encode(),
        b'{"token_id": "a", "token": "%s"' % MARKER.encode(),
        b'{"token_id": "a", "token": "%s"}' % (MARKER.encode() + b"\xff"),
        b"\xff\xfe" + '{"token_id": "a", "token": 1}'.encode("utf-16-le") + MARKER.encode(),
    ]
)
# Any bytes, then an unterminated string: never a JSON document, in any encoding.
_BAD_BYTES = st.binary(max_size=512).map(lambda raw: raw + b'"' + MARKER.encode())


def write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(".bad")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[tuple[CredentialStore, Path, Metrics]]:
    """A real file source and store, polling fast; one for all examples of a test."""
    path = tmp_path / "planetscale.json"
    write_credential(path)
    metrics = Metrics()
    store = CredentialStore(
        FileSource(str(path), poll_interval_s=0.01), metrics, max_backoff_s=0.05
    )
    async with running(store):
        yield store, path, metrics


_rotation = itertools.count()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=st.one_of(_BAD_BYTES, _BAD_JSON, _ADVERSARIAL))
# The parser's own limits, always tried (they ended the refresher before issue 12).
@example(content=b"[" * 60_000 + MARKER.encode())
@example(content=b'{"token_id": "%s", "token": %s}' % (MARKER.encode(), b'{"a":' * 20_000))
async def test_no_credential_file_content_stops_the_refresher(
    file_store: tuple[CredentialStore, Path, Metrics], content: bytes
) -> None:
    store, path, metrics = file_store
    good = store.current
    failures = metric(metrics, RELOADS, result="failure")
    with capture_logs() as logs:
        write_atomically(path, content)
        await wait_until(
            lambda: metric(metrics, RELOADS, result="failure") > failures, "the bad file is counted"
        )
        assert store.current == good  # the last good credential is kept
        rotated = f"rotated-token-{next(_rotation)}"
        write_credential(path, TOKEN_ID, rotated)
        await wait_until(lambda: token(store) == rotated, "the next good file is followed")
    assert events(logs, "credential_reload_failed")
    assert MARKER not in repr(logs)


# -- /readyz during a persistent failure -----------------------------------------------------


async def test_readyz_reports_a_persistent_failure_while_the_last_credential_serves(
    make_proxy: ProxyFactory, credential_file: Path
) -> None:
    proxy = await make_proxy()
    store = proxy.app[CREDENTIALS]
    credential_file.write_bytes(b"[" * 60_000 + MARKER.encode())

    async def ready() -> dict[str, Any]:
        response = await proxy.admin.get("/readyz")
        assert response.status == 200  # the replica still serves: it stays in the Service
        body: dict[str, Any] = await response.json()
        return body

    metrics = proxy.app[METRICS]
    assert not await store.refresh(force=True)
    # The rule: three failed fetches in a row are persistent; fewer are not reported.
    # (The refresher fails in the background too: compare with a count that held still.)
    for _ in range(5):
        failures = metric(metrics, RELOADS, result="failure")
        body = await ready()
        if metric(metrics, RELOADS, result="failure") == failures:
            break
    assert ("warning" in body) == (failures >= 3)
    for _ in range(3):
        assert not await store.refresh(force=True)
    body = await ready()
    assert body["status"] == "ready"
    assert body["warning"] == "credential_reload_failing"
    assert body["reason"] == f"file {credential_file} is not valid JSON"
    assert body["failures"] >= 4
    since = datetime.fromisoformat(body["failing_since"])
    assert since.tzinfo is not None and since <= datetime.now(since.tzinfo)
    assert MARKER not in json.dumps(body)

    # The last good credential still serves a miss.
    response = await proxy.api.get(invoice_path(), headers=BILLING)
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"

    write_credential(credential_file)
    assert await store.refresh(force=True)
    assert await ready() == {"status": "ready"}


# -- an on-demand reload that fails ----------------------------------------------------------


async def test_a_reload_after_rejection_that_raises_is_a_counted_502_not_a_500(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    source = ScriptedSource(Credential(TOKEN_ID, TOKEN), poll_interval_s=3600.0)
    proxy = await make_proxy(source=source)
    upstream.standin.accept_only(f"{TOKEN_ID}:another-token")  # PlanetScale refuses ours
    source.fetch_failure = RuntimeError(MARKER)
    with capture_logs() as logs:
        response = await proxy.api.get(invoice_path(), headers=BILLING)
    assert response.status == 502
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["code"] == "upstream_credential_rejected"
    assert source.forced == 2  # the first load, then the reload after the refusal
    # Refused, and (as SPEC asks) tried once more with the credential in hand.
    assert 1 <= upstream.standin.stats.unauthorized <= 2
    assert metric(proxy, RELOADS, result="failure") == 1
    assert metric(proxy, "invoice_proxy_requests_total", caller="billing-service", code="502") == 1
    assert metric(proxy, "invoice_proxy_upstream_credential_rejections_total") >= 0  # exported
    assert [e["error"] for e in events(logs, "credential_reload_failed")] == ["RuntimeError"]
    assert MARKER not in repr(logs)
    assert UPSTREAM_HEADER not in repr(logs)
