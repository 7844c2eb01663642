"""structlog configuration: JSON lines on stdout, with a redaction safety net.

`configure()` is called once, by the command line. The redaction processor is the
last line of defence: code never logs a secret on purpose, but if a later change
does, anything shaped like a key, token or Authorization header is masked.

The line of every request is cheap, as structlog's performance notes advise:
`make_filtering_bound_logger`, orjson's serializer (bytes) and a bytes writer on the
binary stdout that writes once per event-loop turn; `request_line` runs the configured
processors inline while their list is unchanged (`python -m bench.log_lines` measures
it). Tests reset with `reset()`, which binds loggers bound once (`BoundOnce`) again,
not with `structlog.reset_defaults()`.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import io
import json
import logging
import re
import select
import sys
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from typing import IO, Any, Protocol, cast

import orjson
import structlog

REDACTED = "[redacted]"

# Field names whose value is never logged, whatever it holds.
_SECRET_KEYS = re.compile(
    r"(?i)(authorization|token|secret|password|passwd|api[_-]?key|caller[_-]?key|jwt|cookie)"
)
# Fields that are known to be safe although their names match the pattern above.
_SAFE_KEYS = frozenset({"token_id_field", "token_field", "token_source", "token_ttl_s"})
# Fields the code fills with values it validated or made itself (request line facts,
# counters, names from the configuration): their values are not scanned. This keeps
# the per-request line cheap and stops a 64-character invoice id looking like a key.
# None of them is secret-named (`_SECRET_KEYS`): tests/test_secrets.py checks.
_TRUSTED_VALUES = frozenset(
    {
        "event", "level", "timestamp", "logger", "request_id", "caller", "auth", "organization",
        "invoice_id", "method", "status", "cache", "duration_ms", "source", "version",
        "previous_version", "attempt", "delay_ms", "state",
    }
)  # fmt: skip
# Values that look like secrets wherever they appear in a string. Every alternative is
# greedy over its characters, so a match never ends inside a secret it started on.
_SECRET_VALUES = re.compile(
    r"(?i)(bearer\s+\S+"
    r"|pscale_(?:tkn|oauth)_\S+"  # PlanetScale service and OAuth tokens
    r"|\b(?:hvs|hvb|hvr|s|b)\.[A-Za-z0-9_-]{20,}"  # Vault / OpenBao tokens
    r"|\bey[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWTs
    # The userinfo of any URL (redis://user:password@host), whatever came before it
    r"|//[^\s/?#]*@"
    r"|\b(?:password|passwd|secret|token)=[^\s&]+"  # a secret as a query or form value
    # token_id:token (an Authorization value), base64 tokens included, not `scheme://`.
    # The token alone when an earlier match ended at its colon (`s.<20 chars>:<token>`).
    r"|(?:[A-Za-z0-9_-]+|(?<=[A-Za-z0-9_-])):(?!//)[A-Za-z0-9_+/=-]{24,}"
    # A bare key (`new-caller-key`: 43 URL-safe characters), a hex key or a UUID: a whole
    # run of 32 or more such characters with a letter and a digit. Names and identifiers
    # in messages (class names, metric names) rarely hold both.
    r"|(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*[A-Za-z])(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{32,}"
    r"(?![A-Za-z0-9_-]))"
)
_SECRET, _TRUSTED, _SCAN = 0, 1, 2
_key_kinds: dict[str, int] = {}


def _kind(key: str) -> int:
    kind = _key_kinds.get(key)
    if kind is None:
        if key not in _SAFE_KEYS and _SECRET_KEYS.search(key):
            kind = _SECRET
        elif key in _TRUSTED_VALUES:
            kind = _TRUSTED
        else:
            kind = _SCAN
        if len(_key_kinds) < 4096:  # log keys are code, not data: a small set
            _key_kinds[key] = kind
    return kind


def redact_value(value: str) -> str:
    return _SECRET_VALUES.sub(REDACTED, value)


# How deep redaction follows dicts and lists. Deeper (a structure that contains itself,
# or data nested past any log's need) the value is logged as this, not scanned: a field
# must never turn a log call into a RecursionError.
_MAX_DEPTH = 16
TOO_DEEP = "[nested too deep]"


# Values orjson writes itself, without `_default`, that are not strings or containers: a
# UUID as its string, an enum member as its value. Redaction reads them as written.
_WRITTEN_AS_VALUE = uuid.UUID | enum.Enum


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _SECRET_VALUES.sub(REDACTED, value)
    if isinstance(value, uuid.UUID):
        return _SECRET_VALUES.sub(REDACTED, str(value))
    if isinstance(value, enum.Enum):
        return _redact(value.value, depth + 1)
    if isinstance(value, dict | list | tuple) and depth >= _MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _kind(k) == _SECRET else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and secret-shaped values."""
    if _TRUSTED_VALUES.issuperset(event_dict):
        return event_dict  # the request line: one check in C instead of one per field
    kinds = _key_kinds
    for key, value in event_dict.items():
        kind = kinds.get(key)
        if kind is None:
            kind = _kind(key)  # a new key; a call for every key cost 0.7 us a request line
        if kind == _TRUSTED:
            continue
        if kind == _SECRET:
            event_dict[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple | _WRITTEN_AS_VALUE):  # _SCAN
            event_dict[key] = _redact(value)
    return event_dict


# The microseconds of a timestamp after its millisecond, with the `Z`: "000Z" to "999Z".
_MICROSECONDS = tuple("%03dZ" % micro for micro in range(1000))  # noqa: UP031


class UTCTimestamper:
    """`TimeStamper(fmt="iso", utc=True)`'s output, with the date formatted once a second.

    Formatting a datetime costs more than the rest of the timestamp: on the hit path
    it is done for every request. Up to its millisecond a timestamp is formatted once
    per millisecond (the request lines of one loop turn share it), its microseconds
    are looked up.
    """

    __slots__ = ("_milli", "_prefix", "_second", "_to_milli")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._to_milli = ""

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["timestamp"] = self.now()
        return event_dict

    def now(self) -> str:
        milli, micro = divmod(time.time_ns() // 1000, 1000)
        if milli != self._milli:
            self._milli = milli
            second, in_second = divmod(milli, 1000)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._to_milli = "%s.%03d" % (self._prefix, in_second)  # noqa: UP031 (faster)
        return self._to_milli + _MICROSECONDS[micro]


def _default(value: Any) -> Any:
    """A value JSON has no type for: structlog's `__structlog__` hook, else its repr.

    As structlog's own renderer does, so a Path or an exception object in a field is
    logged, not a crash; the repr is redacted like any other string, because the
    redaction processor before the renderer only reads strings, dicts and lists.
    """
    to_log = getattr(value, "__structlog__", None)
    shown = to_log() if callable(to_log) else repr(value)
    return redact_value(shown) if isinstance(shown, str) else shown


# Dataclasses and datetimes go through `_default` (their repr, as the standard json
# renderer logged them), not orjson's own encoding: a dataclass's fields are never
# redacted otherwise.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    """structlog processor: the event as one JSON object, UTF-8 bytes, with orjson.

    `JSONRenderer(serializer=orjson.dumps)` written out: one call per line with no
    keyword dict (half of the renderer's cost), and a fallback. What orjson refuses
    (a string with a lone surrogate, an integer beyond 64 bits, a dict key that is no
    string, ...) is rendered by the standard library's json as before this renderer,
    and what that refuses too is still a line, with such values as their repr.
    """
    try:
        return orjson.dumps(event_dict, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:
        return _render_slowly(event_dict)


def _render_slowly(event_dict: MutableMapping[str, Any]) -> bytes:
    try:
        return json.dumps(event_dict, default=_default).encode()
    except (TypeError, ValueError, RecursionError):
        plain = (str, int, float, bool, type(None))
        return json.dumps(
            {
                str(key): value if isinstance(value, plain) else redact_value(repr(value))
                for key, value in event_dict.items()
            }
        ).encode()


def _encode(_logger: Any, _method: str, line: str) -> bytes:
    """structlog processor after ConsoleRenderer: its line as bytes for the writer."""
    return line.encode("utf-8", "backslashreplace")


class _BinaryStream(Protocol):
    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class _TextStream:
    """A text stream without a binary one below it (a StringIO of a test), as bytes."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream.write(data.decode("utf-8"))

    def flush(self) -> None:
        self._stream.flush()


def _binary(stream: IO[str] | IO[bytes]) -> _BinaryStream:
    """Where the writer's bytes go: the binary stream under a text one (stdout's)."""
    if isinstance(stream, io.TextIOBase):
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            return _TextStream(stream)
        stream.flush()  # what was printed before goes first
        return cast(_BinaryStream, buffer)
    return cast(_BinaryStream, stream)


class LineWriter:
    """The structlog logger: lines (bytes) are written once per event-loop turn.

    Under load many requests finish in one turn of the loop; their lines go out in one
    write instead of a write and a flush each (the single largest cost of a cache hit
    after aiohttp itself). Outside a running loop (start-up, the command line) a line is
    written at once. A clean shutdown flushes (`flush_logs`); a SIGKILL can lose the
    lines of the current loop turn, never more. Like structlog's BytesLogger, it writes
    to a binary stream (stdout's buffer): no encoding of each line.
    """

    def __init__(self, stream: _BinaryStream) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def msg(self, message: bytes) -> None:
        self._lines.append(message)
        if self._loop is not None and not self._loop.is_closed():
            return  # a flush is already scheduled in this turn
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)
        self._loop = loop

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg

    def flush(self) -> None:
        self._loop = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                for chunk in _whole_lines(lines, select.PIPE_BUF):
                    self._stream.write(chunk)
                    self._stream.flush()
            except (OSError, ValueError):
                pass  # stdout is gone (closed pipe): logging must not take the service down


def _whole_lines(lines: list[bytes], limit: int) -> Iterator[bytes]:
    """The lines in as few writes as possible: whole lines, at most `limit` bytes each
    (a line longer than that alone).

    Up to PIPE_BUF bytes, a write to a pipe is atomic: with `server.workers` several
    processes share stdout, and a longer write could interleave with another's. The
    lines are joined once and cut at their last newline within each `limit` bytes: a
    search per write, not a step per line.
    """
    data = b"\n".join(lines) + b"\n"
    start, end = 0, len(data)
    while end - start > limit:
        cut = data.rfind(b"\n", start, start + limit) + 1
        if cut == 0:  # a line longer than `limit`
            cut = data.index(b"\n", start + limit) + 1
        yield data[start:cut]
        start = cut
    if start < end:
        yield data[start:]


_writer: LineWriter | None = None
_generation = 0  # of the configuration: `configure` and `reset` start a new one


class BoundOnce:
    """A logger bound once per configuration: the request line's way when `request_line`
    cannot take its own (a capture, the console format, a level above info).

    structlog's performance advice: the lazy proxy that `get_logger` returns assembles
    (or looks up) a bound logger at every call. This is a logger bound again after
    `configure` or `reset`. Binding keeps a reference to the configured processor list,
    which `structlog.testing.capture_logs` edits in place, so captures still see the line.
    """

    __slots__ = ("_generation", "_info", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._info: Callable[..., None] = _unbound

    def info(self, event: str, fields: dict[str, Any]) -> None:
        if self._generation != _generation:
            self._info = structlog.get_logger(self._name).bind().info
            self._generation = _generation
        self._info(event, **fields)


def _unbound(event: str, **fields: Any) -> None:
    raise AssertionError("BoundOnce.info binds first")


class _JsonLines:
    """What `configure` set for JSON lines at level info or below, as `request_line`
    runs it: the processor list it configured, a copy of it to tell that list unchanged
    (`structlog.testing.capture_logs` edits it in place), the timestamper, the writer."""

    __slots__ = ("configured", "processors", "timestamper", "writer")

    def __init__(
        self, configured: list[Any], timestamper: UTCTimestamper, writer: LineWriter
    ) -> None:
        self.configured = configured
        self.processors = list(configured)
        self.timestamper = timestamper
        self.writer = writer


_json_lines: _JsonLines | None = None  # set by `configure` with fmt="json", level <= info
_request_logger = BoundOnce("proxy.access")


def request_line(fields: dict[str, Any]) -> None:
    """Log the line of a request: what `info("request", **fields)` logs, for the fields
    of `middleware.log_request`, every name of which is in `_TRUSTED_VALUES`.

    It is logged at every request, so it takes structlog's performance advice further:
    while the JSON pipeline of `configure` is unchanged, it runs those processors inline,
    each as it would run (the context variables merged, the level, the timestamp, then
    the exception formatter and the redaction, which have something to do only when a
    context variable added a field, and the renderer), and hands the bytes to the
    writer; a line costs half the instructions of structlog's own way then
    (`python -m bench.instructions`). Otherwise it goes through a logger bound once.
    """
    lines = _json_lines
    if lines is None or lines.processors != lines.configured:
        _request_logger.info("request", fields)
        return
    writer = lines.writer
    fields["event"] = "request"
    size = len(fields)
    event_dict = structlog.contextvars.merge_contextvars(writer, "info", fields)
    merged = len(event_dict) != size
    event_dict["level"] = "info"  # add_log_level
    event_dict["timestamp"] = lines.timestamper.now()
    if merged:
        if "exc_info" in event_dict:  # format_exc_info acts only on this key
            event_dict = structlog.processors.format_exc_info(writer, "info", event_dict)
        if not _TRUSTED_VALUES.issuperset(event_dict):
            event_dict = redact_secrets(writer, "info", event_dict)
    writer.msg(render_json(writer, "info", event_dict))


def reset() -> None:
    """structlog's defaults again (tests): use this, not `structlog.reset_defaults()`,
    so loggers bound once (`BoundOnce`) are bound again."""
    global _generation, _json_lines
    structlog.reset_defaults()
    _generation += 1
    _json_lines = None


def flush_logs() -> None:
    """Write out lines still buffered (at shutdown)."""
    if _writer is not None:
        _writer.flush()


def configure(
    level: str = "info",
    fmt: str = "json",
    *,
    stream: IO[str] | IO[bytes] | None = None,
    cache: bool = True,
) -> None:
    """Configure structlog once for the process: one JSON object a line on stdout.

    Tests pass their own `stream` (text or binary) and `cache=False`, so a later
    reconfiguration applies.
    """
    renderer: list[Any] = (
        [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()), _encode]
        if fmt == "console"
        else [render_json]
    )
    global _writer, _generation, _json_lines
    if _writer is not None:
        _writer.flush()
    _generation += 1
    _writer = writer = LineWriter(_binary(stream or sys.stdout))
    timestamper = UTCTimestamper()
    # `request_line` runs this list inline when it ends in `render_json`: a change here
    # is a change there.
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
        structlog.processors.format_exc_info,
        redact_secrets,
        *renderer,
    ]
    threshold = getattr(logging, level.upper(), logging.INFO)
    inline = fmt != "console" and threshold <= logging.INFO
    _json_lines = _JsonLines(processors, timestamper, writer) if inline else None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=cache,
    )
    # aiohttp's own loggers (access log off; errors) go through the standard library.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")


atexit.register(flush_logs)
