"""The upstream contract: PlanetScale's own OpenAPI document (../shared) against our check.

Strict mode must accept exactly what the document's schema accepts; the default mode
must accept that and the known drift besides. jsonschema is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.invoice import InvalidInvoice, check_invoice
from proxy.standin import make_invoice

CONTRACT = (
    Path(__file__).resolve().parents[2] / "shared" / "planetscale" / "get_invoice.openapi.yaml"
)


def invoice_schema() -> dict[str, Any]:
    assert CONTRACT.is_file(), f"the upstream contract is missing: {CONTRACT}"
    document = yaml.safe_load(CONTRACT.read_text())
    operation = document["paths"]["/organizations/{organization}/invoices/{id}"]["get"]
    schema: dict[str, Any] = operation["responses"]["200"]["content"]["application/json"]["schema"]
    return schema


SCHEMA = invoice_schema()
VALIDATOR = jsonschema.Draft4Validator(SCHEMA)


def accepted(body: Any, strict: bool) -> bool:
    # The document cannot say which id was asked for: the body's own id is.
    invoice_id = body.get("id") if isinstance(body, dict) else None
    try:
        check_invoice(
            json.dumps(body).encode(),
            strict=strict,
            invoice_id=invoice_id if isinstance(invoice_id, str) else "inv_1",
        )
    except InvalidInvoice:
        return False
    return True


def test_the_stand_in_serves_the_documented_schema() -> None:
    for invoice_id in ("inv_1", "open-2", "x" * 64):
        VALIDATOR.validate(make_invoice(invoice_id))


def test_the_path_and_fields_we_rely_on_are_in_the_document() -> None:
    assert set(SCHEMA["required"]) == {"id", "total", "billing_period_start", "billing_period_end"}
    assert SCHEMA["additionalProperties"] is False
    assert SCHEMA["properties"]["total"]["type"] == "number"


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(["12.50", "-3", "2025-02-01T00:00:00Z"]),
    st.lists(st.integers(), max_size=2),
)
field_names = st.sampled_from(
    ["id", "total", "billing_period_start", "billing_period_end", "paid", "overdue", "extra"]
)
bodies = st.one_of(
    st.dictionaries(field_names, values, max_size=7),
    st.builds(
        lambda base, extra: {**base, **extra},
        st.fixed_dictionaries(
            {
                "id": st.text(max_size=8),
                "total": st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
                "billing_period_start": st.text(max_size=24),
                "billing_period_end": st.text(max_size=24),
            }
        ),
        st.dictionaries(field_names, values, max_size=2),
    ),
    values,
)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_strict_mode_accepts_exactly_what_the_document_accepts(body: Any) -> None:
    assert accepted(body, strict=True) == VALIDATOR.is_valid(body), body


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_default_mode_accepts_everything_the_document_accepts(body: Any) -> None:
    if VALIDATOR.is_valid(body):
        assert accepted(body, strict=False)
