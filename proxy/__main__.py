"""The command line: `invoice-proxy serve | check-config | demo | new-caller-key`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from . import __version__
from . import logging as proxy_logging
from .app import (
    ADMIN_APP,
    ADMINS,
    CALLERS,
    CREDENTIAL_SET,
    LANE,
    METRICS,
    TLS,
    admin_callers,
    init_app,
)
from .auth import key_digest, new_caller_key
from .config import Config, ConfigError, ConfigFileError, load_config, parse_config
from .credential import CredentialSource, EnvSource
from .server import ProxyRunner
from .tls import TlsError, check_files
from .workers import run_workers, worker_config

log = structlog.get_logger("proxy")

# The garbage collector's young generation is collected once this many more tracked
# objects are alive than at its last collection (CPython's default: 700). A miss stores
# an entry that lives on, and the objects of the requests in flight live across young
# collections; at 700 many of them were promoted, and each time the old generation had
# grown by a quarter came a full collection, which walks every cached entry. A proxy
# caching 192,000 invoices under misses ran 97 of them, 14.1 s in all, 0.15 s on
# average, every request waiting; at 50,000, its twin cached 262,000 with 17 young
# collections, 1 of the middle generation and no full one (bench/RESULTS.md).
GC_YOUNG_THRESHOLD = 50_000


async def serve(
    config: Config,
    config_path: str | None = None,
    source: CredentialSource | None = None,
    on_started: Callable[[int, int], None] | None = None,
    worker: int = 0,
) -> None:
    """Run both listeners until SIGTERM/SIGINT; SIGHUP reloads callers, admin keys, credential.

    `config` is the configuration as read; `worker` (of `server.workers`) gives its
    admin port (`worker_config`).
    """
    config = worker_config(config, worker)
    api = init_app(config, source=source)
    admin = api[ADMIN_APP]
    api_runner = ProxyRunner(api, config.server, api.get(LANE))
    admin_runner = ProxyRunner(admin, config.server)
    await api_runner.setup()
    try:
        await admin_runner.setup()
        tls = config.server.tls
        context = api[TLS].context if tls is not None else None
        api_port = await api_runner.listen(
            config.server.host,
            config.server.port,
            reuse_port=config.server.workers > 1,
            ssl_context=context,
        )
        admin_port = await admin_runner.listen(
            config.server.host,
            config.server.admin_port,
            ssl_context=context if tls is not None and tls.admin else None,
        )
        log.info(
            "started",
            version=__version__,
            api=f"{config.server.host}:{api_port}",
            admin=f"{config.server.host}:{admin_port}",
            credential_source=config.credential.source,
            callers=len(config.callers),
            tls=config.server.tls is not None,
            issuers=[issuer.name for issuer in config.issuers],
        )
        if on_started is not None:
            on_started(api_port, admin_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(api, config_path, config, worker))
        await stop.wait()
        log.info("stopping", grace_s=config.server.shutdown_grace_s)
    finally:
        # Stop accepting, let in-flight requests finish within the grace period, then
        # close the upstream session and the credential refresher.
        await api_runner.cleanup()
        await admin_runner.cleanup()
    log.info("stopped")
    proxy_logging.flush_logs()


# The sections a reload does not apply: a change to one waits for a restart.
_RESTART_ONLY = tuple(f.name for f in fields(Config) if f.name not in ("callers", "admin"))


def _reload(
    api: web.Application, config_path: str | None, running: Config, worker: int = 0
) -> None:
    """SIGHUP: read the credential now, and the callers and admin keys from the file.

    The line it logs names every other section of the file that differs from the
    running configuration (`running`, worker `worker`'s), which needs a restart.
    A signal handler that raises is logged by asyncio with a traceback, and a traceback
    may quote what it was handling: every failure here ends in one log line instead.
    """
    try:
        api[CREDENTIAL_SET].wake()
        if config_path is None:
            return
        config = load_config(config_path)
        api[CALLERS].replace(config.callers)
        api[METRICS].init_callers(api[CALLERS].names)
        api[ADMINS].replace(admin_callers(config.admin))
    except ConfigError as exc:
        log.error(
            "config_reload_failed",
            config=config_path,
            problems=exc.problems,
            keeping="running configuration",
        )
        return
    except Exception as exc:  # the service keeps running on its last configuration
        log.error(
            "config_reload_failed",
            config=config_path,
            problems=[f"the reload failed unexpectedly ({type(exc).__name__})"],
            keeping="running configuration",
        )
        return
    read = worker_config(config, worker)
    restart_needed = [n for n in _RESTART_ONLY if getattr(read, n) != getattr(running, n)]
    (log.warning if restart_needed else log.info)(
        "config_reloaded",
        callers=len(config.callers),
        admin_keys=len(config.admin.key_sha256),
        restart_needed=restart_needed,
    )


def _tune_gc() -> None:
    """The serving process's collector (before workers fork: they inherit it)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    run: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    # Outside the except block: an exception from the service does not carry the
    # ImportError as its context ("During handling of the above exception...").
    run(coro)


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("INVOICE_PROXY_CONFIG")
    if not path:
        print("error: give --config PATH or set INVOICE_PROXY_CONFIG", file=sys.stderr)
        sys.exit(2)
    return str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    proxy_logging.configure(config.logging.level, config.logging.format)
    _tune_gc()
    if config.server.workers > 1:
        worker = partial(_serve_worker, config, path)
        return run_workers(config.server.workers, worker, config.server.shutdown_grace_s)
    return _serve_worker(config, path, 0)


def _serve_worker(config: Config, path: str, index: int) -> int:
    try:
        _run(serve(config, path, worker=index))
    except OSError as exc:
        log.error("start_failed", error=str(exc))
        return 1
    except TlsError as exc:
        log.error("start_failed", error=f"server.tls: {exc}")
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}")
        if not isinstance(exc, ConfigFileError):  # a file that cannot be read: its one line
            print(f"{len(exc.problems)} problem(s) found")
        return 1
    problems = check_files(config.server.tls) if config.server.tls is not None else []
    if problems:
        for problem in problems:
            print(f"{path}: {problem}")
        print(f"{len(problems)} problem(s) found")
        return 1
    source = config.credential.source
    print(f"{path}: OK ({len(config.callers)} caller(s), credential source {source!r})")
    return 0


def cmd_new_caller_key(_args: argparse.Namespace) -> int:
    key, digest = new_caller_key()
    print(
        "# The first line is the caller key: give it to the calling service and keep it\n"
        "# secret. The second goes into its [[callers]] table (add it beside the old\n"
        "# digest while the key rotates).",
        file=sys.stderr,
    )
    print(key)
    print(f'key_sha256 = ["{digest}"]')
    return 0


def demo_config(caller_key: str, port: int, admin_port: int, upstream_port: int) -> Config:
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": port, "admin_port": admin_port},
            "upstream": {"base_url": f"http://127.0.0.1:{upstream_port}/v1"},
            "credential": {"source": "env"},
            "cache": {"max_bytes": 64 * 1024 * 1024},
            "admin": {"key_sha256": [key_digest(caller_key)]},
            "logging": {"format": "console"},
            "callers": [
                {"name": "demo", "key_sha256": [key_digest(caller_key)], "organizations": ["acme"]}
            ],
        }
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .standin import StandIn, start

    caller_key = secrets.token_urlsafe(32)
    token = f"demo-token-id:pscale_tkn_{secrets.token_hex(16)}"
    token_id, _, token_value = token.partition(":")

    async def run() -> None:
        upstream_runner, upstream_port = await start(StandIn([token]), port=args.upstream_port)
        try:
            config = demo_config(caller_key, args.port, args.admin_port, upstream_port)
            proxy_logging.configure("info", "json" if args.json_logs else "console")
            source = EnvSource(
                "PLANETSCALE_TOKEN_ID",
                "PLANETSCALE_TOKEN",
                {"PLANETSCALE_TOKEN_ID": token_id, "PLANETSCALE_TOKEN": token_value},
            )
            await serve(
                config,
                None,
                source=source,
                on_started=lambda port, admin: _print_demo(caller_key, port, admin, upstream_port),
            )
        finally:
            await upstream_runner.cleanup()

    _tune_gc()
    try:
        _run(run())
    except OSError as exc:
        print(f"demo: cannot start: {exc.strerror} (try --port/--admin-port)", file=sys.stderr)
        return 1
    return 0


def _print_demo(key: str, port: int, admin_port: int, upstream_port: int) -> None:
    api = f"http://127.0.0.1:{port}/v1/organizations"
    auth = f"-H 'Authorization: Bearer {key}'"
    print(
        f"""
invoice-proxy demo: a PlanetScale stand-in on 127.0.0.1:{upstream_port}, the proxy on
127.0.0.1:{port} (API) and 127.0.0.1:{admin_port} (admin). Demo caller key: {key}

Try, in another terminal:
  curl -si {auth} {api}/acme/invoices/inv_2025_01        # 200, X-Cache: MISS
  curl -si {auth} {api}/acme/invoices/inv_2025_01        # 200, X-Cache: HIT
  curl -si {auth} {api}/acme/invoices/missing-1          # 404 not_found
  curl -si {auth} {api}/globex/invoices/inv_2025_01      # 403 forbidden
  curl -si {api}/acme/invoices/inv_2025_01               # 401 unauthorized
  curl -si -X DELETE {auth} http://127.0.0.1:{admin_port}/cache/organizations/acme/invoices/inv_2025_01
  curl -s http://127.0.0.1:{admin_port}/metrics | grep ^invoice_proxy_
Ctrl-C stops it.
""",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invoice-proxy",
        description="Serve PlanetScale invoices to internal callers without sharing the token.",
    )
    parser.add_argument("--version", action="version", version=f"invoice-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("serve", cmd_serve, "run the service"),
        ("check-config", cmd_check_config, "validate a configuration file"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="the TOML file (or INVOICE_PROXY_CONFIG)")
        p.set_defaults(func=func)
    p = sub.add_parser("demo", help="run a self-contained demo on this machine")
    p.add_argument("--port", type=int, default=8080, help="API port (0: a free one)")
    p.add_argument("--admin-port", type=int, default=9090, help="admin port (0: a free one)")
    p.add_argument("--upstream-port", type=int, default=0, help="the stand-in's port")
    p.add_argument("--json-logs", action="store_true", help="JSON log lines instead of console")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("new-caller-key", help="print a new caller key and its digest line")
    p.set_defaults(func=cmd_new_caller_key)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
