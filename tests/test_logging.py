"""The log line: one JSON object a line (orjson's bytes), as the standard json wrote it."""

from __future__ import annotations

import asyncio
import enum
import io
import json
import re
import select
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import logging as proxy_logging

from .helpers import BILLING_KEY, TOKEN


def written(emit: Callable[[Any], None], fmt: str = "json") -> bytes:
    """What the service writes on stdout while `emit(logger)` logs (`configure`'s pipeline)."""
    stream = io.BytesIO()
    proxy_logging.configure("debug", fmt, stream=stream, cache=False)
    try:
        emit(structlog.get_logger("proxy"))
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    return stream.getvalue()


def one_line(data: bytes) -> dict[str, Any]:
    """The one JSON object of `data`, which must be a single line ended by a newline."""
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and b"\r" not in data
    line: dict[str, Any] = json.loads(data, parse_constant=_no_constants)
    return line


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def as_before(event: str, level: str, **fields: Any) -> dict[str, Any]:
    """The line the standard library's json rendered for the same event (no timestamp)."""
    event_dict = proxy_logging.redact_secrets(None, level, {**fields, "event": event})
    event_dict["level"] = level
    old: dict[str, Any] = json.loads(structlog.processors.JSONRenderer()(None, level, event_dict))
    return old


def without_timestamp(line: dict[str, Any]) -> dict[str, Any]:
    stamp = line.pop("timestamp")
    assert isinstance(stamp, str) and stamp.endswith("Z")
    return line


# Every character (non-ASCII, control characters, U+2028, lone surrogates), numbers
# past orjson's 64 bits, dict keys that are not strings: what a field could ever hold.
characters = st.characters(exclude_categories=())
texts = st.text(characters, max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(texts | st.integers() | st.booleans(), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = texts.filter(lambda name: name not in {"event", "level", "timestamp", "exc_info"})


@settings(max_examples=300, deadline=None)
@given(event=texts, fields=st.dictionaries(field_names, values, max_size=6))
def test_a_line_holds_what_the_standard_json_renderer_wrote(
    event: str, fields: dict[str, Any]
) -> None:
    """Same keys, same values, same order; redaction applied the same way."""
    line = one_line(written(lambda log: log.info(event, **fields)))
    assert list(without_timestamp(line).items()) == list(as_before(event, "info", **fields).items())


@settings(max_examples=100, deadline=None)
@given(
    before=texts,
    after=texts,
    secret=st.sampled_from([f"Bearer {BILLING_KEY}", TOKEN, BILLING_KEY]),
)
def test_a_secret_among_any_characters_is_masked(before: str, after: str, secret: str) -> None:
    line = one_line(written(lambda log: log.error("oops", error=f"{before} {secret} {after}")))
    assert secret not in json.dumps(line) and "[redacted]" in line["error"]


def test_values_json_has_no_type_for_are_logged_as_their_repr() -> None:
    """A Path, an exception, a set or any object in a field: the line is there, as before."""
    fields = {
        "path": Path("/vault/secrets/planetscale.json"),
        "error": ConnectionResetError(104, "Connection reset by peer"),
        "kinds": {"timeout"},
        "source": object(),
    }
    line = one_line(written(lambda log: log.warning("odd_values", **fields)))
    assert without_timestamp(line) == as_before("odd_values", "warning", **fields)
    assert line["path"] == "PosixPath('/vault/secrets/planetscale.json')"


@dataclass
class _Login:
    role: str
    token: str


def test_a_secret_inside_an_object_is_masked_in_its_repr() -> None:
    """The redaction processor reads strings and containers; an object's repr is read too."""
    fields = {"error": ValueError(f"refused Bearer {BILLING_KEY}"), "login": _Login("r", TOKEN)}
    data = written(lambda log: log.error("oops", **fields))
    line = one_line(data)
    assert BILLING_KEY.encode() not in data and TOKEN.encode() not in data
    assert line["error"].startswith("ValueError('refused [redacted]")
    assert line["login"].startswith("_Login(role='r', ") and "[redacted]" in line["login"]


def nested_with(secret: str) -> st.SearchStrategy[Any]:
    """Dicts and lists nested to any depth, `secret` among their strings."""
    leaves = st.one_of(st.just(secret), st.text(max_size=5), st.integers(), st.none())
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=40,
    )


@settings(max_examples=100, deadline=None)
@given(value=nested_with(TOKEN), depth=st.integers(0, 60), cyclic=st.booleans())
def test_a_field_nested_to_any_depth_or_containing_itself_is_a_line_without_its_secret(
    value: Any, depth: int, cyclic: bool
) -> None:
    """Redaction follows dicts and lists; one that contains itself, or is nested deeper
    than `_MAX_DEPTH`, is still one line (deep parts logged as TOO_DEEP), never an
    exception in the code that logs, and a secret inside it is never written."""
    for level in range(depth):
        value = [value] if level % 2 else {"level": value}
    if cyclic:
        value = {"inner": value, "also": [TOKEN]}
        value["self"] = value
    data = written(lambda log: log.warning("nested", detail=value))
    line = one_line(data)
    assert TOKEN.encode() not in data and line["event"] == "nested"
    if cyclic or depth > proxy_logging._MAX_DEPTH:
        assert proxy_logging.TOO_DEEP in json.dumps(line["detail"])


class _Kind(enum.Enum):
    """An enum whose member's value is a secret (orjson writes a member as its value)."""

    TOKEN = TOKEN
    NESTED = (1, {"token": "x", "detail": TOKEN})


def _secret_shaped(value: uuid.UUID) -> bool:
    text = str(value)
    return any(c.isalpha() for c in text) and any(c.isdigit() for c in text)


@settings(max_examples=100, deadline=None)
@given(
    secret=st.uuids().filter(_secret_shaped) | st.sampled_from(list(_Kind)),
    wrap=st.sampled_from([lambda v: v, lambda v: [v], lambda v: {"inner": (v, 1)}]),
)
def test_a_secret_in_a_value_orjson_writes_itself_is_masked(
    secret: uuid.UUID | _Kind, wrap: Callable[[Any], Any]
) -> None:
    """A UUID object (a key or token may be one) and an enum member are written by orjson
    without asking: redaction reads them as orjson writes them, as a string would be."""
    data = written(lambda log: log.warning("odd", detail=wrap(secret)))
    line = one_line(data)
    text = str(secret) if isinstance(secret, uuid.UUID) else TOKEN
    assert text.encode() not in data and "[redacted]" in json.dumps(line["detail"])


def test_a_field_nested_within_the_depth_is_logged_whole() -> None:
    value: Any = "deepest"
    for _ in range(proxy_logging._MAX_DEPTH):
        value = [value]
    assert one_line(written(lambda log: log.info("nested", detail=value)))["detail"] == value


def test_a_nan_or_infinite_number_is_null_and_the_line_stays_json() -> None:
    line = one_line(written(lambda log: log.info("odd", ratio=float("nan"), limit=float("inf"))))
    assert line["ratio"] is None and line["limit"] is None


def test_a_logged_exception_is_one_line_with_its_traceback() -> None:
    def emit(log: Any) -> None:
        try:
            raise RuntimeError(f"upstream said: token {TOKEN}\nsecond line")
        except RuntimeError:
            log.exception("unhandled_error", request_id="r1")

    data = written(emit)
    line = one_line(data)
    assert line["event"] == "unhandled_error" and line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: upstream said: token [redacted]\nsecond line" in line["exception"]
    assert TOKEN.encode() not in data


def test_console_lines_are_text_lines() -> None:
    data = written(lambda log: log.info("credential_reloaded", version="v2 é"), fmt="console")
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    text = data.decode()
    assert "credential_reloaded" in text and "version=" in text and "v2 é" in text


def test_a_text_stream_receives_the_same_lines() -> None:
    """`configure(stream=StringIO())`, as a test passes it; stdout is written in bytes."""
    text = io.StringIO()
    proxy_logging.configure("debug", "json", stream=text, cache=False)
    try:
        structlog.get_logger("proxy").info("started", port=8080, where="Zürich")
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    assert text.getvalue().count("\n") == 1
    assert json.loads(text.getvalue())["where"] == "Zürich"


def test_what_was_printed_before_the_configuration_comes_first() -> None:
    """A text stream over a binary one (stdout): its pending text goes out first."""
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8")
    stdout.write("banner\n")
    proxy_logging.configure("debug", "json", stream=stdout, cache=False)
    try:
        structlog.get_logger("proxy").info("started")
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    first, second = raw.getvalue().splitlines()
    assert first == b"banner" and json.loads(second)["event"] == "started"


class _Writes:
    """A binary stream that remembers each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(data)
        return len(data)

    def flush(self) -> None:
        pass


async def test_a_loop_turns_lines_go_out_in_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    """Atomic writes to a shared pipe: counted in bytes, so non-ASCII lines fit too."""
    stream = _Writes()
    proxy_logging.configure("debug", "json", stream=stream, cache=False)  # type: ignore[arg-type]
    try:
        log = structlog.get_logger("proxy")
        for i in range(200):
            log.info("request", request_id=f"r{i}", caller="caisse-épargne-ü€" * 2)
        assert stream.writes == []  # written at the end of the loop's turn
        await asyncio.sleep(0)
    finally:
        proxy_logging.reset()
    assert len(stream.writes) > 1
    assert all(len(chunk) <= select.PIPE_BUF and chunk.endswith(b"\n") for chunk in stream.writes)
    lines = b"".join(stream.writes).splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f"r{i}" for i in range(200)]


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), min_size=1),
    limit=st.integers(1, 80),
)
def test_lines_are_cut_into_the_fewest_writes_of_whole_lines(
    lines: list[bytes], limit: int
) -> None:
    """Every write ends a line and holds at most `limit` bytes, or one line longer than
    that; together they are the lines in order; and no write could have taken the next
    line too (as few writes as that allows)."""
    writes = list(proxy_logging._whole_lines(lines, limit))
    assert b"".join(writes) == b"".join(line + b"\n" for line in lines)
    for i, chunk in enumerate(writes):
        assert chunk.endswith(b"\n")
        assert len(chunk) <= limit or chunk.count(b"\n") == 1
        if i + 1 < len(writes):
            following = writes[i + 1].split(b"\n", 1)[0] + b"\n"
            assert len(chunk) + len(following) > limit


REQUEST_LINE = st.fixed_dictionaries(
    {
        "request_id": st.text(min_size=1, max_size=40),
        "method": st.sampled_from(["GET", "HEAD"]),
        "caller": st.text(max_size=20),
        "auth": st.sampled_from(["key", "jwt", "certificate", None]),
        "organization": st.one_of(st.none(), st.text(max_size=64)),
        "invoice_id": st.one_of(st.none(), st.text(max_size=64)),
        "status": st.integers(100, 599),
        "cache": st.sampled_from(["hit", "miss", "stale", "coalesced", "none"]),
        "seconds": st.floats(0, 100),
    }
)


@settings(max_examples=50, deadline=None)
@given(fields=REQUEST_LINE, fmt=st.sampled_from(["json", "console"]))
def test_the_request_line_is_the_line_of_an_info_call(fields: dict[str, Any], fmt: str) -> None:
    """`middleware.log_request` (`logging.request_line`) writes what a plain
    `info("request", ...)` writes: the same processors, redaction and renderer."""
    from proxy.middleware import log_request

    named = {k: v for k, v in fields.items() if k != "seconds"}
    named["duration_ms"] = round(fields["seconds"] * 1_000_000) / 1000
    fast = written(lambda _log: log_request(**fields), fmt)
    plain = written(lambda log: log.info("request", **named), fmt)
    if fmt == "json":
        assert without_timestamp(one_line(fast)) == without_timestamp(one_line(plain))
    else:  # the console line starts with its timestamp
        assert fast.split(b" ", 1)[1] == plain.split(b" ", 1)[1]


TIMESTAMP = re.compile(rb'"timestamp": ?"[^"]*"')  # orjson's, or json's (fallback)
# Names a bound context variable could have: any, the request line's own, secret ones.
CONTEXT_NAMES = field_names | st.sampled_from(
    ["request_id", "caller", "status", "token", "authorization", "exc_info", "event", "level"]
)


@settings(max_examples=150, deadline=None)
@given(fields=REQUEST_LINE, context=st.dictionaries(CONTEXT_NAMES, values, max_size=3))
def test_the_request_line_is_the_info_calls_line_byte_for_byte_in_any_context(
    fields: dict[str, Any], context: dict[str, Any]
) -> None:
    """The request line's inline run of the JSON pipeline (`logging.request_line`)
    writes the bytes structlog's own run writes, in the same order, with whatever
    context variables are bound (merged, redacted, an `exc_info` formatted)."""
    from proxy.middleware import log_request

    order = ("request_id", "method", "caller", "auth", "organization", "invoice_id", "status")
    named = {name: fields[name] for name in (*order, "cache")}  # log_request's order
    named["duration_ms"] = round(fields["seconds"] * 1_000_000) / 1000

    def in_context(emit: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(log: Any) -> None:
            with structlog.contextvars.bound_contextvars(**context):
                emit(log)

        return run

    fast = written(in_context(lambda _log: log_request(**fields)))
    plain = written(in_context(lambda log: log.info("request", **named)))
    assert TIMESTAMP.sub(b"", fast) == TIMESTAMP.sub(b"", plain)
    one_line(fast)


@settings(max_examples=30, deadline=None)
@given(fields=REQUEST_LINE)
def test_every_field_of_the_request_line_is_one_whose_value_is_trusted(
    fields: dict[str, Any],
) -> None:
    """`request_line` skips the redaction scan when no context variable is bound: that
    holds only while every field `log_request` writes is in `_TRUSTED_VALUES` (values
    the code validated or made itself). A new field must be added there, or scanned."""
    from proxy.middleware import log_request

    line = one_line(written(lambda _log: log_request(**fields)))
    assert set(line) <= proxy_logging._TRUSTED_VALUES


def test_the_request_line_is_captured_by_capture_logs() -> None:
    """`capture_logs` edits the processor list in place: the line takes structlog's way."""
    from proxy.middleware import log_request

    stream = io.BytesIO()
    proxy_logging.configure("info", "json", stream=stream, cache=True)
    try:
        with structlog.testing.capture_logs() as captured:
            log_request(
                request_id="r1", method="GET", caller="billing", auth="key",
                organization="acme", invoice_id="inv_1", status=200, cache="hit",
                seconds=0.001,
            )  # fmt: skip
    finally:
        proxy_logging.reset()
    proxy_logging.flush_logs()
    assert stream.getvalue() == b""
    assert [(line["event"], line["request_id"]) for line in captured] == [("request", "r1")]


def test_the_request_line_follows_the_configured_level_and_each_configuration() -> None:
    from proxy.middleware import log_request

    fields = {
        "request_id": "r1", "method": "GET", "caller": "billing", "auth": "key",
        "organization": "acme", "invoice_id": "inv_1", "status": 200, "cache": "hit",
        "seconds": 0.001,
    }  # fmt: skip
    for level, lines in (("warning", 0), ("info", 1), ("warning", 0), ("debug", 1)):
        stream = io.BytesIO()
        proxy_logging.configure(level, "json", stream=stream, cache=True)
        try:
            log_request(**fields)  # type: ignore[arg-type]
        finally:
            proxy_logging.reset()
        proxy_logging.flush_logs()
        assert stream.getvalue().count(b"\n") == lines, level
        if lines:
            assert one_line(stream.getvalue())["request_id"] == "r1"
