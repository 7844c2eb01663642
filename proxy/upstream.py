"""The PlanetScale client: the only code that talks to the upstream API.

One shared `ClientSession` (a connection pool, connect timeouts), opened for the
application's lifetime by `open_upstream`. It sends only
`GET {base_url}/organizations/{organization}/invoices/{id}`. Three layers:

- `Upstream.fetch`: the circuit breaker, then the retry loop (one deadline per caller
  request, backoff, Retry-After honoured), then one attempt (a rate token in the
  caller's turn, a concurrency slot, its own timeout, the body limit and schema check);
- `CredentialMiddleware`, the session's client middleware: attaches the service token at
  send time (here and nowhere else) and reloads it once when PlanetScale refuses it.

What goes wrong is raised as an `UpstreamFailure`: a fact (a timeout, a refusal, a bad
body, how long to wait), never an HTTP answer; `errors.py` decides what the caller sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple
from urllib.parse import quote, unquote

import aiohttp
import structlog
from aiohttp import hdrs
from yarl import URL

from . import __version__
from .config import UpstreamConfig
from .credential import Credential, Credentials, CredentialStore, NoCredential
from .invoice import InvalidInvoice, InvoiceFacts, check_invoice, safe_field_names
from .metrics import Metrics
from .resilience import FAIR_LANE, CircuitBreaker, CircuitState, FairQueue, Refused, TokenBucket

log = structlog.get_logger("proxy.upstream")

# Statuses worth another attempt: PlanetScale is overloaded or restarting.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REJECTED = frozenset({401, 403})
# How many distinct sets of unexpected field names are logged (then only counted).
_MAX_DRIFT_LOGS = 32
# Reloads one fetch may ask for, each after a refusal of a newer credential than the last
# (rotations in quick succession); a credential refused again after its reload is final.
_MAX_RELOADS = 3
# Longest a send waits for the reload after PlanetScale refused the token it would carry
# (one read of the credential source; Vault answers in milliseconds when well).
_SETTLE_MAX_S = 2.0
# aiohttp rounds a total timeout of this many seconds or more up to a whole second of
# loop time (ClientTimeout.ceil_threshold); each send's own timer keeps that rounding.
_CEIL_THRESHOLD_S = 5.0

# Seconds of this fetch's deadline already spent by the layer above (the fleet budget's
# wait), taken (and reset) when the fetch starts here: one deadline for all waits.
_SPENT: ContextVar[float] = ContextVar("upstream_deadline_spent", default=0.0)


def attempt_room_s(config: UpstreamConfig) -> float:
    """The part of the deadline kept for the request itself, after any wait.

    One attempt's whole timeout, so a request that waited for its turn is never cut
    short for having waited; at most half the deadline, so waiting keeps the other half.
    """
    return min(config.timeout_s, config.deadline_s / 2)


def wait_bound_s(config: UpstreamConfig) -> float:
    """The longest a fetch may wait for capacity (fleet budget, rate cap, a slot) in all."""
    return max(0.0, config.deadline_s - attempt_room_s(config))


def spend_deadline(seconds: float) -> None:
    """The layer above waited `seconds` of the fetch it is about to start (same task)."""
    _SPENT.set(_SPENT.get() + max(0.0, seconds))


@dataclass(frozen=True, slots=True)
class Fetched:
    """An upstream answer the cache may keep: a valid invoice (200) or a 404."""

    status: int
    body: bytes
    facts: InvoiceFacts | None


class FailureKind(Enum):
    """What went wrong on the way to PlanetScale; `errors.py` maps each to SPEC's answer."""

    TIMEOUT = "timeout"  # no answer within the time there was
    ERROR = "error"  # a 5xx, a reset, a status the contract does not have
    INVALID_RESPONSE = "invalid_response"  # a body over the limit or against the schema
    CREDENTIAL_REJECTED = "credential_rejected"  # 401/403, even after reloading the token
    RATE_LIMITED = "rate_limited"  # PlanetScale's 429, or the caps that protect it
    NO_CREDENTIAL = "no_credential"  # no token loaded yet
    CIRCUIT_OPEN = "circuit_open"  # the breaker stopped calling PlanetScale for a moment


class UpstreamFailure(Exception):
    """A fetch failed: what happened, never what the caller is answered.

    `retry_after`: seconds until trying again makes sense, when known. `counts`: it
    tells against PlanetScale's health (the circuit breaker). `retry`: another attempt
    within the deadline may succeed. The message is fixed text of this module: never a
    token, a header or a body.
    """

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        retry_after: float | None = None,
        counts: bool = False,
        retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.counts = counts
        self.retry = retry

    def final(self) -> UpstreamFailure:
        """The same failure, for a fetch that gives up on it (no further attempt)."""
        return UpstreamFailure(
            self.kind, self.message, retry_after=self.retry_after, counts=self.counts
        )


class Hold(NamedTuple):
    """A fact for the fleet: PlanetScale asked for a pause (its 429 with Retry-After), or
    this client's circuit opened; no request should go for `seconds`. `kind` is what a
    request refused meanwhile fails with."""

    kind: FailureKind  # RATE_LIMITED or CIRCUIT_OPEN
    seconds: float
    # Whose limit: the organization with credential.per_organization, else "" (everyone).
    organization: str = ""


OnHold = Callable[[Hold], object]


def _timeout(*, counts: bool, retry: bool = False) -> UpstreamFailure:
    return UpstreamFailure(
        FailureKind.TIMEOUT, "PlanetScale did not answer in time", counts=counts, retry=retry
    )


def _no_credential() -> UpstreamFailure:
    return UpstreamFailure(
        FailureKind.NO_CREDENTIAL,
        "the proxy has no PlanetScale credential loaded yet; try again shortly",
    )


def _no_organization_credential(missing: NoCredential) -> UpstreamFailure:
    return UpstreamFailure(
        FailureKind.NO_CREDENTIAL,
        "the proxy has no PlanetScale token for this organization; try again later",
        retry_after=missing.retry_after_s,
    )


def _invalid(message: str) -> UpstreamFailure:
    return UpstreamFailure(FailureKind.INVALID_RESPONSE, message)


class _Lane:
    """What PlanetScale limits per organization: the rate cap and the circuit breaker.

    One lane for every organization without credential.per_organization; with it, one
    per organization (PlanetScale's limits and outages are per organization).
    """

    __slots__ = ("bucket", "circuit", "rate")

    def __init__(
        self,
        config: UpstreamConfig,
        book: Callable[[_Lane, float], Awaitable[tuple[float, bool]]],
        on_change: Callable[[CircuitState], None],
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.bucket = TokenBucket(config.rate_per_s, config.burst, clock)
        bucket = self.bucket
        self.rate: FairQueue[bool] = FairQueue(
            lambda max_wait_s: book(self, max_wait_s),
            bucket.debt,
            take_now=lambda: True if bucket.try_take() == 0.0 else None,
            clock=clock,
            sleep=sleep,
            name="upstream-rate",
        )
        self.circuit = CircuitBreaker(
            config.circuit_failures, config.circuit_open_s, clock, on_change=on_change
        )


@dataclass(slots=True)
class _Fetch:
    """One caller request's worth of upstream work, as every layer below the loop sees it."""

    deadline: float  # monotonic
    store: CredentialStore  # where this organization's token is read
    lane: _Lane
    where: dict[str, str]  # for log lines: the organization, with per_organization
    hold: str  # whose `Hold` a 429 is: the organization with per_organization, else ""
    refused: list[Credential] = field(default_factory=list)  # refused so far, in order
    failed: UpstreamFailure | None = None  # what made the current attempt a retry


class _Attempt:
    """One attempt of a fetch: what the credential middleware shares with the client.

    Each send (the first, and the one after a refusal) starts its own timeout and its
    own line in the metrics, after every wait; a send after a refusal takes a rate token
    ahead of its lane's other waiters.
    """

    __slots__ = (
        "_clock",
        "_metrics",
        "_take_rate_token",
        "_timeout_s",
        "_timer",
        "code",
        "fetch",
        "started",
    )

    def __init__(
        self,
        fetch: _Fetch,
        timer: asyncio.Timeout,
        *,
        timeout_s: float,
        clock: Callable[[], float],
        metrics: Metrics,
        take_rate_token: Callable[..., Awaitable[None]],
    ) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._metrics = metrics
        self._take_rate_token = take_rate_token
        self._timer = timer
        self.fetch = fetch
        self.code = "error"  # the metrics label of the send under way
        self.started: float | None = None  # perf_counter of the send under way

    def begin(self) -> None:
        """A send starts now: its timeout is what is left of one attempt's, in the deadline."""
        room = min(self._timeout_s, max(0.001, self.fetch.deadline - self._clock()))
        when = asyncio.get_running_loop().time() + room
        self._timer.reschedule(math.ceil(when) if room >= _CEIL_THRESHOLD_S else when)
        self.code = "error"
        self.started = time.perf_counter()

    def end(self) -> None:
        """The send under way ended (answered, refused or failed): counted once."""
        if self.started is None:
            return
        metrics = self._metrics
        metrics.upstream_duration.observe(time.perf_counter() - self.started)
        metrics.upstream_requests.labels(code=self.code).inc()
        self.started = None

    def refused(self, status: int) -> None:
        """PlanetScale refused the send under way; the timer stops until the next send."""
        self.code = str(status)
        self.end()
        self._timer.reschedule(None)

    async def again(self) -> None:
        """The send after a refusal: within the deadline, next in its lane."""
        if self.fetch.deadline - self._clock() <= 0:
            raise _timeout(counts=True)
        await self._take_rate_token(self.fetch, first=True)


# The attempt under way in this task, for the session's middleware (same task).
_ATTEMPT: ContextVar[_Attempt] = ContextVar("upstream_attempt")


class CredentialMiddleware:
    """The session's client middleware: the service token, and one reload when refused.

    aiohttp's `examples/token_refresh_middleware.py` pattern. The token is read at the
    last moment, after every other wait. On 401/403 the credential is reloaded (the
    store's lock makes a burst of refusals one fetch) and the request sent once more;
    while that reload is under way, sends that would carry the refused token wait for it
    (briefly, within the deadline). A newer token refused (a rotation overtook the
    resend) is reloaded too, up to `_MAX_RELOADS`; the same token refused after its
    reload is final.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        # Per store (one per organization with per_organization): a refusal of one
        # organization's token makes only that organization's sends wait.
        self._guards: weakref.WeakKeyDictionary[CredentialStore, _Guard] = (
            weakref.WeakKeyDictionary()
        )

    def _guard(self, store: CredentialStore) -> _Guard:
        guard = self._guards.get(store)
        if guard is None:
            guard = self._guards[store] = _Guard()
        return guard

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        attempt = _ATTEMPT.get()
        fetch = attempt.fetch
        guard = self._guard(fetch.store)
        while True:
            credential = await self._settled(fetch.store, guard, fetch.deadline)
            request.headers[hdrs.AUTHORIZATION] = credential.header
            attempt.begin()
            response = await handler(request)
            if response.status not in _REJECTED:
                return response
            # At the moment the status line arrives, before any other task can send.
            guard.refusal_seen(credential)
            response.release()
            await response.wait_for_close()
            attempt.refused(response.status)
            await self._reload(fetch, guard, credential)
            await attempt.again()

    async def _reload(self, fetch: _Fetch, guard: _Guard, credential: Credential) -> None:
        """After PlanetScale refused `credential`: the newest one, or the final failure."""
        self._metrics.upstream_credential_rejections.inc()
        # Final when the reload did not help (the same credential refused again), not
        # when a rotation overtook the resend (a newer one refused): that one is
        # reloaded and tried once more too.
        if credential in fetch.refused or len(fetch.refused) >= _MAX_RELOADS:
            guard.settle(credential)
            log.error("upstream_credential_rejected", version=credential.version, **fetch.where)
            raise UpstreamFailure(
                FailureKind.CREDENTIAL_REJECTED,
                "PlanetScale refused the proxy's service token, even after reloading it",
            )
        fetch.refused.append(credential)
        log.warning("upstream_refused_credential", version=credential.version, **fetch.where)
        try:
            await fetch.store.reload_after_rejection(credential)
        finally:
            guard.settle(credential)

    async def _settled(self, store: CredentialStore, guard: _Guard, deadline: float) -> Credential:
        """The credential to send now: read at the last moment, after every other wait.

        While a reload after PlanetScale refused the current credential is under way,
        it is awaited (briefly, within the deadline), so the send carries the new one
        rather than the one just refused.
        """
        credential = store.current
        if credential is not None and credential == guard.refused:
            wait = min(_SETTLE_MAX_S, deadline - self._clock() - 0.001)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await guard.reloaded.wait()
            credential = store.current
        if credential is None:
            raise _no_credential()
        return credential


class _Guard:
    """The credential PlanetScale just refused, while its reload is under way: sends that
    would carry it wait for the reload (`CredentialMiddleware._settled`) instead."""

    __slots__ = ("refused", "reloaded")

    def __init__(self) -> None:
        self.refused: Credential | None = None
        self.reloaded = asyncio.Event()
        self.reloaded.set()

    def refusal_seen(self, credential: Credential) -> None:
        if self.refused != credential:
            self.refused = credential
            self.reloaded.clear()

    def settle(self, credential: Credential) -> None:
        if self.refused is not None and self.refused == credential:
            self.refused = None
            self.reloaded.set()


@contextlib.asynccontextmanager
async def open_upstream(
    config: UpstreamConfig,
    credentials: Credentials,
    metrics: Metrics,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    max_lanes: int = 1,
    on_hold: OnHold | None = None,
) -> AsyncIterator[Upstream]:
    """The client and its session, for as long as the block (a cleanup context) lasts."""
    middleware = CredentialMiddleware(metrics, clock=clock)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=config.timeout_s, connect=config.connect_timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        trust_env=False,
        middlewares=(middleware,),
    ) as session:
        # aiohttp resends an idempotent request once by itself when the connection
        # drops (RFC 9112 9.3.1). Our retries are the only ones: counted, rate-capped
        # and within the deadline; theirs would double what PlanetScale sees on a
        # reset. There is no public switch; aiohttp's own TestClient does the same.
        session._retry_connection = False
        yield Upstream(
            config,
            session,
            credentials,
            metrics,
            clock=clock,
            sleep=sleep,
            max_lanes=max_lanes,
            on_hold=on_hold,
        )


class Upstream:
    """Fetches one invoice from PlanetScale, over a session with `CredentialMiddleware`.

    With `credentials.per_organization`, each organization has its own lane (rate cap,
    circuit breaker): the `max_lanes` most recently used ones are kept. The concurrency
    slots and the connection pool are the process's, shared by all.

    `on_hold` (the fleet level, with `[shared]`) hears each `Hold`: a 429 with
    Retry-After, or the circuit opening; with per_organization, for that organization
    only. With it, such a 429 is not retried here after the pause: the fleet holds off
    as one, and one probe after the pause goes first.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_lanes: int = 1,
        on_hold: OnHold | None = None,
    ) -> None:
        self._on_hold = on_hold
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._session = session
        self._credentials = credentials
        self._sleep = sleep
        self._base = config.base_url.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": f"invoice-proxy/{__version__}"}
        # The total is each send's own timer (`_Attempt.begin`), armed after its waits.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._room = attempt_room_s(config)
        self._lanes: OrderedDict[str, _Lane] = OrderedDict()
        self._max_lanes = max(1, max_lanes)
        self._drift_logged: set[tuple[str, ...]] = set()

    def url(self, organization: str, invoice_id: str) -> URL:
        """The one upstream URL; both parts were validated, and are quoted all the same."""
        path = (
            f"/organizations/{quote(organization, safe='')}/invoices/{quote(invoice_id, safe='')}"
        )
        return URL(self._base + path, encoded=True)

    def lane(self, organization: str) -> _Lane:
        """The organization's rate cap and circuit breaker (the one lane, when shared)."""
        key = organization if self._credentials.per_organization else ""
        lane = self._lanes.get(key)
        if lane is not None:
            self._lanes.move_to_end(key)
            return lane
        lane = _Lane(
            self._config,
            self._book_rate_token,
            lambda state: self._circuit_changed(state, key),
            clock=self._clock,
            sleep=self._sleep,
        )
        self._lanes[key] = lane
        if len(self._lanes) > self._max_lanes:
            self._lanes.popitem(last=False)
            self._circuit_changed(None, "")
        return lane

    async def fetch(self, organization: str, invoice_id: str) -> Fetched:
        """One caller request's worth of upstream work, behind the circuit breaker."""
        try:
            store = await self._credentials.store_for(organization)
        except NoCredential as missing:
            raise _no_organization_credential(missing) from None
        lane = self.lane(organization)
        circuit = lane.circuit
        if not circuit.allow():
            raise UpstreamFailure(
                FailureKind.CIRCUIT_OPEN,
                "PlanetScale is failing; the proxy stopped calling it for a moment",
                retry_after=circuit.retry_after(),
            )
        try:
            result = await self._fetch_with_retries(organization, invoice_id, store, lane)
        except UpstreamFailure as failure:
            if failure.counts:
                circuit.record_failure()
            else:
                circuit.release()
            raise
        except BaseException:
            circuit.release()
            raise
        circuit.record_success()
        return result

    async def _fetch_with_retries(
        self, organization: str, invoice_id: str, store: CredentialStore, lane: _Lane
    ) -> Fetched:
        """Attempts within one deadline, with backoff; PlanetScale's Retry-After honoured."""
        config = self._config
        spent = _SPENT.get()
        if spent:
            _SPENT.set(0.0)
        where = {"organization": organization} if self._credentials.per_organization else {}
        hold = organization if self._credentials.per_organization else ""
        fetch = _Fetch(self._clock() + config.deadline_s - spent, store, lane, where, hold)
        url = self.url(organization, invoice_id)
        attempt = 0
        while True:
            if store.current is None:
                raise _no_credential()
            if fetch.deadline - self._clock() <= 0:
                raise _timeout(counts=True)
            await self._take_rate_token(fetch)
            try:
                return await self._attempt(url, fetch)
            except UpstreamFailure as failure:
                if not failure.retry:
                    raise
                attempt += 1
                if attempt > config.retries:
                    raise
                delay = random.uniform(
                    0, min(config.backoff_max_s, config.backoff_base_s * 2**attempt)
                )
                if failure.retry_after is not None:
                    # Honoured, never shortened: a pause longer than backoff_max_s is
                    # the caller's to take, with PlanetScale's Retry-After passed on.
                    # With a fleet, the pause is the fleet's (`on_hold` heard it).
                    if failure.retry_after > config.backoff_max_s or (
                        self._on_hold is not None and failure.kind == FailureKind.RATE_LIMITED
                    ):
                        raise
                    delay = max(delay, failure.retry_after)
                if self._clock() + delay >= fetch.deadline:
                    raise
                log.info("upstream_retry", attempt=attempt, delay_ms=round(delay * 1000))
                await self._sleep(delay)
                fetch.failed = failure

    async def _take_rate_token(self, fetch: _Fetch, *, first: bool = False) -> None:
        """A token of the local rate cap, in this fetch's lane's turn.

        It waits while the wait leaves the attempt its room in the deadline (and within
        `max_queue_wait_s`). A first attempt refused is rate limited; a retry refused
        ends with the failure that made it a retry.
        """
        bound = min(self._config.max_queue_wait_s, fetch.deadline - self._clock() - self._room)
        try:
            await fetch.lane.rate.acquire(FAIR_LANE.get(), max(0.0, bound), first=first)
        except Refused as refused:
            if fetch.failed is not None:
                raise fetch.failed.final() from None
            self._metrics.upstream_throttled.inc()
            raise UpstreamFailure(
                FailureKind.RATE_LIMITED,
                "too many requests to PlanetScale right now; retry after the given delay",
                retry_after=refused.retry_after_s,
            ) from None

    @staticmethod
    async def _book_rate_token(lane: _Lane, max_wait_s: float) -> tuple[float, bool]:
        wait = lane.bucket.reserve(max_wait_s)
        if wait is None:
            raise Refused(lane.bucket.debt(1))
        return wait, True

    async def _attempt(self, url: URL, fetch: _Fetch) -> Fetched:
        """One request (and its resend after a refusal, by the middleware) in one slot."""
        async with self._slot(fetch.deadline):
            timer = asyncio.timeout(None)  # armed by each send (`_Attempt.begin`)
            attempt = _Attempt(
                fetch,
                timer,
                timeout_s=self._config.timeout_s,
                clock=self._clock,
                metrics=self._metrics,
                take_rate_token=self._take_rate_token,
            )
            current = _ATTEMPT.set(attempt)
            try:
                async with (
                    timer,
                    self._session.get(
                        url, headers=self._headers, timeout=self._timeout, allow_redirects=False
                    ) as response,
                ):
                    attempt.code = str(response.status)
                    return await self._answer(response, fetch.hold)
            except TimeoutError:
                attempt.code = "timeout"
                raise _timeout(counts=True, retry=True) from None
            except aiohttp.ClientError as exc:
                # The class name says enough (reset, refused); the message may hold the URL.
                log.warning("upstream_failed", error=type(exc).__name__, status_code=attempt.code)
                attempt.code = "error"
                raise UpstreamFailure(
                    FailureKind.ERROR, "PlanetScale failed to answer", counts=True, retry=True
                ) from None
            finally:
                attempt.end()
                _ATTEMPT.reset(current)

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: float) -> AsyncIterator[None]:
        """One of `max_concurrency` places, waited for while the attempt keeps its room."""
        cap = self._config.max_queue_wait_s
        wait = min(cap, max(0.0, deadline - self._clock() - self._room))
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            if wait < cap:
                # The deadline ran out while waiting for our own cap: PlanetScale was
                # never asked, so this does not count against its health.
                raise _timeout(counts=False) from None
            self._metrics.upstream_throttled.inc()
            raise UpstreamFailure(
                FailureKind.RATE_LIMITED,
                "too many requests to PlanetScale in flight; retry after the given delay",
                retry_after=1.0,
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    async def _answer(self, response: aiohttp.ClientResponse, hold: str) -> Fetched:
        status = response.status
        if status == 200:
            body = await self._read_body(response)
            return Fetched(200, body, self._check(response, body, _requested_id(response)))
        if status == 404:
            return Fetched(404, b"", None)
        if status == 429:
            # PlanetScale protecting itself, not failing: it does not open the circuit.
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if retry_after is not None and self._on_hold is not None:
                self._on_hold(Hold(FailureKind.RATE_LIMITED, retry_after, hold))
            raise UpstreamFailure(
                FailureKind.RATE_LIMITED,
                "PlanetScale's rate limit holds; retry later",
                retry_after=retry_after,
                retry=True,
            )
        if status in _RETRY_STATUSES:
            raise UpstreamFailure(
                FailureKind.ERROR, f"PlanetScale answered {status}", counts=True, retry=True
            )
        log.warning("upstream_unexpected_status", status_code=status)
        raise UpstreamFailure(FailureKind.ERROR, f"PlanetScale answered {status}")

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._config.max_body_bytes
        if response.content_length is not None and response.content_length > limit:
            self._metrics.upstream_invalid.inc()
            raise _invalid(f"PlanetScale's answer is over {limit} bytes")
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(16384):
            size += len(chunk)
            if size > limit:
                self._metrics.upstream_invalid.inc()
                raise _invalid(f"PlanetScale's answer is over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check(
        self, response: aiohttp.ClientResponse, body: bytes, invoice_id: str
    ) -> InvoiceFacts:
        if response.content_type != "application/json":
            self._metrics.upstream_invalid.inc()
            raise _invalid("PlanetScale's answer is not application/json")
        try:
            facts = check_invoice(body, strict=self._config.strict_schema, invoice_id=invoice_id)
        except InvalidInvoice as exc:
            self._metrics.upstream_invalid.inc()
            log.warning("upstream_invalid_response", reason=str(exc))
            raise _invalid(f"PlanetScale's answer breaks the invoice schema: {exc}") from None
        if facts.extra_fields:
            self._metrics.upstream_schema_drift.labels(kind="extra_field").inc()
            if (
                facts.extra_fields not in self._drift_logged
                and len(self._drift_logged) < _MAX_DRIFT_LOGS
            ):
                self._drift_logged.add(facts.extra_fields)
                log.info("upstream_schema_drift", fields=safe_field_names(facts.extra_fields))
        if facts.string_total:
            self._metrics.upstream_schema_drift.labels(kind="string_total").inc()
        return facts

    def _circuit_changed(self, state: CircuitState | None, organization: str) -> None:
        # One gauge for all lanes: the worst state of any organization's circuit.
        worst = max((int(lane.circuit.state) for lane in self._lanes.values()), default=0)
        self._metrics.upstream_circuit_state.set(worst)
        if state is not None:
            where = {"organization": organization} if organization else {}
            log.warning("upstream_circuit_changed", state=state.name.lower(), **where)
        if state == CircuitState.OPEN and self._on_hold is not None:
            hold = Hold(FailureKind.CIRCUIT_OPEN, self._config.circuit_open_s, organization)
            self._on_hold(hold)


def _requested_id(response: aiohttp.ClientResponse) -> str:
    # The id this answer is for is the one in the URL we sent (redirects are not
    # followed): the last path segment, quoted by `Upstream.url`.
    return unquote(response.url.raw_path.rsplit("/", 1)[-1])


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from an API, treated as unknown
    return seconds if 0 <= seconds < 86400 else None
