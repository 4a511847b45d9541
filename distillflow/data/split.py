"""The prompt sets, train and eval, disjoint by construction (the seed stage's logic).

Every prompt is normalised (NFC, whitespace collapsed) and gets a content id. Empty
prompts, over-long prompts, prompts of the wrong type and duplicates go to quarantine
(distillflow/base/quarantine.py's prompt_quarantine shape) with the reason. The split
is a hash of the prompt's group (seed.group_by: the toy task's instance, a file's group
column) or, ungrouped, of its prompt id (records.split_key, split_of), the same
function bootstrap uses, so no eval prompt, nor another phrasing or turn of its group,
can be a training prompt. Deduplication stays by prompt id. A group is never divided:
a prompt whose split's quota is full is unused, not moved to the other split. Counts
reconcile: read = train + eval + quarantined + unused_over_quota + reserved_for_sft
(bootstrap's student SFT bucket, toy source only).
"""

from __future__ import annotations

import math

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.base import quarantine as q
from distillflow.base.config import TaskParams
from distillflow.base import records
from distillflow.base.io import DataError
from distillflow.data.sources import Raw, SeedParams
from distillflow.base.stream import ParquetSink, RowSink
from distillflow.data.synthesis import FEW_SHOT_POOL, Generate, Pool, synthesise

# Rows per Parquet row group. Outputs up to this size are one row group, the layout
# (and bytes) io.write_table gave before seed streamed; larger ones are several.
BATCH_ROWS = 65_536
QUARANTINE_SCHEMA = q.PROMPT_SCHEMA


@dataclass
class SeedResult:
    counts: dict[str, Any]
    seen: set[bytes]  # 16-byte ids of every valid source prompt (kept or over quota)
    pool: Pool | None


def _reason(p: SeedParams, raw: Any, error: str | None) -> tuple[str | None, str]:
    """(drop reason or None, normalised text) of one raw row."""
    if error is not None:
        return error, ""  # the reader's own reason (invalid_json, missing_field, ...)
    if not isinstance(raw, str):
        return ("not_a_string" if raw is not None else "null_prompt"), ""
    text = records.normalise_prompt(raw)
    if not text:
        return "empty_prompt", text
    if len(text) > p.max_prompt_chars:
        return "prompt_too_long", text
    return None, text


@dataclass(kw_only=True)
class _Tally:
    read: int = 0
    unused: int = 0
    reserved: int = 0
    train: int = 0
    eval: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    fields: dict[str, None] = field(default_factory=dict)  # fields of rows missing the prompt field, in order
    grouped: int = 0  # usable rows with a group (seed.group_by set)
    ungrouped: int = 0  # usable rows without one: an error once reading stops
    ungrouped_first: str | None = None  # the first of them (its source_ref)
    ungrouped_fields: dict[str, None] = field(default_factory=dict)  # the fields those rows have, in order

    def reasons_text(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common(3)) or "no rows"

    def full(self, p: SeedParams) -> bool:
        return self.train >= p.num_train and self.eval >= p.num_eval

    def counts(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "train": self.train,
            "eval": self.eval,
            "quarantined": sum(self.reasons.values()),
            "unused_over_quota": self.unused,
            "reserved_for_sft": self.reserved,
            "dropped_by_reason": dict(sorted(self.reasons.items())),
        }


def _check_groups(p: SeedParams, t: _Tally) -> None:
    """With seed.group_by, every usable row read has a group: otherwise the count of rows
    without one, the first, and when none had it the fields rows do have. Rows
    quarantined for another reason (invalid JSON, an empty prompt, ...) need none."""
    if not t.ungrouped:
        return
    msg = (
        f"{p.source.where()}: seed.group_by column {p.group_by!r} is null or missing in {t.ungrouped} of {t.read} "
        f"rows read (first at {t.ungrouped_first}); every row needs a group"
    )
    if not t.grouped:
        msg += f"; no row read has one; rows have fields: {', '.join(t.ungrouped_fields)}"
    raise DataError(msg)


def _check_not_empty(task: TaskParams, p: SeedParams, t: _Tally) -> None:
    """Both sets need a prompt; when none is usable, say why (top reasons, the fields rows
    have), and for an empty eval set how many prompts the eval fraction needs."""
    if t.train and t.eval:
        return
    if not t.train and not t.eval and not t.unused:
        raise DataError(q.nothing_left(p.source.where(), t.read, t.reasons, fields=t.fields))
    usable = t.train + t.eval + t.unused
    if p.eval_source is not None and not t.eval:
        raise DataError(f"seed.eval_source {p.eval_source.where()}: no usable eval prompt ({t.reasons_text()})")
    msg = f"{p.source.where()}: {usable} of {t.read} rows usable, giving {t.train} train and {t.eval} eval prompts; "
    if not t.eval:
        f = task.eval_fraction
        unit = "prompt" if p.group_by is None else f"group (seed.group_by {p.group_by!r})"
        units = "usable prompts" if p.group_by is None else "groups"
        msg += (
            f"task.eval_fraction {f} sends about one {unit} in {1 / f:.0f} to eval, so about {math.ceil(3 / f)} "
            f"{units} give at least one eval prompt with 95% probability; add prompts, raise "
            "task.eval_fraction, or name a held-out set in seed.eval_source"
        )
    else:
        msg += "both sets need at least one"
    raise DataError(msg)


def _prompt_row(kind: str, r: Raw, pid: str, text: str, split: str) -> dict[str, Any]:
    return {
        "prompt_id": pid,
        "prompt": text,
        "split": split,
        "reference": r.reference,
        "category": r.category,
        "source": kind,
        "source_ref": r.source_ref,
        "group": r.group,
    }


def stream(
    task: TaskParams,
    p: SeedParams,
    rows: Iterator[Raw],
    train: RowSink,
    evals: RowSink,
    quarantine: RowSink,
    pool: Pool | None = None,
    eval_rows: Iterator[Raw] | None = None,
) -> SeedResult:
    """Stream `rows` into the train, eval and quarantine sinks, in source order.

    Memory is the dedup set (16 bytes of id per valid prompt) plus the sinks'
    buffers. Reading stops once both quotas are full; a toy stream is endless, so it
    gives up after 50x the quota with an error instead of looping forever. Each id is
    kept at most once and its split is a function of its group (or, ungrouped, of the
    id: records.split_key), so no prompt, nor any group, can be in both sets. With
    seed.group_by set, a usable row without a group is a DataError once reading stops
    (naming how many; the sinks are left unfinished, so nothing is written). With
    `eval_rows` (seed.eval_source) those are the eval prompts, read first, and every
    valid row of `rows` is a train prompt unless it is an eval prompt (quarantined as
    eval_prompt). `pool`, when given, samples the train prompts for synthesis.
    """
    if (eval_rows is None) != (p.eval_source is None):
        raise ValueError("split.stream: pass eval_rows exactly when seed.eval_source is set")
    seen: set[bytes] = set()
    held_out: set[bytes] = set()
    t = _Tally()
    if eval_rows is not None:
        assert p.eval_source is not None
        for r in eval_rows:
            if t.eval >= p.num_eval:
                break
            taken = _take(p, r, t, seen, held_out, quarantine, p.eval_source.kind)
            if taken is not None:
                evals.write([_prompt_row(p.eval_source.kind, r, taken[0], taken[1], "eval")])
                t.eval += 1
        held_out, seen = seen, set()
    limit = 50 * (p.num_train + p.num_eval) if p.source.kind == "toy" else None
    for r in rows:
        if t.full(p) or (eval_rows is not None and t.train >= p.num_train):
            break
        if limit is not None and t.read >= limit:
            raise ValueError(
                f"seed: the toy task yielded only {t.train} train / {t.eval} eval distinct prompts in {t.read} draws; "
                "widen `task` or lower seed.num_train / seed.num_eval"
            )
        taken = _take(p, r, t, seen, held_out, quarantine, p.source.kind)
        if taken is None:
            continue
        pid, text = taken
        if p.group_by is not None:
            if r.group is None:
                t.ungrouped += 1
                t.ungrouped_first = t.ungrouped_first or r.source_ref
                t.ungrouped_fields.update(dict.fromkeys(r.fields))
                continue
            t.grouped += 1
        sft = task.sft_fraction if p.source.kind == "toy" else 0.0
        key = records.split_key(pid, r.group)
        split = "train" if eval_rows is not None else records.split_of(key, task.eval_fraction, sft)
        if split == "sft":
            t.reserved += 1  # bootstrap's student SFT data: never a distillation prompt
            continue
        if (split == "eval" and t.eval >= p.num_eval) or (split == "train" and t.train >= p.num_train):
            t.unused += 1  # valid, but its split's quota is already full
            continue
        (evals if split == "eval" else train).write([_prompt_row(p.source.kind, r, pid, text, split)])
        if split == "eval":
            t.eval += 1
        else:
            t.train += 1
            if pool is not None:
                pool.offer(pid, text)
    _check_groups(p, t)
    _check_not_empty(task, p, t)
    return SeedResult(t.counts(), seen | held_out, pool)


def _take(
    p: SeedParams, r: Raw, t: _Tally, seen: set[bytes], held_out: set[bytes], quarantine: RowSink, kind: str
) -> tuple[str, str] | None:
    """(prompt id, normalised text) of a usable row, counted as read; None when the row
    is quarantined (with its reason: unusable, a duplicate, or an eval prompt of
    seed.eval_source offered as a train prompt)."""
    t.read += 1
    reason, text = _reason(p, r.value, r.error)
    pid = records.prompt_id(text) if reason is None else None
    key = bytes.fromhex(pid) if pid is not None else b""
    if pid is not None and key in held_out:
        reason = "eval_prompt"
    elif pid is not None and key in seen:
        reason = "duplicate_prompt"
    if reason is not None:
        t.reasons[reason] += 1
        if reason.startswith("missing_field:"):
            t.fields.update(dict.fromkeys(r.fields))
        raw_text = r.value if isinstance(r.value, str) else None
        quarantine.write(
            [
                q.prompt_row(
                    reason,
                    source=kind,
                    source_ref=r.source_ref,
                    prompt=raw_text,
                    prompt_id=pid,
                    reference=r.reference,
                    category=r.category,
                    group=r.group,
                )
            ]
        )
        return None
    assert pid is not None
    seen.add(key)
    return pid, text


class ListSink:
    """A RowSink that keeps its rows in a list: for small sets and tests."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.rows = 0

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table | pa.RecordBatch) -> None:
        new = rows.to_pylist() if isinstance(rows, (pa.Table, pa.RecordBatch)) else list(rows)
        self.items.extend(new)
        self.rows += len(new)


def prompt_sets(
    task: TaskParams, p: SeedParams, rows: Iterator[Raw], eval_rows: Iterator[Raw] | None = None
) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """`stream` into lists: (train, eval, quarantine, counts). For small sets (tests,
    other stages' fixtures, a comparison cell); the seed stage streams to Parquet."""
    train, evals, quarantine = ListSink(), ListSink(), ListSink()
    result = stream(task, p, rows, train, evals, quarantine, eval_rows=eval_rows)
    return train.items, evals.items, quarantine.items, result.counts


def stream_to(
    folder: Path,
    task: TaskParams,
    p: SeedParams,
    rows: Iterator[Raw],
    synth: tuple[Generate, str] | None = None,
    batch_rows: int = BATCH_ROWS,
    eval_rows: Iterator[Raw] | None = None,
) -> tuple[SeedResult, dict[str, int]]:
    """`stream` into folder/{train,eval,quarantine}.parquet, then, given `synth`
    (generate, model fingerprint), append synthesised prompts to train and their
    rejections to quarantine; (result, rows per file). Synthesis counts land in
    result.counts["synthesis"]."""
    with (
        ParquetSink(folder / "train.parquet", records.PROMPT_SCHEMA, batch_rows) as train,
        ParquetSink(folder / "eval.parquet", records.PROMPT_SCHEMA, batch_rows) as evals,
        ParquetSink(folder / "quarantine.parquet", QUARANTINE_SCHEMA, batch_rows) as quarantine,
    ):
        pool = Pool(FEW_SHOT_POOL, p.synthesis.seed) if synth is not None else None
        result = stream(task, p, rows, train, evals, quarantine, pool, eval_rows)
        if synth is not None:
            assert pool is not None
            result.counts["synthesis"] = synthesise(task, p, result.seen, pool, synth[0], synth[1], train, quarantine)
    return result, {"train.parquet": train.rows, "eval.parquet": evals.rows, "quarantine.parquet": quarantine.rows}
