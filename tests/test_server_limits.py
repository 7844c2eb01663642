"""The real listener's limits, over raw sockets: what a careless or hostile client meets.

Each limit of `[server]` is checked with a cache hit on a listener with the hit fast lane
(`server.fast_lane`, the default: a hit is what it answers itself) and on one without.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.standin import Behaviour

from .helpers import (
    REPORTING_KEY,
    Proxy,
    ProxyFactory,
    Upstream,
    config_dict,
    get,
    invoice_path,
    running_proxy,
    wait_until,
)

MARGIN_S = 0.5
AUTH = f"Authorization: Bearer {REPORTING_KEY}\r\n"


@dataclass
class Raw:
    """One HTTP/1.1 response as read off the socket."""

    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def json(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json")
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Raw:
    async with asyncio.timeout(5):
        block = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = block.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if head:
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
    return Raw(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(port: int, data: bytes, *, head: bool = False) -> Raw:
    async with connect(port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await read_response(reader, head=head)


def request(
    path: str, *, method: str = "GET", extra: str = "", auth: bool = True, version: str = "1.1"
) -> bytes:
    head = f"{method} {path} HTTP/{version}\r\nHost: proxy\r\n{AUTH if auth else ''}{extra}\r\n"
    return head.encode("latin-1")


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def lane(request: pytest.FixtureRequest) -> bool:
    """`server.fast_lane`: each test below runs with the lane and without."""
    return bool(request.param)


async def hit_listener(make_proxy: ProxyFactory, lane: bool, *ids: str, **server: Any) -> Proxy:
    """A listener (`server` over the test's [server]) with `ids` (default: the invoice of
    `invoice_path()`) cached: a request for one of them is a hit."""
    listener = await make_proxy(listen=True, server={"fast_lane": lane, **server})
    for invoice_id in ids or ("inv_2025_01",):
        assert (await get(listener, invoice_id)).status == 200
    return listener


def assert_hit(raw: Raw) -> None:
    assert raw.status == 200 and raw.headers["x-cache"] == "HIT"


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Does the server close the connection within `seconds`? (Any bytes it sends first
    are read and ignored.)"""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def assert_json_error(raw: Raw, status: int, code: str) -> None:
    assert raw.status == status
    body = raw.json()
    assert body["code"] == code and body["message"]
    assert set(body) == {"code", "message"}
    assert raw.headers["x-request-id"]


async def test_invoice_is_served_by_the_real_listener(make_proxy: ProxyFactory, lane: bool) -> None:
    listener = await make_proxy(listen=True, server={"fast_lane": lane})
    raw = await exchange(listener.port, request(invoice_path()))
    assert raw.status == 200 and raw.headers["x-cache"] == "MISS"
    assert json.loads(raw.body)["id"] == "inv_2025_01"
    raw = await exchange(listener.port, request(invoice_path()))
    assert_hit(raw)
    assert json.loads(raw.body)["id"] == "inv_2025_01"


@pytest.mark.parametrize(
    "target", [invoice_path("acme", "a" * 2000), invoice_path() + "?q=" + "q" * 2000]
)
async def test_over_long_request_line_is_400_json(
    make_proxy: ProxyFactory, lane: bool, target: str
) -> None:
    """An id beyond the limit, or a cached invoice's path with a long query."""
    listener = await hit_listener(make_proxy, lane, max_line_size=1024)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(target))
        assert_json_error(await read_response(reader), 400, "invalid_request")
        assert await closed_within(reader, 1.0), "the stream cannot be trusted after it"


async def test_too_many_headers_is_400_json(make_proxy: ProxyFactory, lane: bool) -> None:
    listener = await hit_listener(make_proxy, lane, max_headers=8)
    extra = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(20))
    raw = await exchange(listener.port, request(invoice_path(), extra=extra))
    assert_json_error(raw, 400, "invalid_request")
    # One fewer than the limit (Host and Authorization are two): a hit.
    extra = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(5))
    assert_hit(await exchange(listener.port, request(invoice_path(), extra=extra)))


async def test_over_long_header_is_400_json(make_proxy: ProxyFactory, lane: bool) -> None:
    listener = await hit_listener(make_proxy, lane, max_field_size=1024)
    raw = await exchange(listener.port, request(invoice_path(), extra=f"X-Big: {'b' * 2000}\r\n"))
    assert_json_error(raw, 400, "invalid_request")
    raw = await exchange(listener.port, request(invoice_path(), extra=f"X-Big: {'b' * 900}\r\n"))
    assert_hit(raw)


async def test_unparseable_request_line_is_400_json(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    for line in (
        b"HELLO\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\r\n\r\n",
    ):
        assert_json_error(await exchange(listener.port, line), 400, "invalid_request")


async def test_protocol_error_body_never_echoes_the_request(
    make_proxy: ProxyFactory,
) -> None:
    """aiohttp's own message quotes the offending bytes; a key there would leak."""
    listener = await make_proxy(listen=True)
    secret = "Bearer leaked-KEY-0123456789"
    raw = await exchange(
        listener.port, f"GET / HTTP/1.1\r\nAuthorization: {secret}\x01\r\n\r\n".encode()
    )
    assert raw.status == 400
    assert b"leaked" not in raw.body


async def trickled_out(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, timeout_s: float
) -> None:
    """Send `data` a byte every 50 ms; the server closes at `timeout_s`, no later and not
    much sooner."""
    start = asyncio.get_running_loop().time()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)  # the whole head would take seconds

    sender = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, timeout_s + MARGIN_S)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert asyncio.get_running_loop().time() - start >= timeout_s - 0.05


async def test_slow_client_trickling_headers_is_cut_at_request_timeout(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane, request_timeout_s=0.5, keepalive_timeout_s=30)
    async with connect(listener.port) as (reader, writer):
        await trickled_out(reader, writer, request(invoice_path()), 0.5)


async def test_a_head_trickled_after_a_hit_is_cut_at_request_timeout(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    """The head timer runs for each head from its first byte: not from the connection's
    start, not from the answer before."""
    listener = await hit_listener(make_proxy, lane, request_timeout_s=0.5, keepalive_timeout_s=30)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path()))
        assert_hit(await read_response(reader))
        await asyncio.sleep(0.3)  # idle: the keep-alive timeout's time, not the head timer's
        await trickled_out(reader, writer, request(invoice_path()), 0.5)


async def test_connection_that_sends_nothing_is_closed_at_request_timeout(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await make_proxy(
        listen=True,
        server={"request_timeout_s": 0.3, "keepalive_timeout_s": 30, "fast_lane": lane},
    )
    async with connect(listener.port) as (reader, _):
        assert await closed_within(reader, 0.3 + MARGIN_S)


async def test_idle_keep_alive_connection_is_closed_at_keepalive_timeout(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane, keepalive_timeout_s=0.3, request_timeout_s=30)
    async with connect(listener.port) as (reader, writer):
        await asyncio.sleep(0.2)  # the timeout counts from the last answer, not the connection
        writer.write(request(invoice_path()))
        assert_hit(await read_response(reader))
        start = asyncio.get_running_loop().time()
        assert await closed_within(reader, 0.3 + MARGIN_S)
        assert asyncio.get_running_loop().time() - start >= 0.25


async def test_hits_within_the_keepalive_timeout_keep_the_connection(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane, keepalive_timeout_s=0.4, request_timeout_s=30)
    async with connect(listener.port) as (reader, writer):
        for _ in range(4):  # 1.2 s in all, never 0.4 s idle
            writer.write(request(invoice_path()))
            assert_hit(await read_response(reader))
            await asyncio.sleep(0.3)


async def test_slow_upstream_is_not_cut_by_the_head_timer(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """request_timeout_s bounds the request head; a slow upstream is the deadline's job."""
    listener = await make_proxy(listen=True, server={"request_timeout_s": 0.3})
    upstream.standin.behave("inv_slow", Behaviour("slow", delay_s=0.6))
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path("acme", "inv_slow")))
        assert (await read_response(reader)).status == 200


async def test_keep_alive_serves_requests_one_after_another(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane, request_timeout_s=0.3)
    async with connect(listener.port) as (reader, writer):
        for _ in range(4):
            writer.write(request(invoice_path()))
            assert_hit(await read_response(reader))
            await asyncio.sleep(0.2)  # idle gaps add up past request_timeout_s


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: ProxyFactory, lane: bool, upstream: Upstream
) -> None:
    """Hits pipelined behind a slow miss wait for it."""
    listener = await hit_listener(make_proxy, lane, "inv_0", "inv_2")
    upstream.standin.behave("inv_1", Behaviour("slow", delay_s=0.2))
    ids = ["inv_0", "inv_1", "inv_2", "inv_0", "inv_1"]
    async with connect(listener.port) as (reader, writer):
        writer.write(b"".join(request(invoice_path("acme", i)) for i in ids))
        for i, x_cache in zip(ids, ["HIT", "MISS", "HIT", "HIT", "HIT"], strict=True):
            raw = await read_response(reader)
            assert json.loads(raw.body)["id"] == i and raw.headers["x-cache"] == x_cache


async def test_connection_beyond_max_connections_is_closed(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    # Not hit_listener: its client would hold a connection of its own.
    listener = await make_proxy(listen=True, server={"max_connections": 5, "fast_lane": lane})
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connect(listener.port)) for _ in range(5)]
        for i, (reader, writer) in enumerate(held):
            writer.write(request(invoice_path()))
            raw = await read_response(reader)
            assert raw.status == 200 and raw.headers["x-cache"] == ("HIT" if i else "MISS")

        async with connect(listener.port) as (reader, writer):
            writer.write(request(invoice_path()))
            assert await closed_within(reader, 1.0)
            assert not reader._buffer  # closed without a word

        for reader, writer in held:  # the five keep their connections
            writer.write(request(invoice_path()))
            assert_hit(await read_response(reader))

        reader, writer = held.pop()
        writer.close()
        await writer.wait_closed()
        for _ in range(40):  # the server notices the close, then has room again
            async with connect(listener.port) as (reader, writer):
                writer.write(request(invoice_path()))
                try:
                    raw = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    await asyncio.sleep(0.05)
                    continue
                assert_hit(raw)
                break
        else:
            raise AssertionError("no room after a connection closed")


async def test_head_answers_the_headers_and_no_body(make_proxy: ProxyFactory, lane: bool) -> None:
    listener = await hit_listener(make_proxy, lane)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), method="HEAD"))
        raw = await read_response(reader, head=True)
        assert raw.status == 200 and raw.headers["x-cache"] == "HIT"
        body = await (await get(listener)).read()
        assert raw.headers["content-length"] == str(len(body))
        assert raw.headers["etag"] and raw.headers["x-request-id"]
        assert raw.headers["content-type"].startswith("application/json")
        # No body followed the head: the next answer on the connection starts cleanly.
        writer.write(request(invoice_path()))
        assert_hit(await read_response(reader))


async def test_head_of_an_error_has_no_body(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), method="HEAD", auth=False))
        raw = await read_response(reader, head=True)
        assert raw.status == 401 and raw.headers["x-request-id"]
        writer.write(request(invoice_path()))
        assert (await read_response(reader)).status == 200


async def test_unknown_paths_are_404_json(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    for path in ("/", "/v1", "/v1/organizations/acme/invoices", "/../../etc/passwd", "/%2e%2e/"):
        assert_json_error(await exchange(listener.port, request(path)), 404, "not_found")
    assert_json_error(await exchange(listener.admin_port, request("/nope")), 404, "not_found")


async def test_other_methods_are_405_json_with_allow(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT"):
        path = "proxy:443" if method == "CONNECT" else invoice_path()
        extra = "Content-Length: 0\r\n" if method in ("POST", "PUT") else ""
        raw = await exchange(listener.port, request(path, method=method, extra=extra))
        if method == "CONNECT":
            assert raw.status in (400, 404, 405)
            continue
        assert_json_error(raw, 405, "method_not_allowed")
        assert set(raw.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


async def test_get_with_a_body_is_400_json(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    listener = await make_proxy(listen=True)
    for extra, body in (
        ("Content-Length: 2\r\n", b"{}"),
        ("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
        ("Content-Length: 100000\r\n", b"x" * 100000),
    ):
        raw = await exchange(listener.port, request(invoice_path(), extra=extra) + body)
        assert_json_error(raw, 400, "invalid_request")
    assert upstream.standin.stats.requests == 0


async def test_request_smuggling_headers_are_refused(make_proxy: ProxyFactory) -> None:
    """Both Content-Length and Transfer-Encoding, or two lengths: refused, not guessed."""
    listener = await make_proxy(listen=True)
    for extra in (
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 0\r\nContent-Length: 5\r\n",
    ):
        raw = await exchange(listener.port, request(invoice_path(), extra=extra) + b"0\r\n\r\n")
        assert raw.status == 400


async def test_an_unknown_expectation_is_417_json_that_does_not_echo_it(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    listener = await make_proxy(listen=True)
    for port, path in ((listener.port, invoice_path()), (listener.admin_port, "/healthz")):
        raw = await exchange(port, request(path, extra="Expect: secret-KEY-0123456789\r\n"))
        assert_json_error(raw, 417, "invalid_request")
        assert b"secret-KEY" not in raw.body
    assert upstream.standin.stats.requests == 0


async def test_expect_100_continue_is_still_served(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), extra="Expect: 100-continue\r\n"))
        await writer.drain()
        first = await read_response(reader, head=True)
        final = first if first.status != 100 else await read_response(reader)
    assert final.status == 200


async def test_an_unknown_method_token_is_405_json_with_allow(
    make_proxy: ProxyFactory,
) -> None:
    """llhttp refuses methods it does not know; a well-formed token is still a method."""
    listener = await make_proxy(listen=True)
    for method in ("FOO", "BREW", "X-CUSTOM"):
        raw = await exchange(listener.port, request(invoice_path(), method=method))
        assert_json_error(raw, 405, "method_not_allowed")
        assert set(raw.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    raw = await exchange(listener.admin_port, request("/metrics", method="FOO"))
    assert_json_error(raw, 405, "method_not_allowed")
    assert set(raw.headers["allow"].replace(" ", "").split(",")) == {"DELETE", "GET", "HEAD"}


async def test_a_complete_request_before_a_malformed_one_in_one_read_is_lost(
    make_proxy: ProxyFactory, upstream: Upstream, lane: bool
) -> None:
    """Documented aiohttp limit: its parser raises for the whole read, so only the 400 is
    answered, and the connection is closed (the client sees its request unanswered). The
    lane keeps it so, for a hit too."""
    listener = await hit_listener(make_proxy, lane)
    for path in (invoice_path(), invoice_path("acme", "inv_other")):  # a hit, a miss
        async with connect(listener.port) as (reader, writer):
            writer.write(request(path) + b"GET /\x00 HTTP/1.1\r\n\r\n")
            await writer.drain()
            assert_json_error(await read_response(reader), 400, "invalid_request")
            assert await closed_within(reader, 1.0)
    assert upstream.standin.stats.requests == 1  # the warm-up


async def test_http_1_0_hit_is_answered_and_the_connection_closed(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), version="1.0"))
        raw = await read_response(reader)
        assert_hit(raw)
        assert "connection" not in raw.headers  # HTTP/1.0 closes by default
        assert await closed_within(reader, 1.0)


async def test_http_1_0_keep_alive_keeps_the_connection(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), version="1.0", extra="Connection: keep-alive\r\n"))
        raw = await read_response(reader)
        assert_hit(raw)
        assert raw.headers["connection"] == "keep-alive"
        writer.write(request(invoice_path(), version="1.0", extra="Connection: keep-alive\r\n"))
        assert_hit(await read_response(reader))
        assert not await closed_within(reader, 0.3)


async def test_connection_close_is_answered_and_honoured(
    make_proxy: ProxyFactory, lane: bool
) -> None:
    listener = await hit_listener(make_proxy, lane)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path()))
        assert_hit(await read_response(reader))
        writer.write(request(invoice_path(), extra="Connection: close\r\n"))
        raw = await read_response(reader)
        assert_hit(raw)
        assert raw.headers["connection"] == "close"
        assert await closed_within(reader, 1.0)


@contextlib.asynccontextmanager
async def served(
    upstream: Upstream, credential_file: Path, lane: bool, **server: Any
) -> AsyncIterator[tuple[Proxy, contextlib.AsyncExitStack]]:
    """A listener with invoice_path()'s invoice cached, and the stack whose `aclose()`
    shuts it down (as SIGTERM does) while the test still holds its connections."""
    data = config_dict(upstream.base_url, credential_file, server={"fast_lane": lane, **server})
    async with contextlib.AsyncExitStack() as stack:
        listener = await stack.enter_async_context(running_proxy(parse_config(data), listen=True))
        assert (await get(listener)).status == 200
        yield listener, stack


async def test_shutdown_does_not_wait_for_an_idle_keep_alive_connection(
    upstream: Upstream, credential_file: Path, lane: bool
) -> None:
    async with (
        served(upstream, credential_file, lane, shutdown_grace_s=5) as (listener, stack),
        connect(listener.port) as (reader, writer),
    ):
        writer.write(request(invoice_path()))
        assert_hit(await read_response(reader))
        start = time.monotonic()
        await stack.aclose()
        assert time.monotonic() - start < 1.0, "shutdown waited for an idle connection"
        assert await closed_within(reader, MARGIN_S)


async def test_shutdown_lets_the_request_in_flight_finish_within_the_grace(
    upstream: Upstream, credential_file: Path, lane: bool
) -> None:
    """A hit answered, then a slow miss pipelined behind it: at shutdown the miss is still
    answered, and the connection closed after it."""
    upstream.standin.behave("inv_slow", Behaviour("slow", delay_s=0.5))
    async with (
        served(upstream, credential_file, lane, shutdown_grace_s=3) as (listener, stack),
        connect(listener.port) as (reader, writer),
    ):
        writer.write(request(invoice_path()) + request(invoice_path("acme", "inv_slow")))
        assert_hit(await read_response(reader))
        await wait_until(lambda: upstream.standin.stats.in_flight == 1, "the slow miss")
        start = time.monotonic()
        shutdown = asyncio.create_task(stack.aclose())
        raw = await read_response(reader)
        assert raw.status == 200 and json.loads(raw.body)["id"] == "inv_slow"
        assert await closed_within(reader, MARGIN_S)
        await shutdown
        assert 0.3 < time.monotonic() - start < 3.0


async def test_shutdown_cuts_a_request_longer_than_the_grace(
    upstream: Upstream, credential_file: Path, lane: bool
) -> None:
    upstream.standin.behave("inv_slow", Behaviour("slow", delay_s=5))
    async with (
        served(upstream, credential_file, lane, shutdown_grace_s=0.5) as (listener, stack),
        connect(listener.port) as (reader, writer),
    ):
        writer.write(request(invoice_path()) + request(invoice_path("acme", "inv_slow")))
        assert_hit(await read_response(reader))
        await wait_until(lambda: upstream.standin.stats.in_flight == 1, "the slow miss")
        start = time.monotonic()
        await stack.aclose()
        # aiohttp waits the grace for the handler, then as long again for it to cancel.
        assert 0.45 < time.monotonic() - start < 2 * 0.5 + MARGIN_S
        assert await closed_within(reader, MARGIN_S)
