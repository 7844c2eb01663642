"""The one error type of the service, SPEC's JSON error body, and the failure -> answer table.

Handlers raise `ProxyError`; the upstream client raises `UpstreamFailure` (a fact), which
`upstream_answer` turns into SPEC's status and code. A middleware turns either into
`{"code": ..., "message": ...}` in exactly one place. Messages are fixed strings written
here or by the raiser: never a token, a key or an upstream body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from .upstream import FailureKind, UpstreamFailure


class ProxyError(Exception):
    """An answer in SPEC's error table: HTTP status, machine code, human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def invalid_request(message: str) -> ProxyError:
    return ProxyError(400, "invalid_request", message)


def unauthorized() -> ProxyError:
    return ProxyError(
        401,
        "unauthorized",
        "a valid caller key is required: Authorization: Bearer <key>",
        {"WWW-Authenticate": 'Bearer realm="invoice-proxy"'},
    )


def forbidden(organization: str) -> ProxyError:
    return ProxyError(403, "forbidden", f"this caller may not read organization {organization!r}")


def not_found(message: str = "no such invoice") -> ProxyError:
    return ProxyError(404, "not_found", message)


def method_not_allowed(allowed: str) -> ProxyError:
    return ProxyError(
        405, "method_not_allowed", "only GET and HEAD are allowed here", {"Allow": allowed}
    )


def rate_limited(retry_after_s: float, message: str) -> ProxyError:
    return ProxyError(429, "rate_limited", message, {"Retry-After": _seconds(retry_after_s)})


def upstream_error(message: str = "PlanetScale failed to answer") -> ProxyError:
    return ProxyError(502, "upstream_error", message)


def unavailable(message: str, retry_after_s: float = 5.0) -> ProxyError:
    return ProxyError(503, "unavailable", message, {"Retry-After": _seconds(retry_after_s)})


# What the caller is answered for each upstream failure (SPEC's error table): status,
# code, and the Retry-After sent when the failure does not say how long (None: no header).
UPSTREAM_ANSWERS: Mapping[FailureKind, tuple[int, str, float | None]] = {
    FailureKind.TIMEOUT: (504, "upstream_timeout", None),
    FailureKind.ERROR: (502, "upstream_error", None),
    FailureKind.INVALID_RESPONSE: (502, "upstream_invalid_response", None),
    FailureKind.CREDENTIAL_REJECTED: (502, "upstream_credential_rejected", None),
    FailureKind.RATE_LIMITED: (429, "rate_limited", 1.0),
    FailureKind.NO_CREDENTIAL: (503, "unavailable", 5.0),
    FailureKind.CIRCUIT_OPEN: (503, "unavailable", 5.0),
}


def upstream_answer(failure: UpstreamFailure) -> ProxyError:
    """The answer in SPEC's error table for what went wrong upstream."""
    status, code, wait = UPSTREAM_ANSWERS[failure.kind]
    headers = {}
    if wait is not None:
        retry_after = wait if failure.retry_after is None else failure.retry_after
        headers["Retry-After"] = _seconds(retry_after)
    return ProxyError(status, code, failure.message, headers)


def _seconds(value: float) -> str:
    # Retry-After is whole seconds; round up so a client never retries too early.
    return str(max(1, int(-(-value // 1))))


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


def error_response(error: ProxyError, request_id: str) -> web.Response:
    response = web.Response(
        status=error.status,
        body=error_body(error.code, error.message),
        content_type="application/json",
        headers=error.headers,
    )
    response.headers["X-Request-ID"] = request_id
    return response
