"""seed: the prompt sets, train and eval, disjoint by construction.

    python -m stages.seed --params params.yaml --out data/seed --metrics metrics/seed.json

Sources (params.yaml `seed.source.kind`):
- toy: the embedded task's generator (`task`), with ground-truth answers;
- jsonl / parquet: a local file, prompt text in `seed.source.field`;
- hf: a Hugging Face dataset (`path` = name, `config`, `split`, `revision`, `field`).

Every prompt is normalised (NFC, whitespace collapsed) and gets a content id. Empty
prompts, over-long prompts, prompts of the wrong type and duplicates go to
quarantine.parquet with the reason; the split is a hash of the prompt id
(records.split_of), the same function bootstrap uses, so an eval prompt can never be a
training prompt. Outputs: train.parquet, eval.parquet, quarantine.parquet,
manifest.json; counts reconcile: read = train + eval + quarantined + unused_over_quota.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from stages.lib import cli, lineage, params, records, toytask
from stages.lib.config import TaskParams
from stages.lib.io import DataError, atomic_dir, write_json
from stages.lib.params import check
from stages.lib.stream import ParquetSink, RowSink

log = logging.getLogger("seed")

# Rows per Parquet row group. Outputs up to this size are one row group, the layout
# (and bytes) io.write_table gave before seed streamed; larger ones are several.
BATCH_ROWS = 65_536

QUARANTINE_SCHEMA = records.schema(
    "prompt_quarantine",
    [
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=True),  # the raw value, when it is text
        pa.field("prompt_id", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
    ],
)


@dataclass(frozen=True)
class SourceParams:
    """params.yaml `seed.source`."""

    kind: Literal["toy", "jsonl", "parquet", "hf"]
    path: str | None  # file path (jsonl/parquet) or dataset name (hf)
    config: str | None  # hf dataset config
    split: str | None  # hf split
    revision: str | None  # hf dataset revision
    field: str | None  # the prompt column / key

    def __post_init__(self) -> None:
        if self.kind != "toy":
            check(self.path is not None, "path", f"source kind {self.kind!r} needs a path")
            check(self.field is not None, "field", f"source kind {self.kind!r} needs the prompt field name")
        if self.kind == "hf":
            check(self.split is not None, "split", "an hf source needs a split")


@dataclass(frozen=True)
class SeedParams:
    """params.yaml `seed`."""

    source: SourceParams
    seed: int  # toy generator seed
    num_train: int
    num_eval: int
    max_prompt_chars: int

    def __post_init__(self) -> None:
        check(self.num_train >= 1, "num_train", "must be >= 1")
        check(self.num_eval >= 1, "num_eval", "must be >= 1")
        check(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")


SECTIONS: dict[str, type] = {"task": TaskParams, "seed": SeedParams}
PARAMS = tuple(SECTIONS)

# A raw row: (source_ref, raw prompt value, reference answer, category, reader error)
Raw = tuple[str, Any, str | None, str | None, str | None]


def _toy_rows(task: TaskParams, seed: int) -> Iterator[Raw]:
    for i, ex in enumerate(toytask.generate(task.toy(), seed)):
        yield f"toy:seed={seed}:index={i}", ex.prompt, ex.answer, ex.skill, None


def _jsonl_rows(path: Path, field: str) -> Iterator[Raw]:
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            ref = f"{path}:line={n}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield ref, None, None, None, "invalid_utf8"
                continue
            except json.JSONDecodeError:
                yield ref, None, None, None, "invalid_json"
                continue
            if not isinstance(obj, dict) or field not in obj:
                yield ref, None, None, None, f"missing_field:{field}"
                continue
            yield ref, obj[field], None, None, None


def _table_rows(table_iter: Iterator[dict[str, Any]], ref_prefix: str, field: str) -> Iterator[Raw]:
    for n, row in enumerate(table_iter):
        yield f"{ref_prefix}:row={n}", row[field], None, None, None


def _parquet_rows(path: Path, field: str) -> Iterator[Raw]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
    rows = (row for batch in pf.iter_batches(columns=[field]) for row in batch.to_pylist())
    yield from _table_rows(rows, str(path), field)


def _hf_rows(s: SourceParams) -> Iterator[Raw]:
    import datasets  # only real-data runs pay its import

    assert s.path is not None and s.field is not None and s.split is not None  # checked in SourceParams
    ds = datasets.load_dataset(s.path, s.config, split=s.split, revision=s.revision, streaming=True)
    prefix = f"hf:{s.path}/{s.config}/{s.split}@{s.revision}"
    yield from _table_rows(iter(ds), prefix, s.field)


def source_rows(task: TaskParams, p: SeedParams) -> Iterator[Raw]:
    s = p.source
    if s.kind == "toy":
        return _toy_rows(task, p.seed)
    assert s.path is not None and s.field is not None
    if s.kind == "jsonl":
        return _jsonl_rows(Path(s.path), s.field)
    if s.kind == "parquet":
        return _parquet_rows(Path(s.path), s.field)
    return _hf_rows(s)


class Pool:
    """A uniform sample of up to `size` train prompts (reservoir sampling, seeded):
    synthesis draws its few-shot examples from it without holding every prompt."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, random.Random(seed)
        self.items: list[tuple[str, str]] = []  # (prompt_id, prompt)
        self.offered = 0

    def offer(self, pid: str, text: str) -> None:
        self.offered += 1
        if len(self.items) < self.size:
            self.items.append((pid, text))
            return
        j = self.rng.randrange(self.offered)
        if j < self.size:
            self.items[j] = (pid, text)


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


def stream(task: TaskParams, p: SeedParams, rows: Iterator[Raw], train: RowSink, evals: RowSink, quarantine: RowSink, pool: Pool | None = None) -> SeedResult:
    """Stream `rows` into the train, eval and quarantine sinks, in source order.

    Memory is the dedup set (16 bytes of id per valid prompt) plus the sinks'
    buffers. Reading stops once both quotas are full; a toy stream is endless, so it
    gives up after 50x the quota with an error instead of looping forever. Each id is
    kept at most once and its split is a function of the id, so no prompt can be in
    both sets. `pool`, when given, samples the train prompts for synthesis.
    """
    seen: set[bytes] = set()
    reasons: Counter[str] = Counter()
    read = unused = n_train = n_eval = quarantined = 0
    limit = 50 * (p.num_train + p.num_eval) if p.source.kind == "toy" else None
    for ref, raw, reference, category, error in rows:
        if n_train >= p.num_train and n_eval >= p.num_eval:
            break
        if limit is not None and read >= limit:
            raise ValueError(f"seed: the toy task yielded only {n_train} train / {n_eval} eval distinct prompts in {read} draws; widen `task` or lower seed.num_train / seed.num_eval")
        read += 1
        reason, text = _reason(p, raw, error)
        pid = records.prompt_id(text) if reason is None else None
        key = bytes.fromhex(pid) if pid is not None else b""
        if pid is not None and key in seen:
            reason = "duplicate_prompt"
        if reason is not None:
            reasons[reason] += 1
            quarantined += 1
            quarantine.write([{"source_ref": ref, "prompt": raw if isinstance(raw, str) else None, "prompt_id": pid, "reason": reason}])
            continue
        assert pid is not None
        seen.add(key)
        split = records.split_of(pid, task.eval_fraction)
        if (split == "eval" and n_eval >= p.num_eval) or (split == "train" and n_train >= p.num_train):
            unused += 1  # valid, but its split's quota is already full
            continue
        row = {"prompt_id": pid, "prompt": text, "split": split, "reference": reference, "category": category, "source": p.source.kind, "source_ref": ref}
        if split == "eval":
            evals.write([row])
            n_eval += 1
        else:
            train.write([row])
            n_train += 1
            if pool is not None:
                pool.offer(pid, text)
    if not n_train or not n_eval:
        raise DataError(f"seed: source {p.source.kind} {p.source.path or ''} gave {n_train} train and {n_eval} eval prompts; both sets need at least one")
    counts = {
        "read": read,
        "train": n_train,
        "eval": n_eval,
        "quarantined": quarantined,
        "unused_over_quota": unused,
        "dropped_by_reason": dict(sorted(reasons.items())),
    }
    return SeedResult(counts, seen, pool)


class ListSink:
    """A RowSink that keeps its rows in a list: for small sets and tests."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.rows = 0

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table | pa.RecordBatch) -> None:
        new = rows.to_pylist() if isinstance(rows, (pa.Table, pa.RecordBatch)) else list(rows)
        self.items.extend(new)
        self.rows += len(new)


def run(task: TaskParams, p: SeedParams, rows: Iterator[Raw]) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """`stream` into lists: (train, eval, quarantine, counts). For small sets (tests,
    other stages' fixtures); main() streams to Parquet instead."""
    train, evals, quarantine = ListSink(), ListSink(), ListSink()
    result = stream(task, p, rows, train, evals, quarantine)
    return train.items, evals.items, quarantine.items, result.counts


def stream_to(folder: Path, task: TaskParams, p: SeedParams, rows: Iterator[Raw], batch_rows: int = BATCH_ROWS) -> tuple[SeedResult, dict[str, int]]:
    """`stream` into folder/{train,eval,quarantine}.parquet; (result, rows per file)."""
    with (
        ParquetSink(folder / "train.parquet", records.PROMPT_SCHEMA, batch_rows) as train,
        ParquetSink(folder / "eval.parquet", records.PROMPT_SCHEMA, batch_rows) as evals,
        ParquetSink(folder / "quarantine.parquet", QUARANTINE_SCHEMA, batch_rows) as quarantine,
    ):
        result = stream(task, p, rows, train, evals, quarantine)
    return result, {"train.parquet": train.rows, "eval.parquet": evals.rows, "quarantine.parquet": quarantine.rows}


def main() -> None:
    args = cli.parse_paths(__doc__, "out", "metrics")
    sections = params.load_sections(args.params, SECTIONS)
    task, p = sections["task"], sections["seed"]
    with atomic_dir(args.out) as tmp:
        result, outputs = stream_to(tmp, task, p, source_rows(task, p))
        counts = result.counts
        inputs = {"source": Path(p.source.path)} if p.source.kind in ("jsonl", "parquet") and p.source.path else {}
        lineage.write_manifest(tmp, "seed", sections, inputs=inputs, outputs=outputs, counts=counts)
    write_json(args.metrics, counts)
    log.info("seed: %d train, %d eval, %d quarantined", counts["train"], counts["eval"], counts["quarantined"])


if __name__ == "__main__":
    main()
