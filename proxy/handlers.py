"""Thin HTTP handlers: parse, authorize, call, answer. Errors are raised, not built here.

`observe` is the one middleware: it binds the request id, turns every error into
SPEC's JSON body, and emits the one log line and the metrics of each request.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from . import errors
from .auth import Authenticator
from .cache import HIT, Entry, Fetcher, InvoiceCache
from .config import NAME_PATTERN
from .credential import CredentialStore
from .errors import ProxyError, error_response
from .metrics import Metrics
from .resilience import FAIR_LANE
from .upstream import UpstreamFailure

if TYPE_CHECKING:
    from .shared import SharedLevel

log = structlog.get_logger("proxy.access")

# Facts the handler learns, for the middleware's log line and metrics.
CALLER = web.RequestKey("caller", str)
ORGANIZATION = web.RequestKey("organization", str)
INVOICE_ID = web.RequestKey("invoice_id", str)
CACHE = web.RequestKey("cache", str)
REQUEST_ID = web.RequestKey("request_id", str)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_X_CACHE = {"hit": "HIT", "miss": "MISS", "stale": "STALE"}
_valid_name = NAME_PATTERN.fullmatch
# Request ids: a random prefix per process and a counter. Unique across replicas
# without a system call per request (uuid4 reads the kernel's random source).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


def _draw_id_prefix_after_fork() -> None:
    """A forked worker (`server.workers`) would otherwise hand out its parent's ids."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = secrets.token_hex(8)
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_draw_id_prefix_after_fork)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def authorization(request: web.Request) -> str | None:
    """The one `Authorization` header, or None; two of them are refused.

    With two, which one names the caller would depend on their order, and a proxy or
    client in front may have added one: the request is ambiguous, not the first's.
    """
    values = request.headers.getall(hdrs.AUTHORIZATION, ())
    if len(values) > 1:
        raise errors.invalid_request("send one Authorization header, not several")
    return values[0] if values else None


def observe(metrics: Metrics | None) -> Middleware:
    """The request middleware; `metrics=None` for the admin listener (no request metrics)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request_id = request.headers.get("X-Request-ID", "")
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = new_request_id()
        # The id is bound to the log context only where other lines may be logged
        # during the request (the miss path, see InvoiceHandler); a hit logs one line.
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except UpstreamFailure as failure:
            response = error_response(errors.upstream_answer(failure), request_id)
        except ProxyError as exc:
            response = error_response(exc, request_id)
        except web.HTTPException as exc:
            response = error_response(_from_http_exception(exc), request_id)
        except Exception:
            log.exception("unhandled_error", request_id=request_id)
            response = error_response(
                ProxyError(500, "internal_error", "the proxy failed; this is a bug"), request_id
            )
        else:
            response.headers["X-Request-ID"] = request_id
        duration = time.perf_counter() - start
        caller = request.get(CALLER, "unknown")
        cache = request.get(CACHE, "none")
        status = response.status
        if metrics is not None:
            metrics.request_done(caller, status, cache, duration)
        elif status < 400 and request.method == "GET":
            return response  # probes and scrapes of the admin listener: not logged
        log.info(
            "request",
            request_id=request_id,
            method=request.method,
            caller=caller,
            organization=request.get(ORGANIZATION),
            invoice_id=request.get(INVOICE_ID),
            status=status,
            cache=cache,
            duration_ms=round(duration * 1000, 3),
        )
        return response

    return middleware


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    """aiohttp's own refusals (no route, wrong method, bad request) in SPEC's shape."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return errors.method_not_allowed(", ".join(sorted(exc.allowed_methods)))
    if exc.status == 404:
        return errors.not_found("no such path")
    if exc.status == 413:
        return ProxyError(413, "invalid_request", "the request body is too large")
    if 400 <= exc.status < 500:
        return errors.invalid_request(exc.reason)
    return ProxyError(exc.status, "internal_error", exc.reason)


def invoice_key(request: web.Request) -> tuple[str, str]:
    """The path's organization and id, checked against SPEC's pattern and noted for the log."""
    info = request.match_info
    organization = info["organization"]
    invoice_id = info["id"]
    if not (_valid_name(organization) and _valid_name(invoice_id)):
        raise errors.invalid_request(
            "organization and id must be 1 to 64 characters of A-Z a-z 0-9 _ -"
        )
    request[ORGANIZATION] = organization
    request[INVOICE_ID] = invoice_id
    return organization, invoice_id


class InvoiceHandler:
    """`GET /v1/organizations/{organization}/invoices/{id}`: the product."""

    def __init__(
        self,
        callers: Authenticator,
        cache: InvoiceCache,
        fetch: Fetcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._callers = callers
        self._cache = cache
        self._fetch = fetch
        self._clock = clock

    async def get(self, request: web.Request) -> web.Response:
        caller = self._callers.authenticate(authorization(request))
        request[CALLER] = caller.name
        organization, invoice_id = invoice_key(request)
        caller.authorize(organization)
        if request.body_exists:
            raise errors.invalid_request("a GET request carries no body")
        caller.take_rate_token()

        entry = self._cache.fresh((organization, invoice_id))
        state = HIT
        if entry is None:
            # Upstream and credential lines logged on the way carry the request id.
            FAIR_LANE.set(caller.name)  # the fetch this miss starts waits in its caller's turn
            with structlog.contextvars.bound_contextvars(request_id=request[REQUEST_ID]):
                entry, state = await self._cache.load(organization, invoice_id, self._fetch)
        request[CACHE] = state
        return self._answer(request, entry, _X_CACHE[state])

    def _answer(self, request: web.Request, entry: Entry, x_cache: str) -> web.Response:
        if entry.status == 404:
            error = errors.not_found()
            error.headers["X-Cache"] = x_cache
            raise error
        headers = {
            "ETag": entry.etag,
            # A final entry carries its header; only an open one needs the time.
            "Cache-Control": entry.cache_control or entry.cache_control_at(self._clock()),
            "X-Cache": x_cache,
        }
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match is not None and _etag_matches(if_none_match, entry.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.body, content_type="application/json", headers=headers)


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison, as RFC 9110 asks for If-None-Match.
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


class AdminHandlers:
    """The admin listener: metrics, health, readiness, cache purge."""

    def __init__(
        self,
        metrics: Metrics,
        credentials: CredentialStore,
        cache: InvoiceCache,
        admins: Authenticator,
        openapi: bytes,
        shared: SharedLevel | None = None,
    ) -> None:
        self._shared = shared
        self._metrics = metrics
        self._credentials = credentials
        self._cache = cache
        self._admins = admins
        self._openapi = openapi

    async def metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        if self._credentials.current is None:
            return web.json_response(
                {"status": "not_ready", "reason": self._credentials.not_ready_reason}, status=503
            )
        trouble = self._credentials.trouble
        if trouble is None:
            return web.json_response({"status": "ready"})
        # Still 200: the last good credential and the cache still serve. A 503 here on
        # every replica during a Vault outage would empty the Service of all of them.
        return web.json_response(
            {
                "status": "ready",
                "warning": "credential_reload_failing",
                "reason": trouble.reason,
                "failing_since": datetime.fromtimestamp(trouble.since, UTC).isoformat(
                    timespec="seconds"
                ),
                "failures": trouble.failures,
            }
        )

    async def purge(self, request: web.Request) -> web.Response:
        admin = self._admins.authenticate(authorization(request))
        request[CALLER] = admin.name
        organization, invoice_id = invoice_key(request)
        found = self._cache.purge((organization, invoice_id))
        if self._shared is not None:
            try:
                found = await self._shared.purge(organization, invoice_id) or found
            except ProxyError as exc:
                # The operator must learn that the fleet's copy may have survived.
                log.warning(
                    "cache_purge_incomplete",
                    organization=organization,
                    invoice_id=invoice_id,
                    local_dropped=found,
                )
                local = "this replica's copy was dropped" if found else "this replica had none"
                raise ProxyError(
                    exc.status, exc.code, f"{exc.message} ({local})", exc.headers
                ) from None
        if not found:
            raise errors.not_found("this invoice is not cached")
        log.info("cache_purged", organization=organization, invoice_id=invoice_id)
        return web.Response(status=204)

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/yaml")
