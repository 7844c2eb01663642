"""The request middleware: request id, the one error mapping, the log line and metrics.

`observe` wraps every handler of both listeners. It gives each request its id, turns
every error into SPEC's JSON body, and emits the one log line and the metrics of each
request. The request keys below are the facts handlers note for it.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from contextlib import AbstractContextManager

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import errors
from . import logging as proxy_logging
from .errors import ProxyError, error_response
from .metrics import Metrics
from .upstream import UpstreamFailure

log = structlog.get_logger("proxy.access")

# Facts the handler learns, for the middleware's log line and metrics.
CALLER = web.RequestKey("caller", str)
AUTH = web.RequestKey("auth", str)  # how the caller authenticated: key, jwt, certificate
ORGANIZATION = web.RequestKey("organization", str)
INVOICE_ID = web.RequestKey("invoice_id", str)
CACHE = web.RequestKey("cache", str)
REQUEST_ID = web.RequestKey("request_id", str)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# Request ids: a random prefix per process and a counter. Unique across replicas
# without a system call per request (uuid4 reads the kernel's random source). The
# prefix is part of a format (one `%` a request costs half an f-string's format spec).
def _id_format() -> str:
    return secrets.token_hex(8) + "%016x"


_ID_FORMAT = _id_format()
_id_counter = itertools.count(1)


def _draw_id_prefix_after_fork() -> None:
    """A forked worker (`server.workers`) would otherwise hand out its parent's ids."""
    global _ID_FORMAT, _id_counter
    _ID_FORMAT = _id_format()
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_draw_id_prefix_after_fork)


def new_request_id() -> str:
    return _ID_FORMAT % next(_id_counter)


def request_id_for(header: str | None) -> str:
    """The caller's `X-Request-ID` when it is a valid id, else a new one."""
    if header is None or not _REQUEST_ID.fullmatch(header):
        return new_request_id()
    return header


def log_request(
    *,
    request_id: str,
    method: str,
    caller: str,
    auth: str | None,
    organization: str | None,
    invoice_id: str | None,
    status: int,
    cache: str,
    seconds: float,
) -> None:
    """The one log line of an answered request (aiohttp's, or the fast lane's: `proxy.lane`).

    Its fields are all named in `proxy.logging`'s trusted fields: a new one must be too.
    """
    proxy_logging.request_line(
        {
            "request_id": request_id,
            "method": method,
            "caller": caller,
            "auth": auth,
            "organization": organization,
            "invoice_id": invoice_id,
            "status": status,
            "cache": cache,
            # To the microsecond: round(x, 3) formats x as a decimal string, three times dearer.
            "duration_ms": round(seconds * 1_000_000) / 1000,
        }
    )


def request_id_logged(request: web.Request) -> AbstractContextManager[None]:
    """Bind the request's id to the log context while the block runs.

    The one place the id is bound. `observe` does not bind it for every request: a hit
    logs only the request line, which names the id itself, so only a path that may log
    other lines on the way (a miss: upstream, credential) enters this, and pays for it.
    """
    return structlog.contextvars.bound_contextvars(request_id=request[REQUEST_ID])


def observe(metrics: Metrics | None) -> Middleware:
    """The request middleware; `metrics=None` for the admin listener (no request metrics)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request[REQUEST_ID] = request_id = request_id_for(request.headers.get("X-Request-ID"))
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
        log_request(
            request_id=request_id,
            method=request.method,
            caller=caller,
            auth=request.get(AUTH),
            organization=request.get(ORGANIZATION),
            invoice_id=request.get(INVOICE_ID),
            status=status,
            cache=cache,
            seconds=duration,
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
