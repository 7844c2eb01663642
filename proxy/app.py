"""Assembly: `init_app(config)` wires the service's objects together. It decides nothing.

The API application is returned; the admin application (metrics, health, purge) is
reachable as `app[ADMIN_APP]` and shares the same objects. Resources with a lifetime
(the credential refresher, the upstream session, fetches under way) are opened and
closed by the API application's cleanup contexts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from .auth import Authenticator
from .cache import InvoiceCache
from .clock import SYSTEM_CLOCK, Clock
from .config import AdminConfig, CallerConfig, Config, CredentialConfig
from .credential import CredentialSource, CredentialStore, EnvSource, FileSource, running
from .handlers import AdminHandlers, InvoiceHandler, observe
from .metrics import Metrics, SharedMetrics
from .upstream import Upstream

if TYPE_CHECKING:
    from .shared import SharedLevel, SharedStore

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
CREDENTIALS = web.AppKey("credentials", CredentialStore)
CALLERS = web.AppKey("callers", Authenticator)
ADMINS = web.AppKey("admins", Authenticator)  # the admin keys (purge); SIGHUP replaces them
CACHE = web.AppKey("cache", InvoiceCache)
UPSTREAM = web.AppKey("upstream", Upstream)
ADMIN_APP = web.AppKey("admin_app", web.Application)

INVOICE_PATH = "/v1/organizations/{organization}/invoices/{id}"
PURGE_PATH = "/cache/organizations/{organization}/invoices/{id}"


def make_source(config: CredentialConfig) -> CredentialSource:
    if config.source == "file":
        return FileSource(config.file.path, config.file.poll_interval_s)
    if config.source == "env":
        return EnvSource(config.env.token_id_var, config.env.token_var)
    from .vault import VaultSource  # only the vault source needs it

    return VaultSource(config.vault)


def init_app(
    config: Config,
    *,
    source: CredentialSource | None = None,
    metrics: Metrics | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> web.Application:
    """Build the API application (and its admin sibling) for `config`.

    `clock` is where every part reads time; tests pass one they advance.
    """
    metrics = metrics or Metrics()
    credentials = CredentialStore(
        source or make_source(config.credential), metrics, clock=clock.time
    )
    callers = Authenticator(config.callers, metrics)
    metrics.init_callers(callers.names)
    upstream = Upstream(
        config.upstream, credentials, metrics, clock=clock.monotonic, sleep=clock.sleep
    )
    shared: SharedLevel | None = None
    store: SharedStore | None = None
    if config.shared is not None:
        from .redis_connection import make_client  # loads the Redis client: only when configured
        from .shared import SharedLevel, SharedStore

        shared_metrics = SharedMetrics(metrics.registry)
        # The client connects nothing yet: the store's cleanup context connects and closes it.
        store = SharedStore(
            make_client(config.shared),
            config.shared,
            shared_metrics,
            clock=clock.time,
            monotonic=clock.monotonic,
        )
        shared = SharedLevel(
            config.shared,
            store,
            shared_metrics,
            upstream_config=config.upstream,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    cache = InvoiceCache(config.cache, metrics, clock=clock.time, fleet=shared)
    invoices = InvoiceHandler(callers, cache, upstream.fetch, clock.time)

    api = web.Application(middlewares=[observe(metrics)], client_max_size=1024)
    api[CONFIG] = config
    api[METRICS] = metrics
    api[CREDENTIALS] = credentials
    api[CALLERS] = callers
    api[CACHE] = cache
    api[UPSTREAM] = upstream
    api.router.add_get(INVOICE_PATH, invoices.get)
    api.cleanup_ctx.append(_credentials_ctx)
    api.cleanup_ctx.append(upstream.lifetime)
    if store is not None:
        api.cleanup_ctx.append(store.lifetime)  # closed after the fetches under way
    api.cleanup_ctx.append(_cache_ctx)

    admins = Authenticator(admin_callers(config.admin))
    api[ADMINS] = admins
    openapi = resources.files("proxy").joinpath("openapi.yaml").read_bytes()
    admin_handlers = AdminHandlers(metrics, credentials, cache, admins, openapi, shared)
    admin = web.Application(middlewares=[observe(None)], client_max_size=1024)
    admin.router.add_get("/metrics", admin_handlers.metrics)
    admin.router.add_get("/healthz", admin_handlers.healthz)
    admin.router.add_get("/readyz", admin_handlers.readyz)
    admin.router.add_get("/openapi.yaml", admin_handlers.openapi)
    admin.router.add_delete(PURGE_PATH, admin_handlers.purge)
    api[ADMIN_APP] = admin
    return api


def admin_callers(config: AdminConfig) -> list[CallerConfig]:
    """The admin keys as one caller, `admin`; none when purge is disabled."""
    return [CallerConfig("admin", config.key_sha256, ("*",))] if config.key_sha256 else []


async def _credentials_ctx(app: web.Application) -> AsyncIterator[None]:
    async with running(app[CREDENTIALS]):
        yield


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[CACHE].close()
