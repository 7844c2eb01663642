"""The invoice body: the check against PlanetScale's schema, and the facts the cache needs.

The upstream contract (`get_invoice.openapi.yaml`, 2025) allows exactly four fields
and a number `total`. PlanetScale has since added `paid` and `overdue` booleans and
may send `total` as a decimal string. By default that drift is accepted and the body
passes unchanged; `strict=True` enforces the document exactly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

REQUIRED: dict[str, type] = {
    "id": str,
    "billing_period_start": str,
    "billing_period_end": str,
}
KNOWN_DRIFT: dict[str, type] = {"paid": bool, "overdue": bool}
_DECIMAL = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?")


class InvalidInvoice(Exception):
    """The body breaks the schema; the message names the rule, never the body."""


# The deepest nesting a body may have: the invoice object is one level, and any
# drift field under it is a scalar today. A caller's JSON parser with a small stack
# must be able to read whatever the proxy serves.
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class InvoiceFacts:
    """What the cache needs to know of a valid invoice, read once when it is fetched."""

    period_end: datetime | None  # UTC; None when billing_period_end does not parse
    paid: bool | None
    overdue: bool | None
    extra_fields: tuple[str, ...]  # fields beyond the 2025 document (sorted)
    string_total: bool  # `total` came as a decimal string

    def is_final(self, now: datetime) -> bool:
        """A closed period that, when PlanetScale says so, is paid and not overdue."""
        if self.period_end is None or self.period_end > now:
            return False
        return self.paid is not False and self.overdue is not True


def check_invoice(body: bytes, *, strict: bool, invoice_id: str) -> InvoiceFacts:
    """Validate an upstream 200 body for `invoice_id`; raise InvalidInvoice naming what is wrong.

    Valid is RFC 8259 JSON in UTF-8 that every client reads the same way: no NaN or
    Infinity, every number a finite double, no duplicate key, at most `MAX_DEPTH`
    levels; then the schema's fields, and the id that was asked for.
    """
    data = _strict_json(body)
    if not isinstance(data, dict):
        raise InvalidInvoice("the body is not a JSON object")
    for name, kind in REQUIRED.items():
        if name not in data:
            raise InvalidInvoice(f"field {name!r} is missing")
        if not isinstance(data[name], kind):
            raise InvalidInvoice(f"field {name!r} is not a string")
    if data["id"] != invoice_id:
        raise InvalidInvoice("field 'id' is not the requested invoice's")
    if "total" not in data:
        raise InvalidInvoice("field 'total' is missing")
    total = data["total"]
    string_total = False
    if isinstance(total, str):
        if strict or not _DECIMAL.fullmatch(total):
            raise InvalidInvoice("field 'total' is not a number")
        string_total = True
    elif isinstance(total, bool) or not isinstance(total, int | float):
        raise InvalidInvoice("field 'total' is not a number")
    extra = tuple(sorted(k for k in data if k not in REQUIRED and k != "total"))
    if extra and strict:
        raise InvalidInvoice(f"unexpected fields: {', '.join(_safe_names(extra))}")
    for name, kind in KNOWN_DRIFT.items():
        if name in data and not isinstance(data[name], kind):
            raise InvalidInvoice(f"field {name!r} is not a boolean")
    return InvoiceFacts(
        period_end=parse_period_end(data["billing_period_end"]),
        paid=data.get("paid"),
        overdue=data.get("overdue"),
        extra_fields=extra,
        string_total=string_total,
    )


def _strict_json(body: bytes) -> Any:
    try:
        # Not json.loads(bytes): that also guesses UTF-16 and UTF-32; RFC 8259 is UTF-8.
        text = body.decode("utf-8")
        data = json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_finite_int,
            object_pairs_hook=_unique_keys,
        )
    except InvalidInvoice:
        raise
    except (ValueError, RecursionError):
        # ValueError covers UnicodeDecodeError, JSONDecodeError and int()'s digit limit.
        raise InvalidInvoice("the body is not valid JSON") from None
    if _too_deep(data):
        raise InvalidInvoice(f"the body nests deeper than {MAX_DEPTH} levels")
    return data


def _no_constant(_name: str) -> Any:
    raise InvalidInvoice("the body holds NaN or Infinity, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a finite literal no client can hold
        raise InvalidInvoice("the body holds a number beyond the range of a double")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    # The same rule as for a float: every number must fit a double, so a huge integer
    # is refused wherever it sits (int() itself refuses beyond 4300 digits).
    if len(text) > 300:
        try:
            float(value)
        except OverflowError:
            raise InvalidInvoice("the body holds a number beyond the range of a double") from None
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        # Parsers disagree on which duplicate wins: the id checked here might not be
        # the id a caller reads.
        raise InvalidInvoice("the body repeats a key")
    return data


def _too_deep(data: Any) -> bool:
    level: list[Any] = [data] if isinstance(data, dict | list) else []
    for _ in range(MAX_DEPTH):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _safe_names(names: tuple[str, ...]) -> list[str]:
    # Field names come from upstream: bound what reaches an error message or a log.
    return [repr(n[:40]) for n in names[:10]]


def safe_field_names(names: tuple[str, ...]) -> list[str]:
    return [n[:40] for n in names[:10]]


def parse_period_end(value: str) -> datetime | None:
    """An ISO 8601 timestamp or date, in UTC; a bare date covers that whole day (UTC).

    None (the period counts as open) when it does not parse, or when it lies where
    datetime cannot compute: the day after 9999-12-31, or an offset that moves it
    before year 1 or after year 9999.
    """
    try:
        if len(value) == 10:
            day = datetime.fromisoformat(value)
            return day.replace(tzinfo=UTC) + timedelta(days=1)
        moment = datetime.fromisoformat(value)
        # In UTC, so comparing it with the time now does no offset arithmetic.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
