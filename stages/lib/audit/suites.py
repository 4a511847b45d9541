"""The quality gates' suites: one list of Great Expectations expectations per artifact
kind (`suite_checks`), and the derived columns computed in Arrow before GX sees a batch
(`derive`): what cannot be seen inside one batch of a stream (an id repeated across
batches, an id that exists upstream, an eval prompt among training rows, a list
column's order). stages/lib/audit/quality.py runs them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from stages.lib.audit.disjoint import in_eval
from stages.lib.data import records

if TYPE_CHECKING:
    from stages.lib.audit.quality import QualityParams

Kind = Literal["prompt", "generation", "pair", "curated", "topk"]
KINDS: dict[str, pa.Schema] = {
    "prompt": records.PROMPT_SCHEMA,
    "generation": records.GENERATION_SCHEMA,
    "pair": records.PAIR_SCHEMA,
    "curated": records.PAIR_SCHEMA,
    "topk": records.TOPK_SCHEMA,
}


@dataclass(frozen=True)
class Check:
    expectation: str  # a great_expectations.expectations class name
    kwargs: dict[str, Any]
    level: Literal["row", "table"]

    @property
    def label(self) -> str:
        col = self.kwargs.get("column") or ",".join(self.kwargs.get("column_list", [])) or "table"
        return f"{_snake(self.expectation)}:{col}" + (":share" if "mostly" in self.kwargs else "")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _row(expectation: str, **kwargs: Any) -> Check:
    return Check(expectation, kwargs, "row")


def _table(expectation: str, **kwargs: Any) -> Check:
    return Check(expectation, kwargs, "table")


# Derived columns (computed in Arrow before GX sees a batch); see `derive`.
FIRST = "{}__first_occurrence"  # False where the id was already seen in this artifact
EXISTS = "{}__exists_upstream"  # False where the id is not among the upstream ids
IN_EVAL = "prompt_id__in_eval"  # True where a training row's prompt is an eval prompt
DUPLICATE = "content__duplicate"  # True where (prompt_id, chosen, rejected) repeats
TOPK_OK = {"topk__finite": True, "topk__sorted": True, "topk__ids_in_vocab": True, "topk__lengths_match": True}


def _prompt_checks(q: QualityParams, refs: dict[str, Any]) -> list[Check]:
    checks = [
        _row("ExpectColumnValuesToBeInSet", column=FIRST.format("prompt_id"), value_set=[True]),
        _row(
            "ExpectColumnValueLengthsToBeBetween",
            column="prompt",
            min_value=q.min_prompt_chars,
            max_value=q.max_prompt_chars,
        ),
        _row("ExpectColumnValuesToBeInSet", column="split", value_set=["train", "eval"]),
    ]
    if "eval" in refs:
        checks.append(_table("ExpectColumnValuesToBeInSet", column=IN_EVAL, value_set=[False]))
    return checks


def _generation_checks(q: QualityParams, refs: dict[str, Any], truncation: bool) -> list[Check]:
    checks = [
        _row("ExpectColumnValuesToBeInSet", column=FIRST.format("generation_id"), value_set=[True]),
        _row("ExpectColumnValuesToBeInSet", column="finish_reason", value_set=["stop", "length"]),
        _row("ExpectColumnValuesToBeBetween", column="response_tokens", min_value=0, max_value=q.max_response_tokens),
    ]
    if truncation:  # share of truncated generations: `mostly` is the share that must have stopped
        checks.append(
            _table(
                "ExpectColumnValuesToBeInSet",
                column="finish_reason",
                value_set=["stop"],
                mostly=1.0 - q.max_truncated_share,
            )
        )
    if "prompt_id" in refs:
        checks.append(_row("ExpectColumnValuesToBeInSet", column=EXISTS.format("prompt_id"), value_set=[True]))
    return checks


def _pair_checks(kind: str, q: QualityParams, refs: dict[str, Any]) -> list[Check]:
    checks = [
        _row("ExpectColumnValuesToBeInSet", column=FIRST.format("pair_id"), value_set=[True]),
        _row(
            "ExpectColumnValueLengthsToBeBetween",
            column="prompt",
            min_value=q.min_prompt_chars,
            max_value=q.max_prompt_chars,
        ),
        _row("ExpectColumnValuesToBeBetween", column="chosen_tokens", min_value=0, max_value=q.max_response_tokens),
        _row("ExpectColumnValuesToBeBetween", column="rejected_tokens", min_value=0, max_value=q.max_response_tokens),
        _table("ExpectColumnValuesToBeInSet", column=DUPLICATE, value_set=[False], mostly=1.0 - q.max_duplicate_share),
    ]
    checks += [
        _row("ExpectColumnValuesToBeInSet", column=EXISTS.format(c), value_set=[True])
        for c in ("prompt_id", "chosen_id", "rejected_id")
        if c in refs
    ]
    if "eval" in refs:
        checks.append(_table("ExpectColumnValuesToBeInSet", column=IN_EVAL, value_set=[False]))
    if kind == "curated":
        checks.append(
            _table(
                "ExpectColumnValuesToBeInSet",
                column="chosen_finish_reason",
                value_set=["stop"],
                mostly=1.0 - q.max_truncated_share,
            )
        )
    return checks


def _topk_checks(refs: dict[str, Any]) -> list[Check]:
    checks = [
        _row("ExpectColumnValuesToBeInSet", column="side", value_set=["chosen", "rejected"]),
        _row("ExpectColumnValuesToBeBetween", column="k", min_value=1),
        *[_row("ExpectColumnValuesToBeInSet", column=c, value_set=[True]) for c in TOPK_OK],
    ]
    if "pair_id" in refs:
        checks.append(_row("ExpectColumnValuesToBeInSet", column=EXISTS.format("pair_id"), value_set=[True]))
    return checks


def suite_checks(kind: str, q: QualityParams, refs: dict[str, Any], truncation: bool = True) -> list[Check]:
    """The expectations for one artifact kind. `refs` names the upstream id sets the
    gate was given (referential integrity is checked only against what is known);
    `truncation` False skips the truncated-share limit (the student's generations:
    a weak student running to max_new_tokens is the signal distillation works on)."""
    schema = KINDS[kind]
    cols = [f.name for f in schema] + derived_names(kind, refs)
    checks = [_table("ExpectTableColumnsToMatchSet", column_set=cols, exact_match=True)]
    checks += [
        _row("ExpectColumnValuesToNotBeNull", column=f.name)
        for f in schema
        if not f.nullable and not pa.types.is_list(f.type)
    ]
    if kind == "prompt":
        checks += _prompt_checks(q, refs)
    elif kind == "generation":
        checks += _generation_checks(q, refs, truncation)
    elif kind in ("pair", "curated"):
        checks += _pair_checks(kind, q, refs)
    elif kind == "topk":
        checks += _topk_checks(refs)
    labels = [c.label for c in checks]
    if len(set(labels)) != len(labels):
        raise AssertionError(f"suite {kind}: two checks share a label: {labels}")
    return checks


def derived_names(kind: str, refs: dict[str, Any]) -> list[str]:
    """The derived columns `derive` appends for this kind, in order."""
    names = [FIRST.format(c) for c in [ID_COLUMN.get(kind)] if c is not None]
    names += [EXISTS.format(c) for c in refs if c != "eval"]
    names += [IN_EVAL] if "eval" in refs else []
    names += [DUPLICATE] if kind in ("pair", "curated") else []
    names += list(TOPK_OK) if kind == "topk" else []
    return names


ID_COLUMN = {"prompt": "prompt_id", "generation": "generation_id", "pair": "pair_id", "curated": "pair_id"}


def _first_occurrence(values: list[str | None], seen: set[int]) -> list[bool]:
    out = []
    for v in values:
        if v is None:
            out.append(True)  # a null id is the not-null expectation's failure, not this one's
            continue
        key = records.short_digest(v)
        out.append(key not in seen)
        seen.add(key)
    return out


def _topk_flags(batch: pa.Table, vocab_size: int | None) -> dict[str, list[bool]]:
    flags: dict[str, list[bool]] = {name: [] for name in TOPK_OK}
    for ids, lps, target, positions, k in zip(
        *(batch.column(c).to_pylist() for c in ("topk_ids", "topk_logprobs", "target_logprob", "positions", "k")),
        strict=True,
    ):
        ids, lps, target = ids or [], lps or [], target or []
        flags["topk__finite"].append(all(math.isfinite(x) for x in lps) and all(math.isfinite(x) for x in target))
        rows = [lps[i : i + k] for i in range(0, len(lps), k)] if k and k > 0 else []
        flags["topk__sorted"].append(all(a >= b for row in rows for a, b in itertools.pairwise(row)))
        flags["topk__ids_in_vocab"].append(
            all(0 <= t < vocab_size for t in ids) if vocab_size is not None else all(t >= 0 for t in ids)
        )
        n = (positions or 0) * (k or 0)
        flags["topk__lengths_match"].append(len(ids) == n and len(lps) == n and len(target) == (positions or 0))
    return flags


@dataclass
class _State:
    seen: dict[str, set[int]] = field(default_factory=dict)  # records.short_digest of ids
    contents: set[int] = field(default_factory=set)


def derive(kind: str, batch: pa.Table, refs: dict[str, Any], state: _State, vocab_size: int | None) -> pa.Table:
    """`batch` plus the derived columns its suite checks."""
    id_col = ID_COLUMN.get(kind)
    extra: dict[str, pa.Array | list[bool]] = {}
    if id_col is not None:
        extra[FIRST.format(id_col)] = _first_occurrence(
            batch.column(id_col).to_pylist(), state.seen.setdefault(id_col, set())
        )
    for col, ids in refs.items():
        if col != "eval":
            extra[EXISTS.format(col)] = pc.fill_null(pc.is_in(batch.column(col), value_set=ids), True)
    if "eval" in refs:
        extra[IN_EVAL] = in_eval(batch.column("prompt_id"), refs["eval"])
    if kind in ("pair", "curated"):
        dup = []
        for key in zip(*(batch.column(c).to_pylist() for c in ("prompt_id", "chosen", "rejected")), strict=True):
            digest = records.short_digest(*(k or "" for k in key))
            dup.append(digest in state.contents)
            state.contents.add(digest)
        extra[DUPLICATE] = dup
    if kind == "topk":
        extra.update(_topk_flags(batch, vocab_size))
    for name, values in extra.items():
        batch = batch.append_column(name, pa.array(values, type=pa.bool_()) if isinstance(values, list) else values)
    return batch
