"""The one error type of the service and SPEC's JSON error body.

Handlers and the upstream client raise `ProxyError`; a middleware turns it into
`{"code": ..., "message": ...}` in exactly one place. Messages are fixed strings
written here or by the raiser: never a token, a key or an upstream body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


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


def upstream_invalid_response(message: str) -> ProxyError:
    return ProxyError(502, "upstream_invalid_response", message)


def upstream_credential_rejected() -> ProxyError:
    return ProxyError(
        502,
        "upstream_credential_rejected",
        "PlanetScale refused the proxy's service token, even after reloading it",
    )


def unavailable(message: str, retry_after_s: float = 5.0) -> ProxyError:
    return ProxyError(503, "unavailable", message, {"Retry-After": _seconds(retry_after_s)})


def upstream_timeout() -> ProxyError:
    return ProxyError(504, "upstream_timeout", "PlanetScale did not answer in time")


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
