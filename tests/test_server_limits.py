"""The real listener's limits, over raw sockets: what a careless or hostile client meets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from proxy.standin import Behaviour

from .helpers import REPORTING_KEY, ProxyFactory, Upstream, invoice_path

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


def request(path: str, *, method: str = "GET", extra: str = "", auth: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: proxy\r\n{AUTH if auth else ''}{extra}\r\n"
    return head.encode("latin-1")


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


async def test_invoice_is_served_by_the_real_listener(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    raw = await exchange(listener.port, request(invoice_path()))
    assert raw.status == 200
    assert json.loads(raw.body)["id"] == "inv_2025_01"


async def test_over_long_request_line_is_400_json(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True, server={"max_line_size": 1024})
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path("acme", "a" * 2000)))
        assert_json_error(await read_response(reader), 400, "invalid_request")
        assert await closed_within(reader, 1.0), "the stream cannot be trusted after it"


async def test_too_many_headers_is_400_json(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True, server={"max_headers": 8})
    extra = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(20))
    raw = await exchange(listener.port, request(invoice_path(), extra=extra))
    assert_json_error(raw, 400, "invalid_request")


async def test_over_long_header_is_400_json(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True, server={"max_field_size": 1024})
    raw = await exchange(listener.port, request(invoice_path(), extra=f"X-Big: {'b' * 2000}\r\n"))
    assert_json_error(raw, 400, "invalid_request")


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


async def test_slow_client_trickling_headers_is_cut_at_request_timeout(
    make_proxy: ProxyFactory,
) -> None:
    listener = await make_proxy(
        listen=True, server={"request_timeout_s": 0.5, "keepalive_timeout_s": 30}
    )
    data = request(invoice_path())
    async with connect(listener.port) as (reader, writer):
        start = asyncio.get_running_loop().time()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in data:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)  # the whole head would take 4 s

        sender = asyncio.create_task(trickle())
        try:
            assert await closed_within(reader, 0.5 + MARGIN_S)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        assert asyncio.get_running_loop().time() - start >= 0.45


async def test_connection_that_sends_nothing_is_closed_at_request_timeout(
    make_proxy: ProxyFactory,
) -> None:
    listener = await make_proxy(
        listen=True, server={"request_timeout_s": 0.3, "keepalive_timeout_s": 30}
    )
    async with connect(listener.port) as (reader, _):
        assert await closed_within(reader, 0.3 + MARGIN_S)


async def test_idle_keep_alive_connection_is_closed_at_keepalive_timeout(
    make_proxy: ProxyFactory,
) -> None:
    listener = await make_proxy(
        listen=True, server={"keepalive_timeout_s": 0.3, "request_timeout_s": 30}
    )
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path()))
        assert (await read_response(reader)).status == 200
        assert await closed_within(reader, 0.3 + MARGIN_S)


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
    make_proxy: ProxyFactory,
) -> None:
    listener = await make_proxy(listen=True, server={"request_timeout_s": 0.3})
    async with connect(listener.port) as (reader, writer):
        for i in range(3):
            writer.write(request(invoice_path("acme", f"inv_{i}")))
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(0.2)  # idle gaps add up past request_timeout_s


async def test_pipelined_requests_are_answered_in_order(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    async with connect(listener.port) as (reader, writer):
        writer.write(b"".join(request(invoice_path("acme", f"inv_{i}")) for i in range(3)))
        for i in range(3):
            raw = await read_response(reader)
            assert json.loads(raw.body)["id"] == f"inv_{i}"


async def test_connection_beyond_max_connections_is_closed(
    make_proxy: ProxyFactory,
) -> None:
    listener = await make_proxy(listen=True, server={"max_connections": 5})
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connect(listener.port)) for _ in range(5)]
        for reader, writer in held:
            writer.write(request(invoice_path()))
            assert (await read_response(reader)).status == 200

        async with connect(listener.port) as (reader, writer):
            writer.write(request(invoice_path()))
            assert await closed_within(reader, 1.0)
            assert not reader._buffer  # closed without a word

        for reader, writer in held:  # the five keep their connections
            writer.write(request(invoice_path()))
            assert (await read_response(reader)).status == 200

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
                assert raw.status == 200
                break
        else:
            raise AssertionError("no room after a connection closed")


async def test_head_answers_the_headers_and_no_body(make_proxy: ProxyFactory) -> None:
    listener = await make_proxy(listen=True)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path(), method="HEAD"))
        raw = await read_response(reader, head=True)
        assert raw.status == 200
        assert raw.headers["etag"] and raw.headers["x-request-id"]
        assert raw.headers["content-type"].startswith("application/json")
        # No body followed the head: the next answer on the connection starts cleanly.
        writer.write(request(invoice_path()))
        assert (await read_response(reader)).status == 200


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
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """Documented aiohttp limit: its parser raises for the whole read, so only the 400 is
    answered, and the connection is closed (the client sees its request unanswered)."""
    listener = await make_proxy(listen=True)
    async with connect(listener.port) as (reader, writer):
        writer.write(request(invoice_path()) + b"GET /\x00 HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert_json_error(await read_response(reader), 400, "invalid_request")
        assert await closed_within(reader, 1.0)
    assert upstream.standin.stats.requests == 0
