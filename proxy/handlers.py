"""The invoice handler: parse, authorize, call the cache, answer. Errors are raised here,
and turned into SPEC's body by the middleware (`middleware.observe`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from . import errors
from .auth import Authenticator
from .cache import HIT, Entry, Fetcher, InvoiceCache
from .config import NAME_PATTERN
from .middleware import AUTH, CACHE, CALLER, INVOICE_ID, ORGANIZATION, request_id_logged
from .resilience import FAIR_LANE

_X_CACHE = {"hit": "HIT", "miss": "MISS", "stale": "STALE"}
_valid_name = NAME_PATTERN.fullmatch


def authorization(request: web.Request) -> str | None:
    """The one `Authorization` header, or None; two of them are refused.

    With two, which one names the caller would depend on their order, and a proxy or
    client in front may have added one: the request is ambiguous, not the first's.
    """
    values = request.headers.getall(hdrs.AUTHORIZATION, ())
    if len(values) > 1:
        raise errors.invalid_request("send one Authorization header, not several")
    return values[0] if values else None


def peercert(transport: asyncio.BaseTransport | None) -> dict[str, Any] | None:
    """The client certificate of a TLS connection, if one verified (else None)."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    certificate = ssl_object.getpeercert()
    return certificate if isinstance(certificate, dict) and certificate else None


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
        header = authorization(request)
        # The certificate is read only when no header names the caller.
        certificate = None if header is not None else peercert(request.transport)
        caller, how = await self._callers.authenticate(header, certificate)
        request[CALLER] = caller.name
        request[AUTH] = how
        organization, invoice_id = invoice_key(request)
        caller.authorize(organization)
        if request.body_exists:
            raise errors.invalid_request("a GET request carries no body")
        caller.take_rate_token()

        entry = self._cache.fresh((organization, invoice_id))
        state = HIT
        if entry is None:
            FAIR_LANE.set(caller.name)  # the fetch this miss starts waits in its caller's turn
            with request_id_logged(request):  # upstream and credential lines carry the id
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
        if if_none_match is not None and etag_matches(if_none_match, entry.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.body, content_type="application/json", headers=headers)


def etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison, as RFC 9110 asks for If-None-Match.
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))
