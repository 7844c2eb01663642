"""The admin listener's handlers: metrics, health, readiness, cache purge, the API's schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import errors
from .auth import Authenticator
from .cache import InvoiceCache
from .credential import CredentialStore
from .errors import ProxyError
from .handlers import authorization, invoice_key
from .metrics import Metrics
from .middleware import CALLER

if TYPE_CHECKING:
    from .shared import SharedLevel

log = structlog.get_logger("proxy.admin")


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
