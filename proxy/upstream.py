"""The PlanetScale client: the only code that talks to the upstream API.

One shared `ClientSession` (a connection pool, connect and total timeouts). It sends
only `GET {base_url}/organizations/{organization}/invoices/{id}` with the service
token attached here and nowhere else, retries what is worth retrying within one
deadline per caller request, reloads the credential once when PlanetScale refuses
it, checks every 200 body against the invoice schema, and protects PlanetScale with
a concurrency cap, a rate cap and a circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import quote, unquote

import aiohttp
import structlog
from yarl import URL

from . import __version__, errors
from .config import UpstreamConfig
from .credential import Credential, CredentialStore
from .errors import ProxyError
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


class _Retry(Exception):
    """One attempt failed in a way worth retrying; `error` is what the caller gets if not."""

    def __init__(self, error: ProxyError, retry_after_s: float | None = None) -> None:
        self.error = error
        self.retry_after_s = retry_after_s


class Upstream:
    """Fetches one invoice from PlanetScale, with the proxy's credential."""

    def __init__(
        self,
        config: UpstreamConfig,
        credentials: CredentialStore,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._base = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._bucket = TokenBucket(config.rate_per_s, config.burst, clock)
        self._rate: FairQueue[bool] = FairQueue(
            self._book_rate_token,
            self._bucket.debt,
            take_now=self._take_free_token,
            clock=clock,
            sleep=sleep,
            name="upstream-rate",
        )
        self._room = attempt_room_s(config)
        # The credential PlanetScale just refused, while its reload is under way: sends
        # that would carry it wait for the reload (`_settled`) instead.
        self._refused: Credential | None = None
        self._reloaded = asyncio.Event()
        self._reloaded.set()
        self.circuit = CircuitBreaker(
            config.circuit_failures,
            config.circuit_open_s,
            clock,
            on_change=self._circuit_changed,
        )
        self._drift_logged: set[tuple[str, ...]] = set()
        self._user_agent = f"invoice-proxy/{__version__}"

    async def lifetime(self, _app: object = None) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the session lives as long as the application."""
        connector = aiohttp.TCPConnector(limit=self._config.max_connections, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(
            total=self._config.timeout_s, connect=self._config.connect_timeout_s
        )
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            trust_env=False,
        ) as session:
            # aiohttp resends an idempotent request once by itself when the connection
            # drops (RFC 9112 9.3.1). Our retries are the only ones: counted, rate-capped
            # and within the deadline; theirs would double what PlanetScale sees on a
            # reset. There is no public switch; aiohttp's own TestClient does the same.
            session._retry_connection = False
            self._session = session
            try:
                yield
            finally:
                self._session = None

    def url(self, organization: str, invoice_id: str) -> URL:
        """The one upstream URL; both parts were validated, and are quoted all the same."""
        path = (
            f"/organizations/{quote(organization, safe='')}/invoices/{quote(invoice_id, safe='')}"
        )
        return URL(self._base + path, encoded=True)

    async def fetch(self, organization: str, invoice_id: str) -> Fetched:
        """One caller request's worth of upstream work: attempts, backoff, one deadline."""
        if not self.circuit.allow():
            raise errors.unavailable(
                "PlanetScale is failing; the proxy stopped calling it for a moment",
                self.circuit.retry_after(),
            )
        outcome_known = False
        try:
            result = await self._fetch_with_retries(organization, invoice_id)
        except _CircuitFailure as failure:
            self.circuit.record_failure()
            outcome_known = True
            raise failure.error from None
        else:
            self.circuit.record_success()
            outcome_known = True
            return result
        finally:
            if not outcome_known:
                self.circuit.release()

    async def _fetch_with_retries(self, organization: str, invoice_id: str) -> Fetched:
        config = self._config
        spent = _SPENT.get()
        if spent:
            _SPENT.set(0.0)
        deadline = self._clock() + config.deadline_s - spent
        url = self.url(organization, invoice_id)
        refused: list[Credential] = []  # the credentials PlanetScale refused, in order
        attempt = 0
        failed: ProxyError | None = None  # what made the next attempt a retry
        again = False  # the next attempt redoes one PlanetScale refused: next in its lane
        while True:
            if self._credentials.current is None:
                raise errors.unavailable(
                    "the proxy has no PlanetScale credential loaded yet; try again shortly"
                )
            if deadline - self._clock() <= 0:
                raise _CircuitFailure(errors.upstream_timeout())
            await self._take_rate_token(deadline, failed, first=again)
            again = False
            try:
                return await self._attempt(url, deadline)
            except _Rejected as rejected:
                credential = rejected.credential
                self._metrics.upstream_credential_rejections.inc()
                version = credential.version if credential is not None else None
                # Final when the reload did not help (the same credential refused again),
                # not when a rotation overtook the retry (a newer one refused): that one
                # is reloaded and tried once more too.
                if credential is None or credential in refused or len(refused) >= _MAX_RELOADS:
                    self._settle(credential)
                    log.error("upstream_credential_rejected", version=version)
                    raise errors.upstream_credential_rejected() from None
                refused.append(credential)
                again = True
                log.warning("upstream_refused_credential", version=version)
                try:
                    await self._credentials.reload_after_rejection(credential)
                finally:
                    self._settle(credential)
                # A retry that cannot get its turn now is a plain 429 (the new token was
                # never tried); `failed` stays what an earlier 5xx made it.
            except _Retry as retry:
                attempt += 1
                if attempt > config.retries:
                    raise _failure(retry.error) from None
                delay = random.uniform(
                    0, min(config.backoff_max_s, config.backoff_base_s * 2**attempt)
                )
                if retry.retry_after_s is not None:
                    # Honoured, never shortened: a pause longer than backoff_max_s is
                    # the caller's to take, with PlanetScale's Retry-After passed on.
                    if retry.retry_after_s > config.backoff_max_s:
                        raise _failure(retry.error) from None
                    delay = max(delay, retry.retry_after_s)
                if self._clock() + delay >= deadline:
                    raise _failure(retry.error) from None
                log.info("upstream_retry", attempt=attempt, delay_ms=round(delay * 1000))
                await self._sleep(delay)
                failed = retry.error

    async def _take_rate_token(
        self, deadline: float, retrying: ProxyError | None, *, first: bool = False
    ) -> None:
        """A token of the local rate cap, in this fetch's lane's turn.

        It waits while the wait leaves the attempt its room in the deadline (and within
        `max_queue_wait_s`). A first attempt refused gets 429; a retry refused ends with
        the error that made it a retry.
        """
        bound = min(self._config.max_queue_wait_s, deadline - self._clock() - self._room)
        try:
            await self._rate.acquire(FAIR_LANE.get(), max(0.0, bound), first=first)
        except Refused as refused:
            if retrying is not None:
                raise _failure(retrying) from None
            self._metrics.upstream_throttled.inc()
            raise errors.rate_limited(
                refused.retry_after_s,
                "too many requests to PlanetScale right now; retry after the given delay",
            ) from None

    def _take_free_token(self) -> bool | None:
        # FairQueue's `take_now`: None is "no token free now".
        return True if self._bucket.try_take() == 0.0 else None

    async def _book_rate_token(self, max_wait_s: float) -> tuple[float, bool]:
        wait = self._bucket.reserve(max_wait_s)
        if wait is None:
            raise Refused(self._bucket.debt(1))
        return wait, True

    async def _settled(self, deadline: float) -> Credential:
        """The credential to send now: read at the last moment, after every other wait.

        While a reload after PlanetScale refused the current credential is under way,
        it is awaited (briefly, within the deadline), so the send carries the new one
        rather than the one just refused.
        """
        credential = self._credentials.current
        if credential is not None and credential == self._refused:
            wait = min(_SETTLE_MAX_S, deadline - self._clock() - 0.001)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._reloaded.wait()
            credential = self._credentials.current
        if credential is None:
            raise errors.unavailable(
                "the proxy has no PlanetScale credential loaded yet; try again shortly"
            )
        return credential

    def _refusal_seen(self, credential: Credential) -> None:
        # At the moment the status line arrives, before any other task can send.
        if self._refused != credential:
            self._refused = credential
            self._reloaded.clear()

    def _settle(self, credential: Credential | None) -> None:
        if self._refused is not None and self._refused == credential:
            self._refused = None
            self._reloaded.set()

    async def _attempt(self, url: URL, deadline: float) -> Fetched:
        assert self._session is not None, "Upstream used outside its lifetime"
        code = "error"
        async with self._slot(deadline):
            credential = await self._settled(deadline)
            headers = {
                "Authorization": credential.header,
                "Accept": "application/json",
                "User-Agent": self._user_agent,
            }
            # Computed once a slot is ours: the wait for it spent some of the deadline.
            timeout = aiohttp.ClientTimeout(
                total=min(self._config.timeout_s, max(0.001, deadline - self._clock())),
                connect=self._config.connect_timeout_s,
            )
            start = time.perf_counter()
            try:
                async with self._session.get(
                    url, headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    code = str(response.status)
                    if response.status in _REJECTED:
                        self._refusal_seen(credential)
                    return await self._answer(response)
            except _Rejected:
                raise _Rejected(credential) from None
            except TimeoutError:
                code = "timeout"
                raise _Retry(errors.upstream_timeout()) from None
            except aiohttp.ClientError as exc:
                # The class name says enough (reset, refused); the message may hold the URL.
                log.warning("upstream_failed", error=type(exc).__name__, status_code=code)
                code = "error"
                raise _Retry(errors.upstream_error()) from None
            finally:
                self._metrics.upstream_duration.observe(time.perf_counter() - start)
                self._metrics.upstream_requests.labels(code=code).inc()

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
                raise errors.upstream_timeout() from None
            self._metrics.upstream_throttled.inc()
            raise errors.rate_limited(
                1.0, "too many requests to PlanetScale in flight; retry after the given delay"
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    async def _answer(self, response: aiohttp.ClientResponse) -> Fetched:
        status = response.status
        if status == 200:
            body = await self._read_body(response)
            return Fetched(200, body, self._check(response, body, _requested_id(response)))
        if status == 404:
            return Fetched(404, b"", None)
        if status in _REJECTED:
            raise _Rejected()
        if status in _RETRY_STATUSES:
            if status == 429:
                retry_after = _retry_after(response.headers.get("Retry-After"))
                raise _Retry(
                    errors.rate_limited(
                        retry_after or 1.0, "PlanetScale's rate limit holds; retry later"
                    ),
                    retry_after,
                )
            raise _Retry(errors.upstream_error(f"PlanetScale answered {status}"))
        log.warning("upstream_unexpected_status", status_code=status)
        raise errors.upstream_error(f"PlanetScale answered {status}")

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._config.max_body_bytes
        if response.content_length is not None and response.content_length > limit:
            self._metrics.upstream_invalid.inc()
            raise errors.upstream_invalid_response(f"PlanetScale's answer is over {limit} bytes")
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(16384):
            size += len(chunk)
            if size > limit:
                self._metrics.upstream_invalid.inc()
                raise errors.upstream_invalid_response(
                    f"PlanetScale's answer is over {limit} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _check(
        self, response: aiohttp.ClientResponse, body: bytes, invoice_id: str
    ) -> InvoiceFacts:
        if response.content_type != "application/json":
            self._metrics.upstream_invalid.inc()
            raise errors.upstream_invalid_response("PlanetScale's answer is not application/json")
        try:
            facts = check_invoice(body, strict=self._config.strict_schema, invoice_id=invoice_id)
        except InvalidInvoice as exc:
            self._metrics.upstream_invalid.inc()
            log.warning("upstream_invalid_response", reason=str(exc))
            raise errors.upstream_invalid_response(
                f"PlanetScale's answer breaks the invoice schema: {exc}"
            ) from None
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

    def _circuit_changed(self, state: CircuitState) -> None:
        self._metrics.upstream_circuit_state.set(int(state))
        log.warning("upstream_circuit_changed", state=state.name.lower())


class _Rejected(Exception):
    """PlanetScale answered 401 or 403 to the proxy's token (`credential`, once known)."""

    def __init__(self, credential: Credential | None = None) -> None:
        self.credential = credential


class _CircuitFailure(Exception):
    """The request failed in a way that counts against PlanetScale's health."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


def _failure(error: ProxyError) -> Exception:
    # A 429 is PlanetScale protecting itself, not failing: it does not open the circuit.
    return error if error.status == 429 else _CircuitFailure(error)


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
