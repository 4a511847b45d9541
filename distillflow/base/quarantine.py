"""One shape for every rejected row, in every stage.

A quarantine file holds the rejected rows with the columns of the artifact they would
have joined (all nullable: a row rejected for a null field must fit) plus `reason`,
and its schema is named `<kind>_quarantine` (Parquet metadata `distillflow.schema`):

- prompt_quarantine (records.PROMPT_SCHEMA + reason): seed's rejected source rows and
  synthesised prompts, pairs' prompts that could not be paired;
- pair_quarantine (records.PAIR_SCHEMA + reason): curate's filtered pairs and the rows
  its input gate rejected.

A reason is a code, optionally with the field or check it concerns after a colon:
`empty_prompt`, `missing_field:prompt`, `synthesis:truncated`,
`gate:expect_column_values_to_not_be_null:chosen`. When a stage is left with nothing,
`nothing_left` names the top reasons with their counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from distillflow.base import records

PROMPT_SCHEMA: pa.Schema = records.with_reason(records.PROMPT_SCHEMA, "prompt_quarantine")
PAIR_SCHEMA: pa.Schema = records.PAIR_QUARANTINE_SCHEMA  # records.with_reason(PAIR_SCHEMA, "pair_quarantine")


def row(record: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """A quarantine row: the record's columns plus the reason it was rejected."""
    return {**record, "reason": reason}


def prompt_row(
    reason: str,
    *,
    source: str,
    source_ref: str,
    prompt: str | None,
    prompt_id: str | None = None,
    reference: str | None = None,
    category: str | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """A prompt_quarantine row for a prompt that never became one (no split yet)."""
    record = {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "split": None,
        "reference": reference,
        "category": category,
        "source": source,
        "source_ref": source_ref,
        "group": group,
    }
    return row(record, reason)


def reason_text(reason: str) -> str:
    """A reason as an error message says it: `missing_field:prompt` -> missing field 'prompt'."""
    code, _, detail = reason.partition(":")
    if code == "missing_field" and detail:
        return f"missing field {detail!r}"
    return reason


def top_reasons(reasons: Mapping[str, int], n: int = 3) -> str:
    """The `n` most frequent reasons with their counts, most frequent first (ties by name):
    "missing field 'prompt' (40), empty_prompt (2)"; "and k more" when there are more."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{reason_text(r)} ({c})" for r, c in ranked[:n])
    rest = len(ranked) - n
    return shown + (f", and {rest} more reason{'s' if rest > 1 else ''}" if rest > 0 else "")


def nothing_left(
    where: str, total: int, reasons: Mapping[str, int], unit: str = "rows", fields: Iterable[str] = ()
) -> str:
    """The error of a stage left with nothing: what it read, why each row went, and for a
    missing field, the fields the rows do have."""
    if not total:
        return f"{where}: the file has no {unit}"
    msg = f"{where}: 0 of {total} {unit} usable: {top_reasons(reasons)}"
    have = list(dict.fromkeys(fields))
    if have:
        msg += f"; rows have fields: {', '.join(have)}"
    return msg


def counted(rows: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Reasons and their counts in quarantine rows."""
    return Counter(r["reason"] for r in rows)
