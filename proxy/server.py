"""Listening: an aiohttp runner with the server limits from `[server]`.

Limits: request line, header size and count, keep-alive timeout, a cap on open
connections (the connection beyond it is closed at once), and a graceful shutdown
that lets in-flight requests finish within `shutdown_grace_s`.
"""

from __future__ import annotations

import socket
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .config import ServerConfig

log = structlog.get_logger("proxy.server")


class ProxyRunner(web.AppRunner):
    """An `AppRunner` configured from `ServerConfig`, listening on sockets it binds itself."""

    def __init__(self, app: web.Application, config: ServerConfig) -> None:
        super().__init__(
            app,
            handle_signals=False,
            access_log=None,  # the request middleware writes the one line per request
            shutdown_timeout=config.shutdown_grace_s,
            keepalive_timeout=config.keepalive_timeout_s,
            max_line_size=config.max_line_size,
            max_field_size=config.max_field_size,
            max_headers=config.max_headers,
        )
        self._max_connections = config.max_connections

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        cap = self._max_connections
        accept = server.connection_made

        def connection_made(handler: RequestHandler, transport: Any) -> None:
            accept(handler, transport)
            if len(server.connections) > cap:
                log.warning("connection_refused", reason="max_connections", limit=cap)
                transport.close()

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Bind host:port (0: a free port), start serving, return the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        await web.SockSite(self, sock, backlog=512).start()
        return int(sock.getsockname()[1])
