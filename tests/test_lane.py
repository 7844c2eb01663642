"""The fast lane's answers, byte for byte against aiohttp's (the differential property
test over whole streams is tests/test_fast_lane.py)."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import lane as lane_module
from proxy.app import LANE

from .helpers import BILLING_KEY, ProxyFactory, get, invoice_path, metric

DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
GENERATED_ID = re.compile(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n")


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on one connection; everything read until the server closes or is quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        while True:
            try:
                async with asyncio.timeout(0.3):
                    chunk = await reader.read(65536)
            except TimeoutError:
                return received
            if not chunk:
                return received
            received += chunk
    finally:
        writer.close()


def normalised(answer: bytes) -> bytes:
    answer = DATE.sub(b"\r\nDate: -\r\n", answer)
    return GENERATED_ID.sub(b"\r\nX-Request-ID: -\r\n", answer)


def head(method: str = "GET", path: str = "", extra: str = "", version: str = "1.1") -> bytes:
    path = path or invoice_path()
    return (
        f"{method} {path} HTTP/{version}\r\nHost: proxy\r\n"
        f"Authorization: Bearer {BILLING_KEY}\r\n{extra}\r\n"
    ).encode("ascii")


@pytest.mark.parametrize(
    "request_bytes",
    [
        head(),
        head("HEAD"),
        head(extra='If-None-Match: "nope", W/"x"\r\n'),
        head(version="1.0"),
        head(version="1.0", extra="Connection: keep-alive\r\n"),
        head(extra="Connection: close\r\n"),
        head(extra="X-Request-ID: caller-chosen.id:1\r\n"),
        head(extra="If-None-Match: *\r\n"),
        head(version="1.0", extra="If-None-Match: *\r\n"),
        head(path=invoice_path("acme", "open-2099-01")),
        head("HEAD", path=invoice_path("acme", "open-2099-01"), extra="If-None-Match: *\r\n"),
        head() + head("HEAD") + head(),
    ],
)
async def test_a_hit_is_answered_by_the_lane_with_aiohttps_bytes(
    make_proxy: ProxyFactory, request_bytes: bytes
) -> None:
    with_lane = await make_proxy(listen=True)
    without = await make_proxy(listen=True, server={"fast_lane": False})
    for proxy in (with_lane, without):  # the misses that fill each cache
        for path in (invoice_path(), invoice_path("acme", "open-2099-01")):
            await exchange(proxy.port, head(path=path, extra="Connection: close\r\n"))
    lane = with_lane.app[LANE]
    before = lane.answered
    got = await exchange(with_lane.port, request_bytes)
    expected = await exchange(without.port, request_bytes)
    assert lane.answered > before
    assert normalised(got) == normalised(expected)
    assert LANE not in without.app


async def test_an_entrys_prepared_answer_counts_against_the_cache_size(
    make_proxy: ProxyFactory,
) -> None:
    with_lane = await make_proxy()
    without = await make_proxy(server={"fast_lane": False})
    sizes = []
    for proxy in (with_lane, without):
        response = await get(proxy)
        assert response.headers["X-Cache"] == "MISS"
        sizes.append(metric(proxy, "invoice_proxy_cache_bytes"))
    head_bytes = len(b"HTTP/1.1 200 OK\r\nETag: \r\nCache-Control: \r\nX-Cache: HIT\r\n")
    # The fixed part of the answer's head, at least, and no more than a small allowance.
    assert head_bytes + len(response.headers["ETag"]) < sizes[0] - sizes[1] < 1024


async def test_a_failure_in_the_lane_leaves_the_request_to_aiohttp(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await make_proxy(listen=True)
    await exchange(proxy.port, head(extra="Connection: close\r\n"))  # the miss

    def broken(*_args: object) -> bytes:
        raise RuntimeError("a bug in the lane")

    monkeypatch.setattr(proxy.app[LANE], "answer", broken)
    answer = await exchange(proxy.port, head() + head(extra="Connection: close\r\n"))
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert answer.count(b"X-Cache: HIT\r\n") == 2
    assert "fast_lane_failed" in capsys.readouterr().out


async def test_after_a_head_split_over_reads_the_lane_answers_the_next_hit(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(listen=True)
    await exchange(proxy.port, head(extra="Connection: close\r\n"))  # the miss
    lane = proxy.app[LANE]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        request = head()
        for piece in (request[:3], request[3:], request):  # a tiny first read, then whole
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            answers = b""
            while answers.count(b"X-Cache: HIT") < 2:
                answers += await reader.read(65536)
    finally:
        writer.close()
    assert lane.answered == 1  # the split head was aiohttp's, the whole one the lane's


# Bytes that matter to a head's cleanness, often: line ends, blanks, controls, non-ASCII.
HEAD_BYTES = st.binary(max_size=80) | st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b" ", b"\t", b"a", b":", b"\x00", b"\x7f", b"\xff"]),
    max_size=30,
).map(b"".join)


@given(rest=HEAD_BYTES)
def test_the_one_pass_test_of_a_whole_head_is_the_plain_test(rest: bytes) -> None:
    """`_PLAIN_HEAD` (one regular expression) says of a whole head what `_plain` says."""
    head_bytes = b"GET /" + rest + b"\r\n\r\n"
    end = head_bytes.find(b"\r\n\r\n") + 4
    whole = head_bytes[:end]  # a head ends at its first blank line
    one_pass = lane_module._PLAIN_HEAD.fullmatch(whole) is not None
    assert one_pass == lane_module._plain(whole)
