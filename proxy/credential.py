"""The PlanetScale service token: where it comes from and how it is kept current.

A source (file, env, vault) knows how to fetch a `Credential`. The `CredentialStore`
holds the one in use, refreshes it in the background, and reloads it on demand when
PlanetScale refuses it. Nothing here ever logs or formats a token.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import structlog

from .clock import SYSTEM_CLOCK
from .metrics import Metrics
from .tasks import DEFAULT_BACKOFF, Backoff, raised_at, safe_reason, start, stop, supervise

log = structlog.get_logger("proxy.credential")

# A token id and token are short ASCII strings; anything else is a broken file.
_MAX_FIELD_LEN = 512
# A KV version is a small counter; beyond 2**53 a gauge cannot show it exactly.
MAX_VERSION = 2**53
# This many failed fetches in a row (with backoff: seconds for a file, minutes for
# Vault) are a persistent failure that /readyz reports; one half-written file is not.
PERSISTENT_FAILURES = 3


class CredentialError(Exception):
    """A credential could not be fetched. The message says why, never the value."""


class NoCredential(Exception):
    """No token for the requested organization can be had now (per_organization: its
    secret is missing or could not be read); worth asking again in `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("no PlanetScale token for this organization")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Credential:
    """A PlanetScale service token. Its repr never shows the token."""

    token_id: str = field(repr=False)
    token: str = field(repr=False)
    # The Vault KV version it came from; 0 for sources without versions.
    version: int = 0

    @property
    def header(self) -> str:
        """The upstream `Authorization` header value."""
        return f"{self.token_id}:{self.token}"

    def __repr__(self) -> str:
        return f"Credential(version={self.version})"


def credential_from_fields(
    data: object, *, token_id_field: str = "token_id", token_field: str = "token", version: int = 0
) -> Credential:
    """Build a credential from a decoded JSON object, naming what is wrong (never the value)."""
    if not isinstance(data, dict):
        raise CredentialError("expected a JSON object")
    values = []
    for name in (token_id_field, token_field):
        value = data.get(name)
        if value is None:
            raise CredentialError(f"field {name!r} is missing")
        if not isinstance(value, str):
            raise CredentialError(f"field {name!r} is not a string")
        if not value.strip():
            raise CredentialError(f"field {name!r} is empty")
        if len(value) > _MAX_FIELD_LEN or not _is_header_safe(value):
            raise CredentialError(f"field {name!r} is not a valid token string")
        values.append(value.strip())
    return Credential(values[0], values[1], version)


def _is_header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


class CredentialSource(Protocol):
    """Where a credential comes from.

    `fetch(force)` returns the current credential, or None when the source knows
    nothing changed since the last fetch (a cheap check, such as a file's stat);
    `force=True` always reads. It raises `CredentialError` with a reason that is safe
    to log. `poll_interval_s` is how often the store asks; `aclose` releases resources.
    """

    name: str
    poll_interval_s: float

    async def fetch(self, force: bool) -> Credential | None: ...

    async def aclose(self) -> None: ...


class EnvSource:
    """Token id and token from environment variables (local development)."""

    name = "env"

    def __init__(
        self, token_id_var: str, token_var: str, environ: dict[str, str] | None = None
    ) -> None:
        self._token_id_var = token_id_var
        self._token_var = token_var
        self._environ = os.environ if environ is None else environ
        # The environment of a running process does not change: read once, then rarely.
        self.poll_interval_s = 60.0

    async def fetch(self, force: bool) -> Credential | None:
        values = {}
        for var in (self._token_id_var, self._token_var):
            value = self._environ.get(var, "")
            if not value.strip():
                raise CredentialError(f"environment variable {var} is not set or empty")
            values[var] = value
        return credential_from_fields(
            {"token_id": values[self._token_id_var], "token": values[self._token_var]}
        )

    async def aclose(self) -> None:
        return None


class FileSource:
    """A JSON file `{"token_id": ..., "token": ...}` rendered by Vault Agent or a Secret mount.

    The file is re-read when its stat signature changes. `os.stat` follows symlinks, so
    the atomic `..data` symlink swap Kubernetes does on a Secret volume is seen too.
    """

    name = "file"

    def __init__(self, path: str, poll_interval_s: float = 1.0, max_bytes: int = 64 * 1024) -> None:
        self._path = path
        self.poll_interval_s = poll_interval_s
        self._max_bytes = max_bytes
        self._last_signature: tuple[int, int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int, int]:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise CredentialError(f"file {self._path} does not exist") from None
        except OSError as exc:
            raise CredentialError(f"file {self._path} cannot be read: {exc.strerror}") from None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    async def fetch(self, force: bool) -> Credential | None:
        signature = self._signature()
        if not force and signature == self._last_signature:
            return None
        try:
            # A small local file (tmpfs for a Secret mount): a blocking read costs microseconds.
            with open(self._path, "rb") as f:  # noqa: ASYNC230
                raw = f.read(self._max_bytes + 1)
        except OSError as exc:
            raise CredentialError(f"file {self._path} cannot be read: {exc.strerror}") from None
        if len(raw) > self._max_bytes:
            raise CredentialError(f"file {self._path} is larger than {self._max_bytes} bytes")
        if not raw.strip():
            raise CredentialError(f"file {self._path} is empty")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            # The message of a JSON error can quote the document: do not pass it on.
            # RecursionError: nesting deeper than the parser goes; ValueError covers
            # bad UTF-8 and integers longer than Python converts.
            raise CredentialError(f"file {self._path} is not valid JSON") from None
        try:
            credential = credential_from_fields(data)
        except CredentialError as exc:
            raise CredentialError(f"file {self._path}: {exc}") from None
        # Remember the signature only once the content was good, so a half-written
        # file is read again at the next poll even if its stat does not change.
        self._last_signature = signature
        return credential

    async def aclose(self) -> None:
        return None


class CredentialSeries:
    """The metric series one store reports to.

    Without a label (one token for every organization), the plain series. With
    `organization`, that organization's series; `pooled` stores (loaded on demand) share
    the series of `other`: its `credential_loaded` counts the tokens in hand, and it has
    no version (several tokens have several).
    """

    def __init__(
        self, metrics: Metrics, organization: str | None = None, *, pooled: bool = False
    ) -> None:
        labels = {} if organization is None else {"organization": organization}
        self._pooled = pooled
        self._loaded = (
            metrics.credential_loaded.labels(**labels) if labels else metrics.credential_loaded
        )
        self._version = None
        if not pooled:
            version = metrics.credential_version
            self._version = version.labels(**labels) if labels else version
        last = metrics.credential_last_reload
        self._last_reload = last.labels(**labels) if labels else last
        self._success = metrics.credential_reloads.labels(result="success", **labels)
        self._failure = metrics.credential_reloads.labels(result="failure", **labels)

    def reloaded(self, ok: bool, now: float) -> None:
        if ok:
            self._success.inc()
            self._last_reload.set(now)
        else:
            self._failure.inc()

    def in_hand(self, version: int, first: bool) -> None:
        """A credential is in use now (`first`: the store had none before)."""
        if self._pooled:
            if first:
                self._loaded.inc()
        else:
            self._loaded.set(1)
        if self._version is not None:
            self._version.set(version)

    def dropped(self) -> None:
        """A pooled store that held a credential was let go."""
        if self._pooled:
            self._loaded.dec()


@dataclass(frozen=True, slots=True)
class ReloadTrouble:
    """Fetches have failed `failures` times in a row since `since` (Unix time)."""

    reason: str  # safe to log and to show on /readyz
    since: float
    failures: int


class Credentials(Protocol):
    """What the upstream client asks for a fetch: the store of the organization's token.

    A `CredentialStore` answers for every organization; `OrganizationCredentials`
    (organizations.py) has one per organization. `NoCredential` when there is none.
    """

    per_organization: bool

    async def store_for(self, organization: str) -> CredentialStore: ...

    def wake(self) -> None:
        """Fetch every token now (SIGHUP)."""


class CredentialStore:
    """Holds the credential in use and keeps it current.

    `current` is None until a first fetch succeeds. `run()` is the background refresher
    (poll with jitter, back off on failure), supervised so that no exception ends it.
    `reload_after_rejection(c)` is called when PlanetScale refused `c`: under a lock, so
    a burst of refusals costs one fetch. Whatever a source raises is a failed fetch:
    counted, logged with a safe reason, and the last good credential is kept.
    """

    def __init__(
        self,
        source: CredentialSource,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        wait: Callable[[asyncio.Event, float], Awaitable[None]] = SYSTEM_CLOCK.wait,
        max_backoff_s: float = 60.0,
        task_backoff: Backoff = DEFAULT_BACKOFF,
        series: CredentialSeries | None = None,
        organization: str | None = None,
    ) -> None:
        self.source = source
        self._metrics = metrics
        self._series = series or CredentialSeries(metrics)
        self._clock = clock
        self._wait_for = wait
        self._max_backoff_s = max_backoff_s
        self._task_backoff = task_backoff
        self.current: Credential | None = None
        self.not_ready_reason: str = "no credential loaded yet"
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._failures = 0  # failed fetches in a row
        self._failing_since = 0.0
        self._last_reason = ""
        self._fetches = 0  # fetches finished, successful or not
        # Log lines name the organization of a per-organization store.
        self._where = {} if organization is None else {"organization": organization}

    # One token for every organization (see organizations.py for one each).
    per_organization = False

    async def store_for(self, organization: str) -> CredentialStore:
        """The store for any organization: this one."""
        return self

    async def refresh(self, force: bool = False) -> bool:
        """Fetch once; swap in a new credential. Returns False when the fetch failed."""
        async with self._lock:
            return await self._refresh_locked(force)

    async def _refresh_locked(self, force: bool) -> bool:
        try:
            credential = await self.source.fetch(force)
            if credential is not None and not 0 <= credential.version <= MAX_VERSION:
                raise CredentialError("the credential's version is out of range")
        except Exception as exc:  # any failure of a source is a failed fetch
            self._failed(exc)
            return False
        self._fetches += 1
        self._failures = 0
        if credential is None:
            return True
        self._series.reloaded(True, self._clock())
        if credential != self.current:
            previous = self.current
            self.current = credential
            self.not_ready_reason = ""
            self._series.in_hand(credential.version, first=previous is None)
            log.info(
                "credential_reloaded",
                source=self.source.name,
                **self._where,
                version=credential.version,
                previous_version=None if previous is None else previous.version,
            )
        return True

    def _failed(self, exc: Exception) -> None:
        self._fetches += 1
        self._failures += 1
        if self._failures == 1:
            self._failing_since = self._clock()
        self._series.reloaded(False, self._clock())
        if isinstance(exc, CredentialError):
            reason = str(exc)
            extra: dict[str, str] = {}
        else:
            # A source's own bug or a library's surprise: its message may quote what it
            # was parsing, so only the class and the line that raised it are told.
            reason = f"the {self.source.name} source failed: {safe_reason(exc)}"
            extra = {"error": type(exc).__name__, "at": raised_at(exc)}
        self._last_reason = reason
        if self.current is None:
            self.not_ready_reason = reason
        log.warning(
            "credential_reload_failed",
            source=self.source.name,
            reason=reason,
            keeping_last=self.current is not None,
            failures=self._failures,
            **self._where,
            **extra,
        )

    @property
    def trouble(self) -> ReloadTrouble | None:
        """A persistent failure to fetch (`PERSISTENT_FAILURES` in a row), else None."""
        if self._failures < PERSISTENT_FAILURES:
            return None
        return ReloadTrouble(self._last_reason, self._failing_since, self._failures)

    async def reload_after_rejection(self, rejected: Credential) -> Credential | None:
        """PlanetScale refused `rejected`: make sure we hold the newest credential.

        If another request already swapped it, or a fetch finished while this one waited
        for the lock (the source still holds the refused token), return the current one
        without a fetch.
        """
        fetches = self._fetches
        async with self._lock:
            if self.current is not None and self.current != rejected:
                return self.current
            if self._fetches != fetches:
                return self.current
            # Never raises: a failed reload keeps the refused credential, the caller's
            # retry is refused again and answered 502 upstream_credential_rejected.
            await self._refresh_locked(force=True)
            return self.current

    def wake(self) -> None:
        """Ask the refresher to fetch now (SIGHUP)."""
        self._wake.set()

    def dropped(self) -> None:
        """This store is let go (an on-demand token evicted): its series say so."""
        if self.current is not None:
            self._series.dropped()

    def _next_delay(self) -> float:
        base = self.source.poll_interval_s
        if self._failures:
            # Capped exponential backoff, starting from one second, with full jitter.
            cap = min(self._max_backoff_s, max(1.0, base) * 2 ** min(self._failures - 1, 10))
            return random.uniform(min(1.0, cap), cap)
        # +-10% so replicas started together do not poll in step.
        return base * random.uniform(0.9, 1.1)

    async def run(self) -> NoReturn:
        """Refresh forever, supervised; cancelled at shutdown."""
        await supervise(
            "credential_refresher",
            self._step,
            self._metrics,
            backoff=self._task_backoff,
            sleep=self._pause,
            safe_errors=(CredentialError,),
        )

    async def _step(self) -> None:
        # A wake that came during the supervisor's pause is served at once.
        if not self._wake.is_set():
            await self._wait(self._next_delay())  # the delay first: it may raise
        force = self._wake.is_set()
        # Cleared before the fetch: a step that fails cannot turn one SIGHUP into a spin.
        self._wake.clear()
        await self.refresh(force=force)

    async def _pause(self, delay: float) -> None:
        """The supervisor's backoff; a SIGHUP ends it (and is served by the next step)."""
        await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        """`delay` seconds on the store's clock, or until a wake (SIGHUP), if sooner."""
        await self._wait_for(self._wake, delay)


@asynccontextmanager
async def running(store: CredentialStore) -> AsyncIterator[CredentialStore]:
    """First fetch, then the refresher in the background until the block ends."""
    await store.refresh(force=True)
    task = start("credential_refresher", store.run())
    try:
        yield store
    finally:
        await stop(task)
        await store.source.aclose()
