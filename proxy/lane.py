"""The hit fast lane (`server.fast_lane`): cache hits answered on the connection itself.

aiohttp's request machinery (the request object, the router, the middleware chain, the
response and its headers) costs several times what a cache hit needs. The listener's
protocol (`proxy.server`) shows each read to `HeadReader` first, and `FastLane` answers
the requests it is sure of from bytes prepared when the entry was stored: a complete
GET or HEAD head for exactly `/v1/organizations/{organization}/invoices/{id}`, no body,
a known caller allowed to read the organization and within its rate, a fresh cached
200. Only what varies per request is written per request: `X-Request-ID`, `Date`, the
`Cache-Control` of an open invoice, and 304 on a matching `If-None-Match`. Everything
else goes to aiohttp, unchanged and in order, and is answered as with the lane off.

Both read the same bytes the same way. `HeadReader` parses with llhttp (httptools),
the parser aiohttp's own is built on, in the same strict mode, and calls a head *clean*
only when aiohttp could not disagree about it nor refuse it: printable ASCII, CRLF line
ends, no folded line, GET or HEAD, HTTP/1.0 or 1.1, a plain path, no header twice, no
`Content-Length`, `Transfer-Encoding`, `Expect`, `Upgrade` or `Proxy-Connection`, a
`Connection` of `keep-alive` or `close`, `Host` with HTTP/1.1, and well within the
`[server]` size limits. A clean head has no body, so it ends at its blank line, for both
parsers. Once a read holds anything not clean, aiohttp reads that connection alone from
then on: the lane never guesses where a request ends. A read is judged whole before the
lane answers from it, because aiohttp refuses a read with a malformed request in it as
a whole.

The common head (whole, clean, keep-alive, header names that are tokens and values of
printable ASCII) the lane reads itself, without llhttp and cheaper
(`HeadReader._plain_reading`), but only where llhttp would read it as a new request and
could read it no other way; it reads the head as llhttp does (tests/test_lane.py checks
that). A client sends the same headers on a connection, as a rule: when a head's header
block is the last one's, only its request line is read again. llhttp reads everything
else, any head the lane is not sure of included.

The answer, the log line and the metrics are those of the aiohttp path (`handlers`,
`middleware.log_request`): the same bytes but for the `Date` and `X-Request-ID` values.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from email.utils import formatdate

import httptools
from aiohttp.http import SERVER_SOFTWARE

from .auth import Authenticator, KnownKey
from .cache import Entry, InvoiceCache
from .handlers import etag_matches, peercert
from .metrics import Metrics
from .middleware import log_request, request_id_for

# The bytes of a clean head but for its CRLFs: printable ASCII and tab.
_PRINTABLE = bytes([9, *range(0x20, 0x7F)])
# A whole clean head, as `_plain` tests it (one pass instead of four): CRLF lines of
# printable ASCII and tabs, none starting with a space or tab, and the blank line.
_PLAIN_HEAD = re.compile(rb"(?:[!-~][\t -~]*\r\n)+\r\n")
# The invoice path (its organization and id) or another clean path.
_INVOICE = rb"/v1/organizations/([A-Za-z0-9_-]{1,64})/invoices/([A-Za-z0-9_-]{1,64})"
_CLEAN_PATH = rb"/[A-Za-z0-9/_.~-]*(?:\?[A-Za-z0-9=&_.~-]*)?"
_URL = re.compile(rb"(?:%s)|%s" % (_INVOICE, _CLEAN_PATH))
# Headers that give a request a body or another protocol, that aiohttp acts on before
# the application, or that llhttp reads as `Connection`: a head with one is aiohttp's.
_NOT_CLEAN = frozenset(
    {
        b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"content-encoding",
        b"sec-websocket-key1", b"proxy-connection",
    }
)  # fmt: skip
_CONNECTION = frozenset({b"keep-alive", b"close"})
# A whole head the lane reads itself, without llhttp (`HeadReader._plain_reading`): the
# request line of a GET or HEAD for a clean path (`_URL`), then lines of a header name
# that is a token (RFC 9110 5.6.2), a colon and printable ASCII (a tab is llhttp's to
# read), and the blank line. Such a head is plain (`_PLAIN_HEAD`).
_PLAIN_REQUEST = re.compile(
    rb"(GET|HEAD) (%s) HTTP/1\.([01])\r\n((?:[!#$%%&'*+.^_`|~0-9A-Za-z-]+:[ -~]*\r\n)*)\r\n"
    % _URL.pattern
)
# Its request line alone. `_URL` holds no CR or LF, so a head `_PLAIN_REQUEST` matches
# is this up to its first CRLF, and a header block it matched after it.
_PLAIN_LINE = re.compile(rb"(GET|HEAD) (%s) HTTP/1\.([01])\r\n" % _URL.pattern)
_METHODS = (b"GET /", b"HEAD /")
_HEAD_END = b"\r\n\r\n"
# What llhttp raises for a head it refuses, or for an upgrade (a callback's own error,
# such as a value that is not ASCII, comes wrapped as HttpParserCallbackError).
_REFUSED = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class Head:
    """One request head as llhttp reads it (or the lane itself, the same way)."""

    __slots__ = (
        "authorization", "connection", "end", "error", "headers", "if_none_match", "invoice",
        "keep_alive", "method", "request_id", "url", "version",
    )  # fmt: skip

    def __init__(self) -> None:
        self.url = b""
        self.headers: set[bytes] = set()  # lower-case names seen
        self.error = False  # a header that makes the head not clean
        self.authorization: str | None = None
        self.if_none_match: str | None = None
        self.request_id: str | None = None
        self.connection: bytes | None = None  # its value, lower-case: keep-alive or close
        self.method = ""
        self.version = ""
        self.keep_alive = True
        self.end = 0  # where it ends in the read that completed it; 0: it began before
        # The path's organization and id when it is exactly the invoice path.
        self.invoice: tuple[bytes, bytes] | None = None


class HeadReader:
    """The request heads of one connection, read with llhttp from every byte it received.

    `read` takes each read of the connection in order, and returns its complete heads,
    or None once something is not clean (see the module's docstring). A head begun in
    an earlier read is carried over.
    """

    __slots__ = (
        "_block", "_block_read", "_complete", "_current", "_max_bytes", "_max_headers",
        "_parser", "_parser_ready", "_pending",
    )  # fmt: skip

    def __init__(self, max_bytes: int, max_headers: int) -> None:
        # Well within aiohttp's own limits, so aiohttp never refuses a clean head.
        self._max_bytes = max_bytes - 8
        self._max_headers = max_headers - 1
        self._pending = b""  # the bytes so far of a head not yet complete
        self._current = Head()
        self._complete = 0
        self._parser = httptools.HttpRequestParser(self)
        # llhttp would read the next byte as the start of a request: it has read nothing
        # of the head under way, and the request before kept the connection open.
        self._parser_ready = True
        # The header block (after the request line) of the last head read without llhttp,
        # and what it says: a client sends the same headers on a connection, as a rule.
        self._block = b""
        self._block_read = Head()

    # llhttp's callbacks (httptools assembles each header before calling on_header).
    def on_url(self, url: bytes) -> None:
        head = self._current
        head.url = head.url + url if head.url else url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header(self._current, name.lower(), value)

    def _header(self, head: Head, name: bytes, value: bytes) -> None:
        """One header of `head`, its `name` lower-case."""
        if name in head.headers or name in _NOT_CLEAN or len(head.headers) >= self._max_headers:
            head.error = True
            return
        head.headers.add(name)
        # llhttp strips the blanks before a value (not after): so do aiohttp and the lane.
        if name == b"authorization":
            head.authorization = value.strip(b" \t").decode("ascii")
        elif name == b"if-none-match":
            head.if_none_match = value.strip(b" \t").decode("ascii")
        elif name == b"x-request-id":
            head.request_id = value.strip(b" \t").decode("ascii")
        elif name == b"connection":
            head.connection = value = value.strip(b" \t").lower()
            if value not in _CONNECTION:
                head.error = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        head = self._current
        head.method = parser.get_method().decode("ascii")
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self._complete += 1

    def read(self, data: bytes) -> list[Head] | None:
        """The heads `data` completes, in order; None: not clean, aiohttp's from now on."""
        pending = self._pending
        if not pending and data.endswith(_HEAD_END):
            # Nearly every read: one whole head, alone, most often one the lane reads itself.
            head = self._plain_reading(data) if self._parser_ready else None
            if head is None and data.find(_HEAD_END) == len(data) - 4:
                try:
                    head = self._llhttp_reading(data, data)
                except _REFUSED:
                    return None
                if head is None:
                    return None
            if head is not None:
                head.end = len(data)
                return [head]
        buffer = pending + data if pending else data
        carried = len(pending)
        heads: list[Head] = []
        start = 0
        try:
            while start < len(buffer):
                end = buffer.find(_HEAD_END, start)
                if end < 0:
                    tail = buffer[start:]
                    if not self._clean_so_far(tail, buffer[max(start, carried) :]):
                        return None
                    self._pending = tail
                    return heads
                end += len(_HEAD_END)
                head = self._complete_head(buffer[start:end], buffer[max(start, carried) : end])
                if head is None:
                    return None
                head.end = end - carried if start >= carried else 0
                heads.append(head)
                start = end
        except _REFUSED:
            return None
        self._pending = b""
        return heads

    def _complete_head(self, head_bytes: bytes, new: bytes) -> Head | None:
        """A whole head, `new` the bytes of it llhttp has not read yet; None: not clean."""
        head = self._plain_reading(head_bytes) if self._parser_ready else None
        return self._llhttp_reading(head_bytes, new) if head is None else head

    def _llhttp_reading(self, head_bytes: bytes, new: bytes) -> Head | None:
        """`_complete_head` by llhttp, which reads `new`."""
        if (
            len(head_bytes) > self._max_bytes
            or not head_bytes.startswith(_METHODS)
            or _PLAIN_HEAD.fullmatch(head_bytes) is None
        ):
            return None
        self._complete = 0
        self._parser.feed_data(new)
        head = self._current
        self._current = Head()
        self._parser_ready = head.keep_alive
        if (
            self._complete != 1
            or head.error
            or head.version not in ("1.1", "1.0")
            or (head.version == "1.1" and b"host" not in head.headers)
        ):
            return None
        url = _URL.fullmatch(head.url)
        if url is None:
            return None
        if url[1] is not None:
            head.invoice = (url[1], url[2])
        return head

    def _plain_reading(self, head_bytes: bytes) -> Head | None:
        """A whole clean head read without llhttp, as llhttp reads it; None: not sure,
        llhttp reads it instead (and judges it).

        The common head costs llhttp a Python callback per header and the clean checks
        after it; this reads it with one regular expression and a split, or only its
        request line when its header block is the last one's (`_block`). It is sure only
        of a clean head (see the module's docstring) that `_PLAIN_REQUEST` matches and
        that keeps the connection open; tests/test_lane.py checks it against llhttp's
        reading. llhttp, strict, has no other reading of such bytes; it is not shown
        them, and as it waited for a request (`_parser_ready`), it still does after them.
        """
        if len(head_bytes) > self._max_bytes:
            return None
        head = Head()
        line_end = head_bytes.find(b"\r\n") + 2
        if (
            self._block
            and head_bytes.endswith(self._block)
            and len(self._block) + line_end == len(head_bytes)
        ):
            # The last head's header block again: only the request line is new.
            plain = _PLAIN_LINE.fullmatch(head_bytes, 0, line_end)
            if plain is None:
                return None
            method, head.url, organization, invoice_id, minor = plain.groups()
            known = self._block_read
            head.headers = known.headers  # never changed once read
            head.authorization = known.authorization
            head.if_none_match = known.if_none_match
            head.request_id = known.request_id
            head.connection = known.connection
        else:
            plain = _PLAIN_REQUEST.fullmatch(head_bytes)
            if plain is None:
                return None
            method, head.url, organization, invoice_id, minor, fields = plain.groups()
            for field in fields[:-2].split(b"\r\n") if fields else ():
                name, _, value = field.partition(b":")
                self._header(head, name.lower(), value)
            if head.error:
                return None
            self._block = head_bytes[line_end:]
            self._block_read = head
        head.method = "GET" if method == b"GET" else "HEAD"
        if organization is not None:
            head.invoice = (organization, invoice_id)
        # llhttp's keep-alive: HTTP/1.1 unless `Connection: close`, 1.0 with `keep-alive`.
        if minor == b"1":
            if head.connection == b"close" or b"host" not in head.headers:
                return None
            head.version = "1.1"
        else:
            if head.connection != b"keep-alive":
                return None
            head.version = "1.0"
        return head

    def _clean_so_far(self, tail: bytes, new: bytes) -> bool:
        """A head not yet complete: clean as far as it goes (aiohttp refuses a bad start
        at once, and with it every request of the same read)."""
        if len(tail) > self._max_bytes:
            return False
        if not (tail.startswith(_METHODS) or any(m.startswith(tail) for m in _METHODS)):
            return False
        if not _plain(tail[:-1] if tail.endswith(b"\r") else tail):
            return False
        self._complete = 0
        self._parser_ready = False
        self._parser.feed_data(new)
        return self._complete == 0 and not self._current.error


def _plain(data: bytes) -> bool:
    """Printable ASCII and tabs in CRLF-ended lines, none of them folded (obs-fold): no
    other control byte, no CR or LF but in CRLF, no line that starts with a space or tab."""
    return (
        not data.replace(b"\r\n", b"").translate(None, _PRINTABLE)
        and b"\n " not in data
        and b"\n\t" not in data
    )


# The fixed bytes of the answers from one entry (`Entry.prepared`): the status line to
# `X-Request-ID: ` (all of it for a final entry), what follows an open entry's
# `Cache-Control` value, and `Content-Length` to `Date: `. A tuple of bytes, which the
# garbage collector stops tracking once it has seen it: every full collection walks
# each tracked object, and a class instance here would add one to every cached invoice.
Prepared = tuple[bytes, bytes, bytes]
# What a prepared answer costs beyond its bytes (the tuple and three bytes objects).
_PREPARED_OVERHEAD = 160


_STATUS_200 = b"HTTP/1.1 200 OK\r\n"
# A 200's headers from `Entry.prepared`: up to `X-Request-ID: ` with a final entry's
# `Cache-Control`, or up to `Cache-Control: ` and after its value with an open one's;
# then from `Content-Length` to `Date: `.
_AFTER_CACHE_CONTROL = b"\r\nX-Cache: HIT\r\nContent-Type: application/json\r\nX-Request-ID: "
_OPEN_BEFORE_ID = _STATUS_200 + b"ETag: %s\r\nCache-Control: "
_FINAL_BEFORE_ID = _OPEN_BEFORE_ID + b"%s" + _AFTER_CACHE_CONTROL
_AFTER_ID = b"\r\nContent-Length: %d\r\nDate: "
_STATUS_304 = b"HTTP/1.1 304 Not Modified\r\n"
_SERVER = b"\r\nServer: " + SERVER_SOFTWARE.encode("ascii") + b"\r\n"
_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n\r\n"
_CLOSE_11 = b"Connection: close\r\n\r\n"
_CRLF = b"\r\n"


class FastLane:
    """Answers the hits `HeadReader` found clean; None: aiohttp answers instead."""

    def __init__(
        self,
        callers: Authenticator,
        cache: InvoiceCache,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._callers = callers
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._second = -1
        self._date = b""
        self.answered = 0  # requests the lane answered itself (tests, the benchmark)

    @staticmethod
    def prepare(entry: Entry) -> int:
        """`InvoiceCache`'s hook: fill `entry.prepared`; the bytes it costs. (It runs on
        every miss: one formatting each, not a chain of concatenations.)"""
        etag = entry.etag.encode("ascii")
        if entry.cache_control:
            before_id = _FINAL_BEFORE_ID % (etag, entry.cache_control.encode("ascii"))
            open_after = b""
        else:
            before_id = _OPEN_BEFORE_ID % etag
            open_after = _AFTER_CACHE_CONTROL
        after_id = _AFTER_ID % len(entry.body)
        entry.prepared = (before_id, open_after, after_id)
        return len(before_id) + len(open_after) + len(after_id) + _PREPARED_OVERHEAD

    def answer(
        self,
        head: Head,
        transport: asyncio.BaseTransport | None,
        connection: KnownKey,
        idle: Callable[[], bool],
    ) -> bytes | None:
        """The whole answer to `head` when it is a hit the lane may serve, else None
        (nothing was changed: aiohttp answers it as if the lane had not looked).
        `connection`: the caller key or JWT last found on this connection; `idle`:
        whether aiohttp has nothing under way on it, asked only of a hit (a miss, the
        most common request the lane hands on, is spared the question)."""
        start = time.perf_counter()
        invoice = head.invoice
        if invoice is None:
            return None
        authorization = head.authorization
        known = self._callers.known_on(
            connection, authorization, peercert(transport) if authorization is None else None
        )
        if known is None:
            return None
        caller, how = known
        organization = invoice[0].decode("ascii")
        invoice_id = invoice[1].decode("ascii")
        if not caller.may_read(organization):
            return None
        entry = self._cache.peek((organization, invoice_id))
        if entry is None or entry.status != 200:
            return None
        prepared = entry.prepared
        if not isinstance(prepared, tuple):
            return None  # stored before the lane existed: aiohttp's
        if not idle():
            return None  # aiohttp answers it after what it has under way, in order
        bucket = caller.bucket
        if bucket is not None and bucket.try_take():
            return None  # aiohttp refuses it, and counts the refusal
        self._cache.count_hit()
        request_id = request_id_for(head.request_id)
        now = self._clock()  # for an open invoice's max-age, as the handler reads it
        if head.if_none_match is not None and etag_matches(head.if_none_match, entry.etag):
            status = 304
            answer = self._not_modified(entry, request_id, now, head)
        else:
            status = 200
            answer = self._ok(entry, prepared, request_id, now, head)
        self.answered += 1
        seconds = time.perf_counter() - start
        self._metrics.request_done(caller.name, status, "hit", seconds)
        log_request(
            request_id=request_id,
            method=head.method,
            caller=caller.name,
            auth=how,
            organization=organization,
            invoice_id=invoice_id,
            status=status,
            cache="hit",
            seconds=seconds,
        )
        return answer

    def _ok(
        self, entry: Entry, prepared: Prepared, request_id: str, now: float, head: Head
    ) -> bytes:
        before_id, open_after, after_id = prepared
        if open_after:
            before_id += entry.cache_control_at(now).encode("ascii") + open_after
        if head.version == "1.0":
            before_id = b"HTTP/1.0" + before_id[8:]
        parts = [
            before_id,
            request_id.encode("ascii"),
            after_id,
            self._http_date(),
            _SERVER,
            _connection(head),
        ]
        if head.method != "HEAD":
            parts.append(entry.body)
        return b"".join(parts)

    def _not_modified(self, entry: Entry, request_id: str, now: float, head: Head) -> bytes:
        status_line = _STATUS_304 if head.version == "1.1" else b"HTTP/1.0" + _STATUS_304[8:]
        return b"".join(
            (
                status_line,
                b"ETag: ", entry.etag.encode("ascii"),
                b"\r\nCache-Control: ", entry.cache_control_at(now).encode("ascii"),
                b"\r\nX-Cache: HIT\r\nX-Request-ID: ", request_id.encode("ascii"),
                b"\r\nDate: ", self._http_date(),
                _SERVER,
                _connection(head),
            )
        )  # fmt: skip

    def _http_date(self) -> bytes:
        """`Date`, as aiohttp writes it: the wall clock, formatted once a second."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._date = formatdate(second, usegmt=True).encode("ascii")
        return self._date


def _connection(head: Head) -> bytes:
    """The `Connection` header aiohttp adds, and the blank line."""
    if head.keep_alive:
        return _KEEP_ALIVE_10 if head.version == "1.0" else _CRLF
    return _CLOSE_11 if head.version == "1.1" else _CRLF
