"""Assembly: `init_app(config)` wires the service's objects together. It decides nothing.

The API application is returned; the admin application (metrics, health, purge) is
reachable as `app[ADMIN_APP]` and shares the same objects. Resources with a lifetime
(the credential refresher, the upstream session, fetches under way) are opened and
closed by the API application's cleanup contexts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from . import tasks
from .admin import AdminHandlers, Readiness
from .auth import Authenticator
from .cache import InvoiceCache
from .clock import SYSTEM_CLOCK, Clock
from .config import (
    ORGANIZATION_PLACEHOLDER,
    ORGANIZATION_VAR_PLACEHOLDER,
    AdminConfig,
    CallerConfig,
    Config,
    CredentialConfig,
)
from .credential import (
    Credentials,
    CredentialSource,
    CredentialStore,
    EnvSource,
    FileSource,
    running,
)
from .handlers import InvoiceHandler
from .jwt_auth import JwksKeys, JwksRefreshers, JwtVerifier, open_session
from .lane import FastLane
from .metrics import Metrics, SharedMetrics
from .middleware import observe
from .tls import ServerTls, watching
from .upstream import Fetched, Upstream, open_upstream

if TYPE_CHECKING:
    from .organizations import OrganizationCredentials
    from .purges import PurgeListener
    from .shared import SharedLevel, SharedStore
    from .vault import VaultClient

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
CREDENTIALS = web.AppKey("credentials", CredentialStore)  # one token for all (the default)
# Every organization's token or the one token: what SIGHUP wakes.
CREDENTIAL_SET: web.AppKey[Credentials] = web.AppKey("credential_set")
CALLERS = web.AppKey("callers", Authenticator)
ADMINS = web.AppKey("admins", Authenticator)  # the admin keys (purge); SIGHUP replaces them
CACHE = web.AppKey("cache", InvoiceCache)
UPSTREAM = web.AppKey("upstream", Upstream)
ADMIN_APP = web.AppKey("admin_app", web.Application)
LANE = web.AppKey("lane", FastLane)  # with server.fast_lane: given to the API listener
TLS = web.AppKey("tls", ServerTls)  # with [server.tls]: the listeners' context (loaded at start-up)

INVOICE_PATH = "/v1/organizations/{organization}/invoices/{id}"
PURGE_PATH = "/cache/organizations/{organization}/invoices/{id}"


def make_source(
    config: CredentialConfig,
    clock: Clock = SYSTEM_CLOCK,
    *,
    organization: str | None = None,
    client: VaultClient | None = None,
) -> CredentialSource:
    """The configured source; with `organization`, that organization's (per_organization:
    its name in the path or, upper case with - as _, in the variable names). Vault
    sources given `client` read through its one login."""
    org = organization or ""
    var = org.upper().replace("-", "_")
    if config.source == "file":
        path = config.file.path
        if organization is not None:
            path = path.replace(ORGANIZATION_PLACEHOLDER, org)
        return FileSource(path, config.file.poll_interval_s)
    if config.source == "env":
        token_id_var, token_var = config.env.token_id_var, config.env.token_var
        if organization is not None:
            token_id_var = token_id_var.replace(ORGANIZATION_VAR_PLACEHOLDER, var)
            token_var = token_var.replace(ORGANIZATION_VAR_PLACEHOLDER, var)
        return EnvSource(token_id_var, token_var)
    from .vault import VaultSource  # only the vault source needs it

    path = config.vault.path
    if organization is not None:
        path = path.replace(ORGANIZATION_PLACEHOLDER, org)
    return VaultSource(config.vault, clock=clock.monotonic, client=client, path=path)


def named_organizations(callers: tuple[CallerConfig, ...]) -> list[str]:
    """The organizations the callers name (not "*"), in a stable order."""
    return sorted({org for caller in callers for org in caller.organizations if org != "*"})


def make_organization_credentials(
    config: CredentialConfig,
    callers: tuple[CallerConfig, ...],
    metrics: Metrics,
    clock: Clock = SYSTEM_CLOCK,
    source_for: Callable[[str], CredentialSource] | None = None,
) -> OrganizationCredentials:
    """per_organization: a store per organization; with Vault, one login for all."""
    from .organizations import OrganizationCredentials

    client = None
    if source_for is None:
        if config.source == "vault":
            from .vault import VaultClient

            client = VaultClient(config.vault, clock=clock.monotonic)
        vault = client

        def source_for(organization: str) -> CredentialSource:
            return make_source(config, clock, organization=organization, client=vault)

    return OrganizationCredentials(
        named_organizations(callers),
        source_for,
        metrics,
        max_on_demand=config.max_on_demand,
        missing_ttl_s=config.missing_ttl_s,
        clock=clock.time,
        monotonic=clock.monotonic,
        wait=clock.wait,
        aclose=None if client is None else client.aclose,
    )


def init_app(
    config: Config,
    *,
    source: CredentialSource | None = None,
    metrics: Metrics | None = None,
    clock: Clock = SYSTEM_CLOCK,
    source_for: Callable[[str], CredentialSource] | None = None,
) -> web.Application:
    """Build the API application (and its admin sibling) for `config`.

    `clock` is where every part reads time; tests pass one they advance. `source`
    replaces the one credential source; with per_organization, `source_for` makes each
    organization's.
    """
    per_organization = config.credential.per_organization
    metrics = metrics or Metrics(per_organization=per_organization)
    if metrics.per_organization != per_organization:
        raise ValueError("Metrics(per_organization=...) must match credential.per_organization")
    single: CredentialStore | None = None
    organizations: OrganizationCredentials | None = None
    credentials: Credentials
    lanes = 1
    if per_organization:
        organizations = make_organization_credentials(
            config.credential, config.callers, metrics, clock, source_for
        )
        credentials = organizations
        # A lane (rate cap, circuit, fleet budget) for each organization that can hold a token.
        lanes = len(organizations.named) + config.credential.max_on_demand
    else:
        credentials = single = CredentialStore(
            source or make_source(config.credential, clock),
            metrics,
            clock=clock.time,
            wait=clock.wait,
        )
    sessions: dict[str, aiohttp.ClientSession] = {}  # by issuer name, open while serving
    issuers = [
        JwksKeys(
            issuer, partial(sessions.__getitem__, issuer.name), metrics, monotonic=clock.monotonic
        )
        for issuer in config.issuers
    ]
    tokens = JwtVerifier(issuers, clock.time) if issuers else None
    callers = Authenticator(config.callers, metrics, tokens, clock.time)
    for keys in issuers:
        keys.on_keys_removed = callers.forget_tokens
    metrics.init_callers(callers.names)

    async def issuers_ctx(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for issuer in config.issuers:
                sessions[issuer.name] = await stack.enter_async_context(open_session(issuer))
            refreshers = JwksRefreshers(issuers, metrics, clock.sleep)
            refreshers.start()
            stack.push_async_callback(refreshers.stop)
            yield

    async def tls_ctx(app: web.Application) -> AsyncIterator[None]:
        assert config.server.tls is not None
        tls = ServerTls(config.server.tls, metrics)  # a pair that does not load stops start-up
        app[TLS] = tls
        async with watching(tls, metrics, clock.sleep):
            yield

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_upstream(
            config.upstream,
            credentials,
            metrics,
            clock=clock.monotonic,
            sleep=clock.sleep,
            max_lanes=lanes,
            on_hold=shared.hold if shared is not None else None,
        ) as upstream:
            app[UPSTREAM] = upstream
            yield

    async def upstream_fetch(organization: str, invoice_id: str) -> Fetched:
        # The client exists once upstream_ctx has run (in `api`, built below): looked up
        # when a miss needs it, so nothing holds a client that may not exist yet.
        return await api[UPSTREAM].fetch(organization, invoice_id)

    shared: SharedLevel | None = None
    redis_store: SharedStore | None = None
    listener: PurgeListener | None = None
    if config.shared is not None:
        from .redis_connection import make_client  # loads the Redis client: only when configured
        from .shared import SharedLevel, SharedStore

        shared_metrics = SharedMetrics(metrics.registry)
        # The client connects nothing yet: the store's cleanup context connects and closes it.
        redis_store = SharedStore(
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
            redis_store,
            shared_metrics,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            per_organization=per_organization,
            max_budgets=lanes,
        )
    cache = InvoiceCache(
        config.cache,
        metrics,
        clock=clock.time,
        fleet=shared,
        # With the fast lane, each stored invoice carries the bytes of its answer.
        prepare=FastLane.prepare if config.server.fast_lane else None,
    )
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
    api[CREDENTIAL_SET] = credentials
    if single is not None:
        api[CREDENTIALS] = single
    api[CALLERS] = callers
    api[CACHE] = cache
    if config.server.fast_lane:
        api[LANE] = FastLane(callers, cache, metrics, clock.time)
    api.router.add_get(INVOICE_PATH, invoices.get)
    api.cleanup_ctx.append(
        _credentials_ctx if organizations is None else organizations_ctx_for(organizations)
    )
    if config.server.tls is not None:
        api.cleanup_ctx.append(tls_ctx)
    if issuers:
        api.cleanup_ctx.append(issuers_ctx)
    api.cleanup_ctx.append(upstream_ctx)
    if redis_store is not None:
        api.cleanup_ctx.append(redis_store.lifetime)  # closed after the fetches under way
    if listener is not None:
        api.cleanup_ctx.append(_purges_ctx(listener, metrics))
    api.cleanup_ctx.append(_cache_ctx)

    admins = Authenticator(admin_callers(config.admin))
    api[ADMINS] = admins
    openapi = resources.files("proxy").joinpath("openapi.yaml").read_bytes()
    if organizations is not None:
        held = organizations
        readiness: Readiness = held.not_ready_reason
        trouble = lambda: held.trouble  # noqa: E731
    else:
        assert single is not None
        store = single
        readiness = credential_readiness(store)
        trouble = lambda: store.trouble  # noqa: E731
    admin_handlers = AdminHandlers(
        metrics,
        readiness,
        trouble,
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


def organizations_ctx_for(
    organizations: OrganizationCredentials,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        async with organizations.running():
            yield

    return ctx


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
