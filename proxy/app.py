"""Assembly: `init_app(config)` wires the service's objects together. It decides nothing.

The API application is returned; the admin application (metrics, health, purge) is
reachable as `app[ADMIN_APP]` and shares the same objects. Resources with a lifetime
(the credential refresher, the upstream session, fetches under way) are opened and
closed by the API application's cleanup contexts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from . import tasks
from .admin import AdminHandlers, Readiness
from .auth import Authenticator
from .cache import InvoiceCache
from .clock import SYSTEM_CLOCK, Clock
from .config import AdminConfig, CallerConfig, Config, CredentialConfig
from .credential import CredentialSource, CredentialStore, EnvSource, FileSource, running
from .handlers import InvoiceHandler
from .metrics import Metrics, SharedMetrics
from .middleware import observe
from .upstream import Fetched, Upstream, open_upstream

if TYPE_CHECKING:
    from .purges import PurgeListener
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


def make_source(config: CredentialConfig, clock: Clock = SYSTEM_CLOCK) -> CredentialSource:
    if config.source == "file":
        return FileSource(config.file.path, config.file.poll_interval_s)
    if config.source == "env":
        return EnvSource(config.env.token_id_var, config.env.token_var)
    from .vault import VaultSource  # only the vault source needs it

    return VaultSource(config.vault, clock=clock.monotonic)


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
        source or make_source(config.credential, clock),
        metrics,
        clock=clock.time,
        sleep=clock.sleep,
    )
    callers = Authenticator(config.callers, metrics)
    metrics.init_callers(callers.names)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_upstream(
            config.upstream,
            credentials,
            metrics,
            clock=clock.monotonic,
            sleep=clock.sleep,
            on_hold=shared.hold if shared is not None else None,
        ) as upstream:
            app[UPSTREAM] = upstream
            yield

    async def upstream_fetch(organization: str, invoice_id: str) -> Fetched:
        # The client exists once upstream_ctx has run (in `api`, built below): looked up
        # when a miss needs it, so nothing holds a client that may not exist yet.
        return await api[UPSTREAM].fetch(organization, invoice_id)

    shared: SharedLevel | None = None
    store: SharedStore | None = None
    listener: PurgeListener | None = None
    if config.shared is not None:
        from .redis_connection import make_client  # loads the Redis client: only when configured
        from .shared import SharedLevel, SharedStore

        shared_metrics = SharedMetrics(metrics.registry)
        # The client connects nothing yet: the store's cleanup context connects and closes it.
        store = SharedStore(
            make_client(config.shared),
            config.shared,
            config.upstream,
            shared_metrics,
            clock=clock.time,
            monotonic=clock.monotonic,
        )
        shared = SharedLevel(
            config.shared,
            config.upstream,
            store,
            shared_metrics,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
        )
    cache = InvoiceCache(config.cache, metrics, clock=clock.time, fleet=shared)
    if config.shared is not None:
        from .purges import BLOCK_MS, PurgeListener

        # A client of its own: its reads block (up to BLOCK_MS) on purpose.
        listener = PurgeListener(
            make_client(
                config.shared, socket_timeout=BLOCK_MS / 1000 + 1 + config.shared.timeout_s
            ),
            config.shared,
            shared_metrics,
            drop=cache.purge,
            drop_all=cache.clear,
            sleep=clock.sleep,
        )
    invoices = InvoiceHandler(callers, cache, upstream_fetch, clock.time)

    api = web.Application(middlewares=[observe(metrics)], client_max_size=1024)
    api[CONFIG] = config
    api[METRICS] = metrics
    api[CREDENTIALS] = credentials
    api[CALLERS] = callers
    api[CACHE] = cache
    api.router.add_get(INVOICE_PATH, invoices.get)
    api.cleanup_ctx.append(_credentials_ctx)
    api.cleanup_ctx.append(upstream_ctx)
    if store is not None:
        api.cleanup_ctx.append(store.lifetime)  # closed after the fetches under way
    if listener is not None:
        api.cleanup_ctx.append(_purges_ctx(listener, metrics))
    api.cleanup_ctx.append(_cache_ctx)

    admins = Authenticator(admin_callers(config.admin))
    api[ADMINS] = admins
    openapi = resources.files("proxy").joinpath("openapi.yaml").read_bytes()
    admin_handlers = AdminHandlers(
        metrics,
        credential_readiness(credentials),
        lambda: credentials.trouble,
        cache,
        admins,
        openapi,
        shared,
    )
    admin = web.Application(middlewares=[observe(None)], client_max_size=1024)
    admin.router.add_get("/metrics", admin_handlers.metrics)
    admin.router.add_get("/healthz", admin_handlers.healthz)
    admin.router.add_get("/readyz", admin_handlers.readyz)
    admin.router.add_get("/openapi.yaml", admin_handlers.openapi)
    admin.router.add_delete(PURGE_PATH, admin_handlers.purge)
    api[ADMIN_APP] = admin
    return api


def credential_readiness(credentials: CredentialStore) -> Readiness:
    """Ready once a credential is loaded: until then no miss can be served."""
    return lambda: None if credentials.current is not None else credentials.not_ready_reason


def admin_callers(config: AdminConfig) -> list[CallerConfig]:
    """The admin keys as one caller, `admin`; none when purge is disabled."""
    return [CallerConfig("admin", config.key_sha256, ("*",))] if config.key_sha256 else []


async def _credentials_ctx(app: web.Application) -> AsyncIterator[None]:
    async with running(app[CREDENTIALS]):
        yield


def _purges_ctx(
    listener: PurgeListener, metrics: Metrics
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The fleet's purges, read for as long as the application runs (`proxy.purges`)."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        from .redis_connection import close

        task = tasks.start("fleet_purges", tasks.supervise("fleet_purges", listener.step, metrics))
        try:
            yield
        finally:
            await tasks.stop(task)
            await close(listener.client)

    return ctx


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[CACHE].close()
