"""The invoice body: the check against PlanetScale's schema, and the facts the cache needs.

The upstream contract (`get_invoice.openapi.yaml`, 2025) allows exactly four fields
and a number `total`. PlanetScale has since added `paid` and `overdue` booleans and
may send `total` as a decimal string. By default that drift is accepted and the body
passes unchanged; `strict=True` enforces the document exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

REQUIRED: dict[str, type] = {
    "id": str,
    "billing_period_start": str,
    "billing_period_end": str,
}
KNOWN_DRIFT: dict[str, type] = {"paid": bool, "overdue": bool}
_DECIMAL = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?")


class InvalidInvoice(Exception):
    """The body breaks the schema; the message names the rule, never the body."""


@dataclass(frozen=True, slots=True)
class InvoiceFacts:
    """What the cache needs to know of a valid invoice, read once when it is fetched."""

    period_end: datetime | None  # None when billing_period_end does not parse
    paid: bool | None
    overdue: bool | None
    extra_fields: tuple[str, ...]  # fields beyond the 2025 document (sorted)
    string_total: bool  # `total` came as a decimal string

    def is_final(self, now: datetime) -> bool:
        """A closed period that, when PlanetScale says so, is paid and not overdue."""
        if self.period_end is None or self.period_end > now:
            return False
        return self.paid is not False and self.overdue is not True


def check_invoice(body: bytes, *, strict: bool) -> InvoiceFacts:
    """Validate an upstream 200 body; raise InvalidInvoice naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInvoice("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInvoice("the body is not a JSON object")
    for name, kind in REQUIRED.items():
        if name not in data:
            raise InvalidInvoice(f"field {name!r} is missing")
        if not isinstance(data[name], kind):
            raise InvalidInvoice(f"field {name!r} is not a string")
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


def _safe_names(names: tuple[str, ...]) -> list[str]:
    # Field names come from upstream: bound what reaches an error message or a log.
    return [repr(n[:40]) for n in names[:10]]


def safe_field_names(names: tuple[str, ...]) -> list[str]:
    return [n[:40] for n in names[:10]]


def parse_period_end(value: str) -> datetime | None:
    """An ISO 8601 timestamp or date; a bare date covers that whole day (UTC)."""
    try:
        if len(value) == 10:
            day = datetime.fromisoformat(value)
            return day.replace(tzinfo=UTC) + timedelta(days=1)
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
