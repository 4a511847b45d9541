"""The quality gates' suites: one list of Great Expectations expectations per artifact
kind (`suite_checks`), and the derived columns computed in Arrow before GX sees a batch
(`derive`): what cannot be seen inside one batch of a stream (an id repeated across
batches, an id that exists upstream, an eval prompt among training rows, a list
column's order). distillflow/audit/quality.py runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillflow.audit.disjoint import in_eval
from distillflow.base import records
from distillflow.base.params import check

Kind = Literal["prompt", "generation", "pair", "curated", "topk"]
KINDS: dict[str, pa.Schema] = {
    "prompt": records.PROMPT_SCHEMA,
    "generation": records.GENERATION_SCHEMA,
    "pair": records.PAIR_SCHEMA,
    "curated": records.PAIR_SCHEMA,
    "topk": records.TOPK_SCHEMA,
}


@dataclass(frozen=True, kw_only=True)
class QualityParams:
    """params.yaml `quality`: the gates' thresholds."""

    min_prompt_chars: int  # a prompt shorter than this is a row failure
    max_prompt_chars: int  # a prompt longer than this is a row failure
    max_response_tokens: int  # a generation longer than this is a row failure (an engine bug)
    max_truncated_share: float  # teacher generations that hit max_new_tokens; above: the stage stops
    max_duplicate_share: float  # pairs repeating (prompt, chosen, rejected); above: the stage stops
    max_quarantine_share: float  # rows a quarantining gate may drop; above: the stage stops
    data_docs: bool  # render GX Data Docs into reports/quality/<stage>/
    batch_rows: int  # rows per validated batch (GX copies each batch to pandas)

    def __post_init__(self) -> None:
        check(self.min_prompt_chars >= 1, "min_prompt_chars", "must be >= 1")
        check(self.max_prompt_chars >= self.min_prompt_chars, "max_prompt_chars", "must be >= min_prompt_chars")
        check(self.max_response_tokens >= 1, "max_response_tokens", "must be >= 1")
        for name in ("max_truncated_share", "max_duplicate_share", "max_quarantine_share"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        check(self.batch_rows >= 1, "batch_rows", "must be >= 1")


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


def _list_parts(batch: pa.RecordBatch, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One list column of `batch` as numpy, without copying its values: (flat values of
    the batch's rows, offsets rebased to 0, per-row lengths with a null list counted as
    empty, per-row validity). A null list's segment (Arrow allows it to be non-empty)
    stays in `values`: callers mask what they find there with `valid`."""
    arr = batch.column(column)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"top-k column {column!r} must be a list column, got {arr.type}")
    offsets = arr.offsets.to_numpy()  # respects the batch's slice: n + 1 entries
    start, end = int(offsets[0]), int(offsets[-1])
    values = arr.values.slice(start, end - start)
    flat = values.to_numpy(zero_copy_only=False)  # zero-copy unless the values hold nulls
    if values.null_count:  # a missing entry fails like a non-finite one (the old Python check raised TypeError)
        flat = np.where(values.is_null().to_numpy(zero_copy_only=False), np.nan, flat)
    local = offsets.astype(np.int64) - start
    valid = np.ones(len(arr), dtype=bool) if not arr.null_count else arr.is_valid().to_numpy(zero_copy_only=False)
    return flat, local, np.where(valid, np.diff(local), 0), valid


def _rows_of(elements: np.ndarray, offsets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row: True where one of the flat `elements` indices falls in a (non-null) row's segment."""
    hit = np.zeros(len(valid), dtype=bool)
    hit[np.searchsorted(offsets, elements, side="right") - 1] = True
    return hit & valid


def _int_column(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """An integer column as int64, a null as 0 (the Python check's `x or 0`)."""
    return pc.fill_null(batch.column(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _topk_batch_flags(batch: pa.RecordBatch, vocab_size: int | None) -> dict[str, np.ndarray]:
    ids, id_off, id_len, id_valid = _list_parts(batch, "topk_ids")
    lps, lp_off, lp_len, lp_valid = _list_parts(batch, "topk_logprobs")
    target, t_off, t_len, t_valid = _list_parts(batch, "target_logprob")
    positions, k = _int_column(batch, "positions"), _int_column(batch, "k")

    finite = ~(
        _rows_of(np.flatnonzero(~np.isfinite(lps)), lp_off, lp_valid)
        | _rows_of(np.flatnonzero(~np.isfinite(target)), t_off, t_valid)
    )

    # sorted: entry i against entry i + 1 inside one row and one position (a chunk of k
    # entries from the row's start; the last chunk may be short); NaN compares unsorted
    pair = np.flatnonzero(~(lps[:-1] >= lps[1:]))
    row = np.searchsorted(lp_off, pair, side="right") - 1
    same_row = pair + 1 < lp_off[row + 1]
    pair, row = pair[same_row], row[same_row]
    kr = k[row]
    positive = kr > 0  # k null or <= 0: no chunks, nothing to compare
    pair, row, kr = pair[positive], row[positive], kr[positive]
    inside = (pair + 1 - lp_off[row]) % kr != 0
    unsorted = np.zeros(batch.num_rows, dtype=bool)
    unsorted[row[inside]] = True

    known = ids >= 0  # written so that a NaN (a null entry) fails
    if vocab_size is not None:
        known &= ids < vocab_size
    in_vocab = ~_rows_of(np.flatnonzero(~known), id_off, id_valid)

    n = positions * k
    lengths = (id_len == n) & (lp_len == n) & (t_len == positions)
    return {
        "topk__finite": finite,
        "topk__sorted": ~(unsorted & lp_valid),
        "topk__ids_in_vocab": in_vocab,
        "topk__lengths_match": lengths,
    }


def _topk_flags(batch: pa.Table, vocab_size: int | None) -> dict[str, pa.Array]:
    """Per row of a top-k batch, the TOPK_OK flags:
    - topk__finite: every top-k log-prob and every target log-prob is finite;
    - topk__sorted: the log-probs descend inside each position (chunks of k from the row's start);
    - topk__ids_in_vocab: every id in [0, vocab_size) (>= 0 when the vocabulary is unknown);
    - topk__lengths_match: positions * k ids and log-probs, positions targets.
    A null list counts as empty, a null positions or k as 0; a null entry inside a list
    (the Python version raised TypeError) is read as NaN: a log-prob fails finite, and
    sorted against a neighbour in its position; an id fails ids_in_vocab.

    Computed in numpy on the flat list values and offsets (zero-copy views of the Arrow
    buffers), with index arrays only for the failing entries: memory is a few bytes per
    entry on top of the batch's own Arrow data, not Python objects per entry.
    """
    parts = [_topk_batch_flags(b, vocab_size) for b in batch.to_batches() if b.num_rows]
    return {
        name: pa.array(np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype=bool))
        for name in TOPK_OK
    }


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
