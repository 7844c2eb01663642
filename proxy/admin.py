"""The admin listener's handlers: metrics, health, readiness, cache purge, the API's schema.

What readiness depends on comes in as callables (`Readiness`, `ReloadTrouble`), so this
module knows nothing of where the credential comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.aiohttp import make_aiohttp_handler

from . import errors
from .auth import Authenticator
from .cache import InvoiceCache
from .handlers import authorization, invoice_key
from .metrics import Metrics
from .middleware import CALLER

if TYPE_CHECKING:
    from .shared import SharedLevel

log = structlog.get_logger("proxy.admin")

Readiness = Callable[[], str | None]
"""None when the replica can serve; otherwise the reason it cannot (a 503 on /readyz)."""


class ReloadTrouble(Protocol):
    """The credential has failed to reload persistently, but the last good one serves."""

    @property
    def reason(self) -> str: ...  # safe to show
    @property
    def since(self) -> float: ...  # Unix time of the first failure in a row
    @property
    def failures(self) -> int: ...  # in a row


class AdminHandlers:
    """The admin listener: metrics, health, readiness, cache purge."""

    def __init__(
        self,
        metrics: Metrics,
        readiness: Readiness,
        reload_trouble: Callable[[], ReloadTrouble | None],
        cache: InvoiceCache,
        admins: Authenticator,
        openapi: bytes,
        shared: SharedLevel | None = None,
    ) -> None:
        self._scrape = make_aiohttp_handler(metrics.registry)
        self._readiness = readiness
        self._reload_trouble = reload_trouble
        self._cache = cache
        self._admins = admins
        self._openapi = openapi
        self._shared = shared

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """prometheus_client's page: OpenMetrics when asked for, compressed when accepted."""
        response = await self._scrape(request)
        # A scrape that asks for no format gets the text format, labelled 0.0.4 by the
        # library; the bytes are the same, and the label stays the one this page has had.
        if response.headers.get(hdrs.CONTENT_TYPE) == CONTENT_TYPE_PLAIN_0_0_4:
            response.headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE_LATEST
        return response

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is not None:
            return web.json_response({"status": "not_ready", "reason": reason}, status=503)
        trouble = self._reload_trouble()
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
        admin, _ = await self._admins.authenticate(authorization(request))
        request[CALLER] = admin.name
        organization, invoice_id = invoice_key(request)
        found = self._cache.purge((organization, invoice_id))
        if self._shared is not None:
            shared = await self._shared.purge(organization, invoice_id)
            if shared is None:
                # The operator must learn that the fleet's copy may have survived.
                log.warning(
                    "cache_purge_incomplete",
                    organization=organization,
                    invoice_id=invoice_id,
                    local_dropped=found,
                )
                local = "this replica's copy was dropped" if found else "this replica had none"
                raise errors.unavailable(
                    "the fleet's Redis did not answer, so its copy may still be there; "
                    f"retry the purge ({local})",
                    self._shared.retry_interval_s,
                )
            found = shared or found
        if not found:
            raise errors.not_found("this invoice is not cached")
        log.info("cache_purged", organization=organization, invoice_id=invoice_id)
        return web.Response(status=204)

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/yaml")
