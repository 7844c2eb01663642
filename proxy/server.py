"""Listening: an aiohttp runner with the server limits from `[server]`.

Limits: request line, header size and count, a time limit on reading a request head
(`request_timeout_s`: a client that trickles its headers is cut off), keep-alive
timeout, a cap on open connections (the connection beyond it is closed at once), and
a graceful shutdown that lets in-flight requests finish within `shutdown_grace_s`.

A request aiohttp cannot parse never reaches the application's middleware; it is
answered here in SPEC's JSON error shape, with a fixed message: aiohttp's own quotes
the offending bytes, which may hold a caller key. So is an `Expect` other than
`100-continue` (aiohttp answers it before the middleware, in text that echoes it), and
a method token the parser does not know (`FOO /path HTTP/1.1`: 405, as for any other
method but GET and HEAD).

One case aiohttp makes impossible to answer: when a read holds a complete request and
then a malformed one, its parser raises for the whole read and the complete request is
lost with it; only the 400 is answered, and the connection is closed. The fast lane
keeps that answer: it judges a read whole before it answers from it.

With `server.fast_lane`, each read of an API connection is shown to `proxy.lane` first
(`_Protocol.data_received`): the hits it answers never reach aiohttp's parser, and
everything else is fed to aiohttp in order, at request boundaries both agree on.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from . import errors
from .auth import KnownKey
from .config import ServerConfig
from .errors import ProxyError, error_response
from .lane import FastLane, Head, HeadReader
from .middleware import new_request_id

log = structlog.get_logger("proxy.server")

# A request line whose method is a valid token (RFC 9110 5.6.2) that llhttp does not
# know: such a request is well formed, and its answer is 405, not 400.
_TOKEN_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~]+ HTTP/1\.[01]\r?\n")


class ProxyRunner(web.AppRunner):
    """An `AppRunner` configured from `ServerConfig`, listening on sockets it binds itself."""

    def __init__(
        self, app: web.Application, config: ServerConfig, lane: FastLane | None = None
    ) -> None:
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
        self._config = config
        self._lane = lane

    async def _make_server(self) -> Server:
        # aiohttp builds its Server (after the application's start-up); ours is the same
        # with its own protocol class, which aiohttp offers no other way to choose.
        allow = sorted({route.method for route in self.app.router.routes()} - {"*"})
        return _Server(await super()._make_server(), self._config, ", ".join(allow), self._lane)

    async def listen(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Bind host:port (0: a free port), start serving (HTTPS with `ssl_context`),
        return the bound port."""
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
        await web.SockSite(self, sock, backlog=512, ssl_context=ssl_context).start()
        return int(sock.getsockname()[1])


class _Server(Server):
    """aiohttp's Server with the connection cap and `_Protocol` for each connection."""

    def __init__(
        self, base: Server, config: ServerConfig, allow: str, lane: FastLane | None
    ) -> None:
        super().__init__(
            _checking_expect(base.request_handler),
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self._cap = config.max_connections
        self._head_timeout_s = config.request_timeout_s
        self._allow = allow
        self._lane = lane
        self._head_bytes = min(config.max_line_size, config.max_field_size)
        self._max_headers = config.max_headers

    def __call__(self) -> RequestHandler:
        return _Protocol(
            self,
            head_timeout_s=self._head_timeout_s,
            allow=self._allow,
            lane=self._lane,
            reader=(
                HeadReader(self._head_bytes, self._max_headers) if self._lane is not None else None
            ),
            loop=self._loop,
            **self._kwargs,
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self._cap:
            log.warning("connection_refused", reason="max_connections", limit=self._cap)
            transport.close()


class _Protocol(RequestHandler):
    """One connection: aiohttp's HTTP/1.1, a time limit per request head, JSON errors,
    and with the fast lane, the hits it answers itself (`proxy.lane`)."""

    __slots__ = (
        "_allow", "_answered_by_aiohttp", "_head_timeout_s", "_head_timer", "_known", "_lane",
        "_last_data", "_reader",
    )  # fmt: skip

    def __init__(
        self,
        manager: Server,
        *,
        head_timeout_s: float,
        allow: str,
        lane: FastLane | None,
        reader: HeadReader | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._allow = allow
        self._lane = lane
        self._reader = reader  # None: aiohttp reads every byte of this connection
        self._known = KnownKey()  # the caller key or JWT the lane last found here
        # The last bytes read, kept (not copied) only to tell an unknown method from junk.
        self._last_data = b""
        # The requests aiohttp read (`_request_count`) whose answers it finished, each
        # keeping the connection open: with as many as it read, it has nothing in flight.
        self._answered_by_aiohttp = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_timer()  # a connection that sends nothing is a head not read

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None or self._force_close or self._close:
            self._to_aiohttp(data)
            return
        heads = reader.read(data)
        if heads is None:
            self._reader = None  # not clean: aiohttp's alone, this read included
            self._to_aiohttp(data)
            return
        self._answer(data, heads)

    def _answer(self, data: bytes, heads: list[Head]) -> None:
        """Answer the leading hits of a clean read; the rest goes to aiohttp, in order."""
        assert self._lane is not None
        done = 0
        for head in heads:
            if not head.end:
                break  # begun in an earlier read, which aiohttp has
            try:
                answer = self._lane.answer(head, self.transport, self._known, self._idle)
            except Exception:
                # A bug in the lane: nothing of this answer was written; aiohttp answers
                # it, and the rest of the connection.
                log.exception("fast_lane_failed")
                self._reader = None
                break
            if answer is None:
                break
            assert self.transport is not None  # _idle: the connection is open
            self.transport.write(answer)
            done = head.end
            if not head.keep_alive:
                self.force_close()  # as aiohttp: later requests on the connection are not read
                return
        if done:
            self._stop_head_timer()
            self._kept_alive()
            if done == len(data):
                return
            data = data[done:]
        self._to_aiohttp(data)

    def _idle(self) -> bool:
        """aiohttp has nothing under way on this connection: it waits for a request.

        Either its loop waits for the next request, or that loop is about to: a new
        connection before the loop first ran, or every request aiohttp read is answered
        and kept the connection open, and the loop has not yet come round to wait again.
        That takes an event-loop turn, in which the next request of a quick client often
        arrives; were the lane to leave it to aiohttp, every later one would arrive in
        such a turn too, and the connection would never come back to the lane.
        """
        waiter = self._waiter
        if waiter is None:
            if self._answered_by_aiohttp != self._request_count:
                return False  # a request read, its answer not finished
        elif waiter.done():
            return False
        return (
            not self._messages
            and not self._request_in_progress
            and self._keepalive
            and not self._upgraded
            and self._payload_parser is None
            and not self.writing_paused
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's handling of one request it read, counted once its answer is written
        whole and keeps the connection open (`_idle`)."""
        response, reset = await super()._handle_request(request, start_time, request_handler)
        if not reset and response.keep_alive:
            self._answered_by_aiohttp += 1
        return response, reset

    def _kept_alive(self) -> None:
        """After an answer: the keep-alive timeout counts from now, as in aiohttp's loop."""
        if self._keepalive_timeout > 0:
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _to_aiohttp(self, data: bytes) -> None:
        # A head that arrives whole (nearly every request) needs no timer: one is started
        # only when a chunk leaves a head incomplete, and runs until the head is parsed.
        # Between requests the keep-alive timeout applies instead.
        heads = self._request_count
        self._last_data = data
        super().data_received(data)
        if self._request_count != heads:
            self._stop_head_timer()
        elif self._head_timer is None:
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("connection_closed", reason="request_timeout", limit_s=self._head_timeout_s)
        if self._request_in_progress:
            self.close()  # the answer under way is sent first; the slow head is not read
        else:
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or a failure outside the middleware)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is dropped")
        error = _protocol_error(status, exc)
        if isinstance(exc, BadHttpMethod) and _TOKEN_REQUEST_LINE.match(self._last_data):
            error = errors.method_not_allowed(self._allow)
        log.info("request_refused", status=error.status, reason=error.message)
        response = error_response(error, new_request_id())
        response.force_close()
        return response


Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


def _checking_expect(handler: Handler) -> Handler:
    """Refuse an `Expect` other than `100-continue` in SPEC's shape, before aiohttp does.

    aiohttp checks `Expect` before the middleware runs and answers a plain-text 417
    that echoes the value. As aiohttp does, only HTTP/1.1 requests are checked.
    """

    async def handle(request: BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if (
            expect is not None
            and request.version == HttpVersion11
            and expect.lower() != "100-continue"
        ):
            error = ProxyError(417, "invalid_request", "only Expect: 100-continue is supported")
            log.info("request_refused", status=error.status, reason=error.message)
            return error_response(error, new_request_id())
        return await handler(request)

    return handle


def _protocol_error(status: int, exc: BaseException | None) -> ProxyError:
    if status == 400:
        if isinstance(exc, LineTooLong):
            return errors.invalid_request("the request line or a header is too long")
        return errors.invalid_request(
            "the request is not valid HTTP/1.1 (malformed, or too many headers)"
        )
    return ProxyError(status, "internal_error", "the proxy failed; this is a bug")
