"""The fast lane's answers, byte for byte against aiohttp's (the differential property
test over whole streams is tests/test_fast_lane.py), and its reading of heads against
llhttp's."""

from __future__ import annotations

import asyncio
import gc
import itertools
import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy import lane as lane_module
from proxy import server as server_module
from proxy.app import CALLERS, LANE
from proxy.cache import Fetched, InvoiceCache
from proxy.config import CacheConfig, CallerConfig
from proxy.lane import FastLane, Head, HeadReader
from proxy.metrics import Metrics

from .helpers import (
    BILLING_KEY,
    REPORTING_KEY,
    ProxyFactory,
    get,
    invoice_path,
    key_digest,
    metric,
    one_answer,
)

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


async def test_a_cached_invoice_is_no_more_work_for_the_garbage_collector_with_the_lane() -> None:
    """Every full collection walks each object the collector tracks, and every request
    waits for it: with many invoices cached, each tracked object an entry carries makes
    that pause longer. The lane's prepared answer adds none to a cached invoice."""

    async def fetch(organization: str, invoice_id: str) -> Fetched:
        return Fetched(200, b'{"id":"%s"}' % invoice_id.encode(), None)

    tracked = []
    for prepare in (None, FastLane.prepare):
        cache = InvoiceCache(CacheConfig(), Metrics(), prepare=prepare)
        for i in range(100):
            await cache.load("acme", f"inv_{i}", fetch)
        gc.collect()
        entries = [cache.peek(("acme", f"inv_{i}")) for i in range(100)]
        assert all(entry is not None and gc.is_tracked(entry) for entry in entries)
        # What each entry holds (but its class) that the collector still tracks after a
        # collection.
        held = [held for e in entries for held in gc.get_referents(e) if held is not type(e)]
        tracked.append(sum(map(gc.is_tracked, held)))
    assert tracked == [0, 0]


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


async def read_until_hits(reader: asyncio.StreamReader, hits: int) -> bytes:
    """What a connection sends until it has sent `hits` answers from the cache."""
    answers = b""
    async with asyncio.timeout(5):
        while answers.count(b"X-Cache: HIT") < hits:
            answers += await reader.read(65536)
    return answers


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
        await read_until_hits(reader, 2)
    finally:
        writer.close()
    assert lane.answered == 1  # the split head was aiohttp's, the whole one the lane's


async def test_a_hit_that_arrives_as_aiohttp_finishes_an_answer_is_the_lanes(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp has written its answer whole, and its loop has not yet come round to wait
    for the next request: a hit that arrives in that event-loop turn is the lane's. A
    quick client's next request often arrives just then; left to aiohttp, so would every
    later one, and the connection would never come back to the lane."""
    proxy = await make_proxy(listen=True)
    lane = proxy.app[LANE]
    connections: list[server_module._Protocol] = []
    made = server_module._Protocol.connection_made

    def noting(protocol: server_module._Protocol, transport: asyncio.BaseTransport) -> None:
        connections.append(protocol)
        made(protocol, transport)

    monkeypatch.setattr(server_module._Protocol, "connection_made", noting)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(head())  # the miss: aiohttp's
        # The turn after aiohttp's handler ended (the proxy counts the answer as it
        # ends), before aiohttp's loop waits again (its `_waiter`, private, is set then).
        # The ready queue runs in order, so a step of this loop sees that turn.
        for _ in range(100_000):
            if connections:
                protocol = connections[0]
                if protocol._answered_by_aiohttp == 1 and protocol._waiter is None:
                    break
            await asyncio.sleep(0)
        else:
            pytest.fail("aiohttp did not answer the miss")
        protocol.data_received(head())  # the next request's bytes, read in that turn
        assert lane.answered == 1
        writer.write(head())
        answers = await read_until_hits(reader, 2)
    finally:
        writer.close()
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert answers.index(b"X-Cache: MISS") < answers.index(b"X-Cache: HIT")
    assert lane.answered == 2


async def test_each_request_on_a_connection_is_judged_by_its_own_key(
    make_proxy: ProxyFactory,
) -> None:
    """The lane keeps a connection's last caller key, and finds its caller again
    without a digest; a request with another key, or with the same key once the callers
    changed (SIGHUP), is judged afresh."""
    proxy = await make_proxy(listen=True)
    lane = proxy.app[LANE]
    globex = invoice_path("globex", "inv_9")  # the reporting caller may read it, billing not

    def ask(key: str) -> bytes:
        return head(path=globex).replace(BILLING_KEY.encode(), key.encode())

    wrong = REPORTING_KEY[:-1] + ("x" if REPORTING_KEY[-1] != "x" else "y")  # same length
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        statuses = []
        for key in (REPORTING_KEY, REPORTING_KEY, BILLING_KEY, wrong, REPORTING_KEY):
            writer.write(ask(key))
            statuses.append((await one_answer(reader))[0])
        assert statuses == [200, 200, 403, 401, 200]
        assert lane.answered == 2  # the second and the last: hits of a caller allowed
        proxy.app[CALLERS].replace(
            [CallerConfig(name="billing-service", key_sha256=(key_digest(BILLING_KEY),),
                          organizations=("globex",))]
        )  # fmt: skip
        writer.write(ask(REPORTING_KEY))
        assert (await one_answer(reader))[0] == 401
        writer.write(ask(BILLING_KEY))
        assert (await one_answer(reader))[0] == 200
        assert lane.answered == 3
    finally:
        writer.close()


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


class LlhttpReader(HeadReader):
    """A `HeadReader` that never reads a head itself: llhttp reads every byte."""

    def _plain_reading(self, head_bytes: bytes) -> Head | None:
        return None


def reading(head: Head) -> dict[str, object]:
    """Everything a `Head` says."""
    return {slot: getattr(head, slot) for slot in Head.__slots__}


def readings(heads: list[Head] | None) -> list[dict[str, object]] | None:
    return None if heads is None else [reading(head) for head in heads]


# Request heads close to valid: each is one the lane may read itself, but for the few
# parts (`ODD`) drawn from what it must leave to llhttp (or that llhttp refuses).
USUAL = {
    "method": st.sampled_from(["GET", "HEAD"]),
    "url": st.sampled_from([invoice_path(), invoice_path("a-b_C9", "x" * 64), "/", "/a?b=c&d"]),
    "version": st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    "name": st.sampled_from(
        ["Authorization", "If-None-Match", "X-Request-ID", "User-Agent", "Accept", "Keep-Alive"]
    ),
    "connection": st.sampled_from(["keep-alive", "close", "Keep-Alive", "CLOSE"]),
    "value": st.sampled_from(["", "127.0.0.1:8080", f"Bearer {BILLING_KEY}", '"x", W/"y"', "*"])
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    "blank": st.sampled_from(["", " "]),
    "colon": st.just(":"),
    "line end": st.just("\r\n"),
}
ODD = {
    "method": st.sampled_from(["POST", "get", "OPTIONS", "CONNECT", "GET "]),
    "url": st.sampled_from(
        [
            invoice_path("acme", "x" * 65), "/v1/organizations/acme/invoices/", "/healthz",
            "/v1/organizations/acme/invoices/a/b", "/a?b=%41", "/%7E", "/a#b", "/a;b",
            '/a"b{}', "/a b", "*", "http://proxy/", "//x", "/\x7f", "/\xff", "", "/a\tb",
        ]
    )
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map("/".__add__),
    "version": st.sampled_from(["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "http/1.1", "HTTP/1.1 "]),
    "name": st.sampled_from(
        [
            "Host", "Connection", "Proxy-Connection", "Content-Length", "Transfer-Encoding",
            "Expect", "Upgrade", "Content-Encoding", "Sec-WebSocket-Key1", "", "X Y", "X@",
            "X\t", " X", "\tX", "X(", "\xc4", "X\x00", "{}",
        ]
    )
    | st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=8),
    "connection": st.sampled_from(
        ["upgrade", "keep-alive, close", "close, keep-alive", "other", "keep-alive,", ""]
    ),
    "value": st.sampled_from(
        ["0", "chunked", "100-continue", "a\x01", "a\x7f", "\xff", "a\rb", "a\nb", "a\tb"]
    ),
    "blank": st.sampled_from(["  ", "\t", " \t", "\t "]),
    "colon": st.sampled_from([" :", ""]),
    "line end": st.sampled_from(["\n", "\r", "\r\r\n", " \r\n"]),
}  # fmt: skip
CASES = st.sampled_from([str, str.lower, str.upper, str.swapcase])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    odd = draw(st.sets(st.sampled_from([*USUAL, "no host", "twice"]), max_size=2))

    def part(kind: str) -> str:
        return draw(ODD[kind] if kind in odd and draw(st.booleans()) else USUAL[kind])

    fields = [] if "no host" in odd else ["Host: proxy\r\n"]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(CASES)(part("name"))
        value = part("connection") if name.lower().endswith("connection") else part("value")
        blanks = part("blank"), part("blank")
        fields.append(name + part("colon") + blanks[0] + value + blanks[1] + part("line end"))
    if draw(st.booleans()):
        name = draw(st.sampled_from(["Connection", "Connection", "Proxy-Connection"]))
        fields.append(draw(CASES)(name) + ": " + part("connection") + "\r\n")
    if "twice" in odd and fields:
        fields.append(draw(st.sampled_from(fields)))
    request_line = f"{part('method')} {part('url')} {part('version')}{part('line end')}"
    return (request_line + "".join(draw(st.permutations(fields))) + "\r\n").encode("latin-1")


# The bench's head (bench/hit_parts.py), the common head of a hit.
COMMON_HEAD = (
    b"GET /v1/organizations/acme/invoices/hot-000 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Authorization: Bearer " + b"k" * 43 + b"\r\n\r\n"
)
LIMITS = st.sampled_from([(8190, 64), (8190, 4), (120, 64)])  # `[server]` head bytes, headers


@pytest.mark.parametrize(
    "head_bytes",
    [
        COMMON_HEAD,
        COMMON_HEAD.replace(b"GET", b"HEAD"),
        head(version="1.0", extra="Connection: keep-alive\r\n"),
        head(extra='If-None-Match: "x"\r\nX-Request-ID: id-1\r\nUser-Agent: curl/8\r\n'),
        head(path="/healthz?verbose"),
    ],
)
def test_the_lane_reads_a_common_head_itself_as_llhttp_does(head_bytes: bytes) -> None:
    """The test below is not vacuous: `_plain_reading` is sure of the common heads."""
    assert HeadReader(8190, 64)._plain_reading(head_bytes) is not None
    heads = HeadReader(8190, 64).read(head_bytes)
    assert heads is not None
    assert readings(heads) == readings(LlhttpReader(8190, 64).read(head_bytes))


@given(head_bytes=request_heads(), limits=LIMITS)
@example(head_bytes=head(version="1.0", extra="Connection: close\r\n"), limits=(8190, 64))
@example(head_bytes=head(extra="Proxy-Connection: close\r\n"), limits=(8190, 64))
@example(head_bytes=head(extra="Connection: Keep-Alive\t\r\n"), limits=(8190, 64))
def test_a_head_the_lane_reads_itself_is_read_as_llhttp_reads_it(
    head_bytes: bytes, limits: tuple[int, int]
) -> None:
    """Whenever `_plain_reading` is sure of a head, llhttp reads it the same, and clean."""
    head_bytes = head_bytes[: head_bytes.find(b"\r\n\r\n") + 4]  # it ends at the blank line
    heads = HeadReader(*limits).read(head_bytes)
    assert readings(heads) == readings(LlhttpReader(*limits).read(head_bytes))
    plain = HeadReader(*limits)._plain_reading(head_bytes)
    if plain is not None:
        plain.end = len(head_bytes)
        assert [reading(plain)] == readings(heads)


def with_block_of(first: bytes, others: list[bytes]) -> list[bytes]:
    """`first` (to its blank line), then each of `others`' request lines (to their first
    CRLF) before `first`'s header block: heads a client sends on one connection."""
    first = first[: first.find(b"\r\n\r\n") + 4]
    block = first[first.find(b"\r\n") + 2 :]
    return [first, *(other[: other.find(b"\r\n") + 2] + block for other in others)]


@pytest.mark.parametrize(
    "lines",
    [
        [b"GET /v1/organizations/acme/invoices/hot-001 HTTP/1.1\r\n"],
        [b"HEAD /v1/organizations/globex/invoices/inv_2 HTTP/1.0\r\n", b"GET / HTTP/1.1\r\n"],
        [b"POST /v1/organizations/acme/invoices/a HTTP/1.1\r\n", b"GET /a b HTTP/1.1\r\n"],
    ],
)
def test_a_head_with_the_last_heads_header_block_is_read_by_its_request_line(
    lines: list[bytes],
) -> None:
    """The lane reads only the request line of a head whose header block it read last
    (`_block`), and reads it as llhttp does."""
    heads = with_block_of(COMMON_HEAD, lines)
    reader, llhttp = HeadReader(8190, 64), LlhttpReader(8190, 64)
    assert reader.read(heads[0]) is not None
    assert reader._block == COMMON_HEAD[COMMON_HEAD.find(b"\r\n") + 2 :]
    for head_bytes in heads:
        assert readings(reader.read(head_bytes)) == readings(llhttp.read(head_bytes))


@given(
    first=request_heads(),
    others=st.lists(request_heads(), min_size=1, max_size=4),
    limits=LIMITS,
)
def test_heads_that_share_a_header_block_are_read_as_llhttp_reads_them(
    first: bytes, others: list[bytes], limits: tuple[int, int]
) -> None:
    """Heads with one header block and any request lines, read by one reader (which
    reads only the request line after the first), are read as llhttp reads them, and
    each as a reader that never saw the others reads it."""
    reader, llhttp = HeadReader(*limits), LlhttpReader(*limits)
    for head_bytes in with_block_of(first, others):
        alone = HeadReader(*limits)._plain_reading(head_bytes)
        plain = reader._plain_reading(head_bytes)
        assert (None if plain is None else reading(plain)) == (
            None if alone is None else reading(alone)
        )
    reader = HeadReader(*limits)
    for head_bytes in with_block_of(first, others):
        got = reader.read(head_bytes)
        assert readings(got) == readings(llhttp.read(head_bytes))
        if got is None:
            return


@given(
    heads=st.lists(request_heads(), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=3),
    limits=LIMITS,
)
@example(heads=[head(extra="Connection: close\r\n"), head()], cuts=[], limits=(8190, 64))
def test_the_heads_of_a_stream_are_read_the_same_with_or_without_the_lanes_own_reading(
    heads: list[bytes], cuts: list[int], limits: tuple[int, int]
) -> None:
    """`read`, read by read, gives the same heads (or None) as llhttp alone."""
    stream = b"".join(heads)
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(stream)), len(stream)]
    reader, llhttp = HeadReader(*limits), LlhttpReader(*limits)
    for start, end in itertools.pairwise(bounds):
        got = reader.read(stream[start:end])
        assert readings(got) == readings(llhttp.read(stream[start:end]))
        if got is None:
            return
