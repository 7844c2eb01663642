"""structlog configuration: JSON lines on stdout, with a redaction safety net.

`configure()` is called once, by the command line. The redaction processor is the
last line of defence: code never logs a secret on purpose, but if a later change
does, anything shaped like a key, token or Authorization header is masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"

# Field names whose value is never logged, whatever it holds.
_SECRET_KEYS = re.compile(
    r"(?i)(authorization|token|secret|password|passwd|api[_-]?key|caller[_-]?key|jwt|cookie|credential_value)"
)
# Fields that are known to be safe although their names match the pattern above.
_SAFE_KEYS = frozenset({"token_id_field", "token_field", "credential_version", "token_source"})
# Values that look like secrets wherever they appear in a string.
_SECRET_VALUES = re.compile(
    r"(?i)(bearer\s+\S+"
    r"|pscale_tkn_\S+"  # PlanetScale service tokens
    r"|pscale_oauth_\S+"
    r"|\b(?:hvs|hvb|hvr|s|b)\.[A-Za-z0-9_-]{20,}"  # Vault / OpenBao tokens
    r"|\bey[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|\b[A-Za-z0-9_-]{12,}:[A-Za-z0-9_-]{24,}"  # token_id:token
    r"|\b[A-Za-z0-9_-]{40,})"  # long opaque strings (caller keys)
)


def redact_value(value: str) -> str:
    return _SECRET_VALUES.sub(REDACTED, value)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_value(value)
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key not in _SAFE_KEYS and bool(_SECRET_KEYS.search(key))


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and secret-shaped values."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _redact(value)
    return event_dict


def configure(
    level: str = "info", fmt: str = "json", *, stream: TextIO | None = None, cache: bool = True
) -> None:
    """Configure structlog once for the process: one JSON object a line on stdout.

    Tests pass their own `stream` and `cache=False`, so a later reconfiguration applies.
    """
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=cache,
    )
    # aiohttp's own loggers (access log off; errors) go through the standard library.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
