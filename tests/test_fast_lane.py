"""Issue 14's hit fast lane against the aiohttp path it short-cuts: the same bytes in,
the same answers and the same upstream calls out.

`server.fast_lane = true` answers fresh cache hits on the connection itself and hands
everything else to aiohttp in order; with `false`, everything goes through aiohttp. Here
two proxies on the real listener, one each way, each with a PlanetScale stand-in of its
own and both on one wall clock that stands still, get the same byte streams of pipelined
requests: hits (by key and by remembered JWT), misses (slow ones too), errors, malformed
heads, bodies, chunked encodings, duplicate and folded headers, HTTP/1.0, `Connection:
close`, a smuggling corpus, and moves of the clock between reads (an open invoice's
max-age, staleness, a JWT's expiry); a few fixed streams also go over HTTPS with
client-certificate callers. Their answers must be equal, byte for byte but for the
values of `Date` and of `X-Request-ID`s the proxy made up (a caller's own id comes back
as it was sent); so must the moment the server closes the connection (after which
answer), the upstream calls, and the metrics. Both proxies run in the test's own event
loop, started afresh for each stream.

Read boundaries. aiohttp answers some streams by how they were read: a read that holds
a complete request and then a malformed one is answered only with the 400 (see
proxy/server.py), and an unknown method is told from junk by the bytes of the last
read. The lane mirrors aiohttp for the same reads, so both proxies must be given the
same reads: each segment of a stream is written to both and drained, and the loop is
then left to run (`READ_GAP_S`) long enough for both servers to read it before the
next segment is written. On 127.0.0.1 a drained write is in the peer's socket buffer,
and one turn of the loop (its select) hands it to the protocol. Some writes are
delayed longer (`PAUSES_S`: a few milliseconds, bounded), as a slow client's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from proxy import app as proxy_app
from proxy.app import METRICS
from proxy.auth import key_digest
from proxy.config import parse_config
from proxy.standin import Behaviour, StandIn, make_invoice, start

from .certificates import issue, make_ca
from .helpers import (
    BILLING_KEY,
    METERED_KEY,
    REPORTING_KEY,
    UPSTREAM_HEADER,
    FakeClock,
    Proxy,
    ProxyFactory,
    Upstream,
    bearer,
    config_dict,
    get,
    invoice_path,
    one_answer,
    running_proxy,
    wait_until,
)

ORG = "acme"
FORBIDDEN = "globex"  # billing-service may not read it; reporting may (a miss)
WARM = ("inv_2025_01", "open-2025_02")  # fetched by both before each stream: hits
NEW = ("inv_2024_12", "open-2024_11")  # not fetched before: a miss first, then hits
# PlanetScale answers the new invoices this late: the requests behind such a miss, read
# while it is under way, wait for it (in order, whoever answers them).
NEW_DELAY_S = 0.02
MISSING = "missing_1"  # the stand-in has no such invoice: 404 (then a cached 404)
WARM_MISSING = "missing_warm"  # a 404 fetched before the stream: cached
BAD_NAMES = ("a.b", "x" * 65)  # not SPEC's pattern: 400

CALLERS = [
    {"name": "billing-service", "key_sha256": [key_digest(BILLING_KEY)], "organizations": [ORG]},
    {"name": "reporting", "key_sha256": [key_digest(REPORTING_KEY)], "organizations": ["*"]},
    # Two requests, then 429: a refill takes 1000 s, so none comes during a test.
    {
        "name": "metered",
        "key_sha256": [key_digest(METERED_KEY)],
        "organizations": [ORG],
        "rate_per_s": 0.001,
        "burst": 2,
    },
    # By JWT: tokens the test signs for its own JWKS endpoint. A token verified once is
    # remembered until its exp, and a remembered one is what the lane reads.
    {"name": "jwt-service", "jwt_subjects": ["jwt-service"], "organizations": [ORG]},
]
ISSUER = "https://issuer.test"  # never resolved: jwks_url is given
AUDIENCE = "invoice-proxy"
# The proxies' wall clock stands still at the time of this import. (PyJWT checks exp and
# iat against the real time; the remembered tokens expire by the proxy's clock.)
NOW = int(time.time())
JWT_CLAIMS: dict[str, dict[str, Any]] = {
    "jwt": {},
    "jwt_expired": {"iat": NOW - 7200, "exp": NOW - 3600},  # 401
    "jwt_audience": {"aud": ["another-service"]},  # 401
    "jwt_stranger": {"sub": "someone-else"},  # 401
}
# The Authorization lines each kind of caller sends (JWT callers: `authorization`).
AUTHORIZATION = {
    "billing": f"Authorization: Bearer {BILLING_KEY}\r\n",
    "reporting": f"Authorization: Bearer {REPORTING_KEY}\r\n",
    "metered": f"Authorization: Bearer {METERED_KEY}\r\n",
    "stranger": "Authorization: Bearer stranger-KEY-0123456789abcdefghijklmnopq\r\n",  # 401
    "nobody": "",  # 401
    "two": f"Authorization: Bearer {BILLING_KEY}\r\nAuthorization: Bearer {REPORTING_KEY}\r\n",
    "basic": "Authorization: Basic YmlsbGluZzpwdw==\r\n",  # 401
    "lower_scheme": f"Authorization: bearer {BILLING_KEY}\r\n",
    "lower_name": f"authorization: Bearer {BILLING_KEY}\r\n",
    "tight": f"Authorization:Bearer {BILLING_KEY}\r\n",
    "trailing_blanks": f"Authorization: Bearer {BILLING_KEY} \t\r\n",
    "two_spaces": f"Authorization: Bearer  {BILLING_KEY}\r\n",
}


@functools.cache
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# Over TLS, a client certificate names this caller (a request without Authorization).
SPIFFE = "spiffe://cluster.local/ns/billing/sa/billing-service"
CERTIFICATE_CALLER = {
    "name": "spiffe-billing",
    "organizations": [ORG],
    "certificate_uris": [SPIFFE],
}


@functools.cache
def authorization(caller: str) -> str:
    """The caller's Authorization lines."""
    if caller == "certificate":
        return ""
    if caller not in JWT_CLAIMS:
        return AUTHORIZATION[caller]
    claims = {"iss": ISSUER, "aud": [AUDIENCE], "sub": "jwt-service", "iat": NOW - 60}
    claims |= {"exp": NOW + 3600, **JWT_CLAIMS[caller]}
    token = jwt.encode(claims, signing_key(), "RS256", headers={"kid": "k1"})
    return f"Authorization: Bearer {token}\r\n"


@contextlib.asynccontextmanager
async def serving_jwks() -> AsyncIterator[str]:
    """The JWKS endpoint of the test's signing key, on 127.0.0.1; its URL."""
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing_key().public_key(), as_dict=True)
    jwks = {"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}

    async def handle(_request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app = web.Application()
    app.router.add_get("/jwks", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"
    finally:
        await runner.cleanup()


def issuer(jwks_url: str) -> dict[str, Any]:
    return {
        "name": "test",
        "issuer": ISSUER,
        "jwks_url": jwks_url,
        "audiences": [AUDIENCE],
        "leeway_s": 0.0,
        "timeout_s": 2.0,
    }


TARGETS = {
    "path": "{path}",
    "query": "{path}?x=1",
    "query_pairs": "{path}?a=1&b=2",
    "query_empty": "{path}?",
    "absolute": "http://proxy{path}",  # absolute-form: aiohttp routes it by its path
    "slash": "{path}/",
    "double": "/{path}",
    "encoded": "{path_encoded}",  # %61cme: the same organization, percent-encoded
    "dots": "/v1/organizations/{org}/invoices/../invoices/{invoice}",
}


def fillers(count: int) -> str:
    return "".join(f"X-Filler-{i}: {i}\r\n" for i in range(count))


HEADERS = {
    "id": "X-Request-ID: trace-1\r\n",  # echoed as sent
    "odd_id": "X-Request-ID: not an id\r\n",  # not SPEC's shape: one is made up
    "id_blanks": "X-Request-ID: trace-2 \t\r\n",
    "id_tight": "X-Request-ID:trace-3\r\n",
    "id_64": f"X-Request-ID: {'t' * 64}\r\n",
    "id_65": f"X-Request-ID: {'t' * 65}\r\n",  # too long: one is made up
    "two_ids": "X-Request-ID: trace-4\r\nX-Request-ID: trace-5\r\n",
    "match": "If-None-Match: {etag}\r\n",  # 304 for a cached 200
    "weak": "If-None-Match: W/{etag}\r\n",
    "any": "If-None-Match: *\r\n",
    "other": 'If-None-Match: "0123"\r\n',
    "list": 'If-None-Match: "0123", {etag}\r\n',
    "close": "Connection: close\r\n",
    "keep": "Connection: keep-alive\r\n",
    "keep_case": "Connection: Keep-Alive\r\n",
    "close_case": "Connection: CLOSE\r\n",
    "keep_and_close": "Connection: keep-alive, close\r\n",
    "continue": "Expect: 100-continue\r\n",
    "expect": "Expect: something-else\r\n",  # 417
    "websocket": (
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    ),
    "h2c": "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n",
    "host": "Host: another\r\n",  # a second Host
    "folded": "X-Folded: first\r\n second\r\n",  # obs-fold
    "space": "X-Spaced : 1\r\n",  # a space before the colon
    "nul": "X-Nul: a\x00b\r\n",
    "lf": "X-Bare: lf\n",  # a line ended by LF alone
    "big": f"X-Big: {'b' * 9000}\r\n",  # beyond max_field_size (8190)
    "big_edge": f"X-Big: {'b' * 8100}\r\n",  # near it
    "many": fillers(70),  # beyond max_headers (64)
    "many_edge": fillers(62),  # with Host and Authorization: 64
    "many_over": fillers(63),
    "empty_length": "Content-Length: 0\r\n",
    "accept": "Accept: application/json\r\nAccept-Encoding: gzip, br\r\n",
}
# A request a body holds: if it were taken for one, billing-service would be answered a
# 403 (an organization it may not read) that the proxy without the lane never sends.
INNER = (
    f"GET /v1/organizations/{FORBIDDEN}/invoices/inv_2025_01 HTTP/1.1\r\nHost: proxy\r\n"
    f"Authorization: Bearer {BILLING_KEY}\r\n\r\n"
)
INNER_HIT = (
    f"GET /v1/organizations/{ORG}/invoices/{WARM[0]} HTTP/1.1\r\nHost: proxy\r\n"
    f"Authorization: Bearer {REPORTING_KEY}\r\n\r\n"
)
BODIES = {
    "length": ("Content-Length: 2\r\n", "{}"),
    "chunked": ("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n\r\n"),
    "no_chunks": ("Transfer-Encoding: chunked\r\n", "0\r\n\r\n"),
    # The smuggling corpus: lengths and encodings that disagree, and bodies that are
    # requests themselves.
    "length_and_chunked": ("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
    "chunked_and_length": ("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", "0\r\n\r\n"),
    "two_lengths": ("Content-Length: 0\r\nContent-Length: 5\r\n", "hello"),
    "same_two_lengths": ("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
    "signed_length": ("Content-Length: +2\r\n", "{}"),
    "chunked_twice": ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
    "gzip_chunked": ("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
    "identity": ("Transfer-Encoding: identity\r\n", ""),
    "request_in_length": (f"Content-Length: {len(INNER)}\r\n", INNER),
    "request_in_chunks": (
        "Transfer-Encoding: chunked\r\n",
        f"{len(INNER):x}\r\n{INNER}\r\n0\r\n\r\n",
    ),
    "hit_in_length": (f"Content-Length: {len(INNER_HIT)}\r\n", INNER_HIT),
    "length_short_of_a_request": ("Content-Length: 20\r\n", ""),  # the next request is its body
}
RAW = {
    # Heads llhttp refuses, requests aiohttp refuses
    "junk": b"HELLO\r\n\r\n",
    "nul": b"GET /\x00 HTTP/1.1\r\n\r\n",
    "tls": b"\x16\x03\x01\x02\x00\x01\r\n\r\n",
    "version": b"GET / HTTP/9.9\r\nHost: proxy\r\n\r\n",
    "method": f"FOO {invoice_path()} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode(),
    "lower_method": f"get {invoice_path()} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode(),
    "connect": b"CONNECT proxy:443 HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "crlf": b"\r\n",  # an empty line between requests
    "lf_only": (
        f"GET {invoice_path()} HTTP/1.1\nHost: proxy\nAuthorization: Bearer {BILLING_KEY}\n\n"
    ).encode(),
    "no_version": f"GET {invoice_path()}\r\nHost: proxy\r\n\r\n".encode(),
    # and odd requests that are still valid.
    "no_host": (
        f"GET {invoice_path()} HTTP/1.1\r\nAuthorization: Bearer {BILLING_KEY}\r\n\r\n"
    ).encode(),
    "http10_no_host": (
        f"GET {invoice_path()} HTTP/1.0\r\nAuthorization: Bearer {BILLING_KEY}\r\n\r\n"
    ).encode(),
    "tabs": (
        f"GET {invoice_path()} HTTP/1.1\r\nHost:\tproxy\r\nAuthorization: Bearer {BILLING_KEY}"
        "\r\nX-Tab: a\tb\r\n\r\n"
    ).encode(),
}
# The generated X-Request-ID: a random prefix and a counter, 16 hex digits each.
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
READ_GAP_S = 0.002  # after each segment: long enough for both servers to read it
PAUSES_S = (READ_GAP_S, READ_GAP_S, READ_GAP_S, 0.006, 0.02)
QUIET_S = 0.2  # no byte for this long, and no upstream call open: no answer is coming
SETTLE_LIMIT_S = 6.0


def etag_of(invoice_id: str) -> str:
    """The ETag of the stand-in's invoice: the cache's rule, written out again."""
    body = json.dumps(make_invoice(invoice_id)).encode()
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True)
class Ask:
    """One request of a stream, by the names of its parts (its bytes: `render`)."""

    method: str = "GET"
    target: str = "path"
    org: str = ORG
    invoice: str = WARM[0]
    caller: str = "billing"
    version: str = "1.1"
    headers: tuple[str, ...] = ()
    body: str = ""

    def render(self) -> bytes:
        path = invoice_path(self.org, self.invoice)
        target = TARGETS[self.target].format(
            path=path,
            path_encoded=path.replace("/organizations/a", "/organizations/%61", 1),
            org=self.org,
            invoice=self.invoice,
        )
        lines = [f"{self.method} {target} HTTP/{self.version}\r\n", "Host: proxy\r\n"]
        lines.append(authorization(self.caller))
        lines += [HEADERS[name].format(etag=etag_of(self.invoice)) for name in self.headers]
        body_headers, body = BODIES[self.body] if self.body else ("", "")
        return "".join([*lines, body_headers, "\r\n", body]).encode("latin-1")


@dataclass(frozen=True)
class Raw:
    """Bytes as they are (`RAW`)."""

    name: str

    def render(self) -> bytes:
        return RAW[self.name]


@dataclass(frozen=True)
class Tick:
    """The proxies' wall clock moves on, once both have answered all that came before."""

    seconds: float

    def render(self) -> bytes:
        return b""


Element = Ask | Raw | Tick
HIT = Ask()
LAST_HIT = Ask(caller="reporting", headers=("close",))  # ends a stream: the server closes


@dataclass(frozen=True)
class Stream:
    """Requests as one byte stream, cut into segments (each written as one read), and the
    pause after each segment."""

    elements: tuple[Element, ...]
    cuts: tuple[int, ...] = ()
    pauses: tuple[float, ...] = ()

    def plan(self) -> tuple[float, list[tuple[bytes, float]]]:
        """The seconds the clock moves on first, and each segment with the seconds it
        moves on after it (a tick is a cut)."""
        data, ticks = b"", dict[int, float]()
        for element in self.elements:
            if isinstance(element, Tick):
                ticks[len(data)] = ticks.get(len(data), 0.0) + element.seconds
            data += element.render()
        first = ticks.pop(0, 0.0)
        cuts = {c for c in (*self.cuts, *ticks) if 0 < c < len(data)}
        bounds = [0, *sorted(cuts), len(data)]
        return first, [(data[a:b], ticks.get(b, 0.0)) for a, b in itertools.pairwise(bounds)]

    def segments(self) -> list[bytes]:
        return [segment for segment, _ in self.plan()[1]]

    def pause(self, i: int) -> float:
        return self.pauses[i] if i < len(self.pauses) else READ_GAP_S


def weighted(common: list[Any], rare: list[Any], weight: int = 4) -> st.SearchStrategy[Any]:
    """The common values `weight` times as often as each rare one (the first shrinks best)."""
    return st.sampled_from(common * weight + rare)


def one_of_weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """`st.one_of` with weights (it draws each distinct branch equally often)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


# Most headers a caller sends leave a request as it was; these refuse it, close the
# connection after it, or change how it is read.
HOSTILE = ("close", "close_case", "keep_and_close", "expect", "host")
HOSTILE += ("folded", "space", "nul", "lf", "big", "big_edge", "many", "many_edge", "many_over")
BENIGN = [name for name in HEADERS if name not in HOSTILE]
asks = st.builds(
    Ask,
    method=weighted(["GET"], ["HEAD", "HEAD", "POST", "DELETE", "OPTIONS"], 16),
    target=weighted(["path"], [t for t in TARGETS if t != "path"], 30),
    org=weighted([ORG], [FORBIDDEN, "bad.org"], 16),
    invoice=weighted(list(WARM), [*NEW, *NEW, MISSING, WARM_MISSING, *BAD_NAMES], 8),
    caller=weighted(
        ["billing", "billing", "reporting", "jwt"],
        [c for c in [*AUTHORIZATION, *JWT_CLAIMS] if c not in ("billing", "jwt")],
        4,
    ),
    version=weighted(["1.1"], ["1.0"], 20),
    headers=one_of_weighted(
        (6, st.just(())),
        (3, st.lists(st.sampled_from(BENIGN), min_size=1, max_size=2).map(tuple)),
        (1, st.lists(st.sampled_from(list(HEADERS)), min_size=1, max_size=2).map(tuple)),
    ),
    body=weighted([""], list(BODIES), 120),
)
# Plain hits, what the lane is for, are common; a request that closes the connection
# ends what a stream can show: those are rarer.
plain_hits = st.sampled_from(
    [HIT, Ask(invoice=WARM[1]), Ask(caller="jwt"), Ask(method="HEAD"), Ask(invoice=NEW[0])]
)
raws = st.builds(Raw, st.sampled_from(list(RAW)))
# Past an open invoice's max-age (300 s), past the JWT's exp (an hour).
ticks = st.builds(Tick, st.sampled_from([1.0, 150.0, 299.0, 301.0, 4000.0]))
elements = one_of_weighted((5, plain_hits), (8, asks), (1, raws), (1, ticks))
# What well-behaved clients send: GET or HEAD, no body, each header once, in plain bytes.
# Answered or refused, such requests leave a connection open (but HTTP/1.0), and a
# stream of them interleaves hits with misses and refusals all along.
PLAIN_HEADERS = ["id", "odd_id", "id_blanks", "id_tight", "id_64", "id_65", "match", "weak"]
PLAIN_HEADERS += ["any", "other", "list", "keep", "keep_case", "accept"]
ODD_CALLERS = [c for c in [*AUTHORIZATION, *JWT_CLAIMS] if c not in ("billing", "jwt", "two")]
plain_asks = st.builds(
    Ask,
    method=weighted(["GET"], ["HEAD"], 4),
    target=weighted(["path"], ["query", "query_pairs", "query_empty", "slash", "dots"], 8),
    org=weighted([ORG], [FORBIDDEN, "bad.org"], 8),
    invoice=weighted(list(WARM), [*NEW, *NEW, MISSING, WARM_MISSING, *BAD_NAMES], 4),
    caller=weighted(["billing", "billing", "reporting", "jwt"], ODD_CALLERS, 3),
    version=weighted(["1.1"], ["1.0"], 30),
    headers=st.lists(st.sampled_from(PLAIN_HEADERS), max_size=2, unique=True).map(tuple),
)
plain_elements = one_of_weighted((2, plain_hits), (5, plain_asks), (1, ticks))


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """Up to 8 requests (half the streams plain ones only, see `plain_asks`); cut between
    requests (a read each) or anywhere, with pauses."""
    plain = draw(st.booleans())
    parts = draw(st.lists(plain_elements if plain else elements, min_size=1, max_size=8))
    if draw(st.booleans()):
        parts.append(LAST_HIT)
    ends = list(itertools.accumulate(len(part.render()) for part in parts))
    cuts = [end for end in ends[:-1] if draw(st.booleans())]
    cuts += draw(st.lists(st.integers(1, max(1, ends[-1] - 1)), max_size=4))
    pauses = draw(st.lists(st.sampled_from(PAUSES_S), min_size=len(cuts), max_size=len(cuts)))
    return Stream(tuple(parts), tuple(cuts), tuple(pauses))


# --- what a client sees ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One response: its status line, its header lines in order, its body."""

    status_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)


def answers(data: bytes) -> tuple[list[Answer], bytes]:
    """The responses in `data` with Date and made-up X-Request-ID values normalised, and
    any bytes after the last whole head.

    A body is `Content-Length` bytes, unless the next bytes start another response or
    none follow (the answer to a HEAD) or the status has none (1xx, 204, 304).
    """
    found, rest = [], data
    while (end := rest.find(b"\r\n\r\n")) >= 0:
        status_line, *lines = rest[:end].decode("latin-1").split("\r\n")
        rest = rest[end + 4 :]
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            value = value.strip()
            if name.lower() == "date":
                value = "<date>"
            elif name.lower() == "x-request-id" and GENERATED_ID.fullmatch(value):
                value = "<made up>"
            headers.append((name, value))
        answer = Answer(status_line, tuple(headers), b"")
        status = status_line.split(" ")[1] if " " in status_line else ""
        no_body = status.startswith("1") or status in ("204", "304")
        if not no_body and not rest.startswith(b"HTTP/1."):
            length = int(answer.header("content-length") or 0)
            answer = Answer(status_line, tuple(headers), rest[:length])
            rest = rest[length:]
        found.append(answer)
    return found, rest


@dataclass
class Peer:
    """The client end of one connection: all it has read, and whether the server closed."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    data: bytearray = field(default_factory=bytearray)
    closed: bool = False
    last_byte: float = field(default_factory=time.monotonic)

    async def read_all(self) -> None:
        try:
            while chunk := await self.reader.read(65536):
                self.data += chunk
                self.last_byte = time.monotonic()
        except ConnectionError:
            pass  # a reset: closed too (the server closed with bytes of ours unread)
        self.closed = True

    async def send(self, segment: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(segment)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()


async def settled(
    peers: list[Peer], standins: list[StandIn], since: float, quiet_s: float, polls: int
) -> None:
    """Wait until no answer is coming on any connection: the server closed it, or for
    `quiet_s` since `since` no byte came and no upstream call was open."""
    quiet = [0] * len(peers)
    deadline = since + SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        now = time.monotonic()
        for i, (peer, standin) in enumerate(zip(peers, standins, strict=True)):
            idle = now - max(peer.last_byte, since) >= quiet_s and not standin.stats.in_flight
            # Counted in turns of the loop too: a descheduled process is not quiet.
            quiet[i] = quiet[i] + 1 if idle else 0
        if all(peer.closed or n >= polls for peer, n in zip(peers, quiet, strict=True)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no end to the answers within {SETTLE_LIMIT_S} s")


async def exchange_both(
    ports: list[int],
    stream: Stream,
    standins: list[StandIn],
    clock: FakeClock,
    client_tls: ssl.SSLContext | None = None,
) -> list[tuple[list[Answer], bytes, bool]]:
    """Write the stream to each port in lockstep, segment by segment, moving the clock on
    where it ticks; read each until the server closes or nothing more is coming. Each
    port's answers, leftover bytes, and whether the server closed the connection."""
    peers = [
        Peer(*await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)) for port in ports
    ]
    readers = [asyncio.create_task(peer.read_all()) for peer in peers]
    try:
        first, plan = stream.plan()
        clock.advance(first)
        for i, (segment, tick) in enumerate(plan):
            await asyncio.gather(*(peer.send(segment) for peer in peers))
            await asyncio.sleep(stream.pause(i))
            if tick:
                await settled(peers, standins, time.monotonic(), 0.05, 5)
                clock.advance(tick)
        await settled(peers, standins, time.monotonic(), QUIET_S, 10)
        closed = [peer.closed for peer in peers]  # by the server: ours comes next
    finally:
        for peer in peers:
            peer.writer.close()
        await asyncio.gather(*readers)
        for peer in peers:
            with contextlib.suppress(ConnectionError):
                await peer.writer.wait_closed()
    return [(*answers(bytes(peer.data)), c) for peer, c in zip(peers, closed, strict=True)]


# --- the two proxies -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def standing_in() -> AsyncIterator[tuple[StandIn, str]]:
    """A PlanetScale stand-in of its own, and its base URL."""
    standin = StandIn([UPSTREAM_HEADER])
    for invoice_id in NEW:
        standin.behave(invoice_id, Behaviour("slow", delay_s=NEW_DELAY_S))
    runner, port = await start(standin)
    try:
        yield standin, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class Tls:
    """HTTPS for both proxies: their `[server.tls]` (client certificates allowed), and the
    client's context (with the certificate of `CERTIFICATE_CALLER`), or one without."""

    server: dict[str, str]
    client: ssl.SSLContext
    anonymous: ssl.SSLContext


def lane_config(
    base_url: str, credential_file: Path, jwks_url: str, *, lane: bool, tls: Tls | None = None
) -> Any:
    server: dict[str, Any] = {"fast_lane": lane}
    callers = CALLERS
    if tls is not None:
        server["tls"] = tls.server
        callers = [*CALLERS, CERTIFICATE_CALLER]
    data = config_dict(
        base_url, credential_file, server=server, callers=callers, issuers=[issuer(jwks_url)]
    )
    return parse_config(data)


def lane_answered(app: Any) -> int | None:
    """Requests the lane answered itself (`app[proxy.app.LANE].answered`); None while the
    lane is not exposed."""
    key = getattr(proxy_app, "LANE", None)
    if key is None or key not in app:
        return None
    return int(app[key].answered)


# Not compared: times (histogram sums and buckets), and the cache's memory, which with
# the lane counts each entry's prepared answer bytes too.
UNCOMPARED = ("_sum", "_bucket", "_created")


def counted(listener: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the service's own metrics but times and the cache's bytes."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in listener.app[METRICS].registry.collect()
        for sample in family.samples
        if sample.name.startswith("invoice_proxy_")
        and sample.name != "invoice_proxy_cache_bytes"
        and not sample.name.endswith(UNCOMPARED)
    }


WARM_UP = (
    *(Ask(invoice=invoice_id) for invoice_id in (*WARM, WARM_MISSING)),
    Ask(caller="jwt", headers=("close",)),
)


async def warm(port: int, client_tls: ssl.SSLContext | None) -> None:
    """Fetch the invoices the streams find cached (check the ETags `etag_of` computes), and
    show the JWT caller's token once (remembered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
    try:
        writer.write(b"".join(ask.render() for ask in WARM_UP))
        async with asyncio.timeout(10):
            found, rest = answers(await reader.read())  # to the end: the last one closes
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    statuses = [answer.status_line for answer in found]
    assert statuses == ["HTTP/1.1 200 OK"] * 2 + ["HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK"]
    assert [found[0].header("etag"), found[1].header("etag")] == [etag_of(i) for i in WARM]
    assert not rest


def briefly(found: list[Answer]) -> list[str]:
    return [f"{a.status_line[9:]} {a.header('x-cache') or ''}".strip() for a in found]


@dataclass
class Run:
    """What one stream showed: the lane's count and the hits the lane-on proxy answered."""

    lane_answered: int | None
    hits: int


async def compare(
    stream: Stream, credential_file: Path, jwks_url: str, tls: Tls | None = None
) -> Run:
    """The stream through a proxy with the lane and one without: equal answers, closes,
    upstream calls and metrics. What the lane did."""
    clock = FakeClock(NOW)  # both proxies: the same wall time, which stands still
    client_tls = tls.client if tls is not None else None
    async with AsyncExitStack() as stack:
        standins, proxies = [], []
        for lane in (True, False):
            standin, base_url = await stack.enter_async_context(standing_in())
            config = lane_config(base_url, credential_file, jwks_url, lane=lane, tls=tls)
            listener = running_proxy(config, clock=clock, listen=True)
            proxies.append(await stack.enter_async_context(listener))
            standins.append(standin)
        for listener in proxies:
            await warm(listener.port, client_tls)
        warmed = lane_answered(proxies[0].app) or 0  # the warm-up's JWT hit, maybe
        ports = [p.port for p in proxies]
        seen = await exchange_both(ports, stream, standins, clock, client_tls)
        (on, on_rest, on_closed), (off, off_rest, off_closed) = seen
        assert on == off, (
            f"the answers differ:\n lane on:  {briefly(on)}\n lane off: {briefly(off)}"
        )
        assert on_rest == off_rest
        assert on_closed == off_closed, "one server closed the connection, the other did not"
        assert Counter(standins[0].stats.paths) == Counter(standins[1].stats.paths)
        assert counted(proxies[0]) == counted(proxies[1]), "the metrics differ"
        assert lane_answered(proxies[1].app) in (None, 0), "a lane off answered"
        answered = lane_answered(proxies[0].app)
        hits = sum(answer.header("x-cache") == "HIT" for answer in on)
        if answered is not None:
            answered -= warmed
            assert answered <= hits, "the lane answered more than the hits"
        return Run(answered, hits)


CUT_AFTER_MISS = (
    len(Ask(invoice=NEW[1]).render()),
    len(Ask(invoice=NEW[1]).render() + HIT.render()),
)
DIFFERENTIAL = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same streams every run (and no example database)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_lane_answers_every_stream_as_aiohttp_alone_does(credential_file: Path) -> None:
    """Pipelined, cut, delayed streams: equal answers, closes, upstream calls, metrics."""
    runs: list[Run] = []

    @DIFFERENTIAL
    @given(stream=streams())
    # The smuggling corpus, whatever the generator draws.
    @example(Stream((Ask(body="length_and_chunked"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="chunked_and_length"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="two_lengths"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="same_two_lengths"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="request_in_length"), HIT, LAST_HIT)))
    @example(Stream((Ask(method="POST", body="request_in_length"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="request_in_chunks"), HIT, LAST_HIT), cuts=(60, 200)))
    @example(Stream((Ask(method="POST", body="hit_in_length"), HIT, LAST_HIT)))
    @example(Stream((Ask(body="length_short_of_a_request"), HIT, HIT, LAST_HIT)))
    # aiohttp's chunk-dependent quirk: a hit then junk in one read (only the 400), and
    # the same bytes in two reads (the hit, then the 400).
    @example(Stream((HIT, Raw("nul"))))
    @example(Stream((HIT, Raw("nul")), cuts=(len(HIT.render()),)))
    @example(Stream((HIT, Raw("method"), HIT)))
    # An Upgrade aiohttp does not act on (no handler takes it): answered, kept open.
    @example(Stream((Ask(headers=("websocket",)), HIT)))
    @example(Stream((HIT, Ask(headers=("h2c",))), cuts=(len(HIT.render()),)))
    # Hits behind a miss, in one read or read while the miss is under way: in order.
    @example(Stream((Ask(invoice=NEW[0]), Ask(invoice=NEW[0]), HIT, LAST_HIT)))
    @example(Stream((Ask(invoice=NEW[1]), HIT, HIT), cuts=CUT_AFTER_MISS))
    # More pipelined requests in one read than aiohttp queues (32): it stops parsing.
    @example(Stream((HIT,) * 40 + (LAST_HIT,)))
    # A caller over its rate (two, then 429), and HTTP/1.0 answers (304, keep-alive).
    @example(Stream((Ask(caller="metered"),) * 4, cuts=(100, 200, 300)))
    @example(Stream((Ask(version="1.0", headers=("keep", "match")), HIT), cuts=(150,)))
    # The clock moves on: an open invoice's max-age counts down, then it is stale (a miss
    # again); the remembered JWT expires by the proxy's clock.
    @example(Stream((Ask(invoice=WARM[1]), Tick(150), Ask(invoice=WARM[1], headers=("match",)))))
    @example(Stream((Ask(invoice=WARM[1]), Tick(301), Ask(invoice=WARM[1]), Ask(invoice=WARM[1]))))
    @example(Stream((Ask(caller="jwt"), Tick(4000), Ask(caller="jwt"), Ask(caller="jwt"))))
    def check(stream: Stream) -> None:
        note(f"{stream!r}: {len(stream.segments())} segments")  # no secret: names only
        run = compare(stream, credential_file, jwks_url)
        runs.append(runner.run(asyncio.wait_for(run, 30)))

    with asyncio.Runner() as runner:
        jwks = serving_jwks()
        jwks_url = runner.run(jwks.__aenter__())
        try:
            check()
        finally:
            runner.run(jwks.__aexit__(None, None, None))
    # A differential test where the lane never fires proves nothing. THIS FAILS UNTIL THE
    # LANE LANDS (issue 14): the lead exposes it as app[proxy.app.LANE].
    counts = [run.lane_answered for run in runs]
    assert None not in counts, "the lane is not exposed as app[proxy.app.LANE] yet"
    assert sum(c or 0 for c in counts) > 0, "the lane answered no hit in the whole run"
    assert sum(run.hits for run in runs) > len(runs), "the streams hold too few hits"


# --- the log line and the metrics of a hit -----------------------------------------------


@pytest.fixture
async def jwks_url() -> AsyncIterator[str]:
    async with serving_jwks() as url:
        yield url


NAMES = {"billing": ("billing-service", "key"), "jwt": ("jwt-service", "jwt")}


@pytest.mark.parametrize("caller", list(NAMES))
async def test_a_hit_the_lane_answers_logs_and_counts_as_aiohttp_does(
    make_proxy: ProxyFactory, upstream: Upstream, jwks_url: str, caller: str
) -> None:
    """One hit each way (a key, a remembered JWT): the same request line but for its id
    and duration, the same metrics."""
    lines, deltas, proxies = [], [], []
    for lane in (True, False):
        listener = await make_proxy(
            listen=True, server={"fast_lane": lane}, callers=CALLERS, issuers=[issuer(jwks_url)]
        )
        headers = {"Authorization": authorization(caller).split(": ", 1)[1].strip()}
        assert (await get(listener, headers=headers)).status == 200  # the miss that caches it
        before = counted(listener)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        with capture_logs(processors=[merge_contextvars]) as logs:
            writer.write(Ask(caller=caller).render())
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                (length,) = re.findall(rb"\r\nContent-Length: (\d+)\r\n", head)
                await reader.readexactly(int(length))
            await wait_until(lambda: bool(logs), "the request line")
        writer.close()
        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Cache: HIT\r\n" in head
        after = counted(listener)
        deltas.append({k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)})
        lines.append([line for line in logs if line["event"] == "request"])
        proxies.append(listener)

    (on,), (off,) = lines
    for line in (on, off):
        assert GENERATED_ID.fullmatch(line.pop("request_id"))
        assert isinstance(line.pop("duration_ms"), float)
    assert on == off
    name, auth = NAMES[caller]
    assert on == {
        "event": "request",
        "log_level": "info",
        "method": "GET",
        "caller": name,
        "auth": auth,
        "organization": ORG,
        "invoice_id": WARM[0],
        "status": 200,
        "cache": "hit",
    }
    assert (
        deltas[0]
        == deltas[1]
        == {
            ("invoice_proxy_requests_total", (("caller", name), ("code", "200"))): 1.0,
            ("invoice_proxy_request_duration_seconds_count", (("cache", "hit"),)): 1.0,
            ("invoice_proxy_cache_lookups_total", (("result", "hit"),)): 1.0,
        }
    )
    assert upstream.standin.stats.requests == 2  # one miss each, and no more
    # The hit must be the lane's own. THIS FAILS UNTIL THE LANE LANDS (issue 14).
    assert lane_answered(proxies[0].app) == 1, "the lane did not answer the hit"
    assert lane_answered(proxies[1].app) in (None, 0)


async def test_a_jwt_kept_on_a_connection_is_verified_again_when_forgotten_or_expired(
    make_proxy: ProxyFactory, jwks_url: str
) -> None:
    """The lane finds a connection's last JWT again without its digest, but not once
    the proxy forgot its verified tokens (an issuer withdrew a key): the next request
    is verified again (aiohttp's), and the one after it is the lane's again. Nor once
    the JWT's exp has come: then it is refused, on the same connection."""
    listener = await make_proxy(listen=True, callers=CALLERS, issuers=[issuer(jwks_url)])
    exp = int(time.time()) + 2
    claims = {"iss": ISSUER, "aud": [AUDIENCE], "sub": "jwt-service", "iat": exp - 60, "exp": exp}
    token = jwt.encode(claims, signing_key(), "RS256", headers={"kid": "k1"})
    request = (
        f"GET {invoice_path(ORG, WARM[0])} HTTP/1.1\r\nHost: proxy\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    assert (await get(listener, WARM[0], org=ORG, headers=bearer(token))).status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    statuses, answered = [], []
    try:
        for step in ("hit", "hit", "forget", "hit", "expire"):
            if step == "forget":
                listener.app[proxy_app.CALLERS].forget_tokens()
            if step == "expire":
                await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
            writer.write(request)
            statuses.append((await one_answer(reader))[0])
            answered.append(lane_answered(listener.app))
    finally:
        writer.close()
        await writer.wait_closed()
    assert statuses == [200, 200, 200, 200, 401]
    assert answered == [1, 2, 2, 3, 3]


# --- over TLS, with client certificates -------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """A server certificate for 127.0.0.1, client certificates from a CA of their own,
    and a client holding `CERTIFICATE_CALLER`'s."""
    server_ca, clients_ca = make_ca("test-ca"), make_ca("clients-ca")
    files = {
        "tls.crt": issue(server_ca, "invoice-proxy")[:2],
        "client.crt": issue(clients_ca, "billing", uri=SPIFFE, server=False)[:2],
    }
    for name, (cert, key) in files.items():
        (tmp_path / name).write_bytes(cert)
        (tmp_path / name.replace(".crt", ".key")).write_bytes(key)
    (tmp_path / "clients-ca.pem").write_bytes(clients_ca.pem())
    client = ssl.create_default_context(cadata=server_ca.pem().decode())
    client.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    anonymous = ssl.create_default_context(cadata=server_ca.pem().decode())
    server = {
        "cert_file": str(tmp_path / "tls.crt"),
        "key_file": str(tmp_path / "tls.key"),
        "client_ca_file": str(tmp_path / "clients-ca.pem"),
    }
    return Tls(server, client, anonymous)


def one_read_each(*elements: Element) -> Stream:
    ends = itertools.accumulate(len(element.render()) for element in elements)
    return Stream(elements, tuple(ends))


BY_CERTIFICATE = Ask(caller="certificate")
TLS_STREAMS = [
    Stream((BY_CERTIFICATE, replace(BY_CERTIFICATE, method="HEAD"), HIT, Ask(caller="jwt"))),
    one_read_each(BY_CERTIFICATE, replace(BY_CERTIFICATE, headers=("match",)), HIT, LAST_HIT),
    one_read_each(replace(BY_CERTIFICATE, org=FORBIDDEN), BY_CERTIFICATE, BY_CERTIFICATE),
    Stream((replace(BY_CERTIFICATE, invoice=NEW[0]),) * 3 + (LAST_HIT,)),
    one_read_each(replace(BY_CERTIFICATE, headers=("id", "keep")), Ask(caller="two"), HIT),
]


async def test_over_tls_the_lane_answers_as_aiohttp_alone_does(
    credential_file: Path, jwks_url: str, tls: Tls
) -> None:
    """Callers by client certificate, key and JWT over HTTPS; and a client without a
    certificate (no header: 401)."""
    runs = [await compare(stream, credential_file, jwks_url, tls) for stream in TLS_STREAMS]
    stream = one_read_each(Ask(caller="nobody"), HIT, Ask(caller="nobody"))
    runs.append(
        await compare(stream, credential_file, jwks_url, replace(tls, client=tls.anonymous))
    )
    assert sum(run.hits for run in runs) >= 12
    # THIS FAILS UNTIL THE LANE LANDS (issue 14): hits over TLS answered by the lane.
    assert sum(run.lane_answered or 0 for run in runs) > 0, "the lane answered no hit"
