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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from stages.lib import cli, lineage, params, records, toytask
from stages.lib.config import TaskParams
from stages.lib.io import DataError, atomic_dir, write_json, write_table
from stages.lib.params import check

log = logging.getLogger("seed")

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


def run(task: TaskParams, p: SeedParams, rows: Iterator[Raw]) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """Split `rows` into (train, eval, quarantine, counts).

    Reading stops once both quotas are full; a toy stream is endless, so it gives up
    after 50x the quota with an error instead of looping forever.
    """
    train: list[dict] = []
    evals: list[dict] = []
    quarantine: list[dict] = []
    seen: set[str] = set()
    reasons: Counter[str] = Counter()
    read = unused = 0
    limit = 50 * (p.num_train + p.num_eval) if p.source.kind == "toy" else None
    for ref, raw, reference, category, error in rows:
        if len(train) >= p.num_train and len(evals) >= p.num_eval:
            break
        if limit is not None and read >= limit:
            raise ValueError(f"seed: the toy task yielded only {len(train)} train / {len(evals)} eval distinct prompts in {read} draws; widen `task` or lower seed.num_train / seed.num_eval")
        read += 1
        reason = error  # the reader's own reason (invalid_json, missing_field, ...)
        if reason is None and not isinstance(raw, str):
            reason = "not_a_string" if raw is not None else "null_prompt"
        text = records.normalise_prompt(raw) if reason is None else ""
        if reason is None and not text:
            reason = "empty_prompt"
        if reason is None and len(text) > p.max_prompt_chars:
            reason = "prompt_too_long"
        pid = records.prompt_id(text) if reason is None else None
        if pid is not None and pid in seen:
            reason = "duplicate_prompt"
        if reason is not None:
            reasons[reason] += 1
            quarantine.append({"source_ref": ref, "prompt": raw if isinstance(raw, str) else None, "prompt_id": pid, "reason": reason})
            continue
        assert pid is not None
        seen.add(pid)
        split = records.split_of(pid, task.eval_fraction)
        bucket, quota = (evals, p.num_eval) if split == "eval" else (train, p.num_train)
        if len(bucket) >= quota:
            unused += 1  # valid, but its split's quota is already full
            continue
        bucket.append({
            "prompt_id": pid,
            "prompt": text,
            "split": split,
            "reference": reference,
            "category": category,
            "source": p.source.kind,
            "source_ref": ref,
        })
    if not train or not evals:
        raise DataError(f"seed: source {p.source.kind} {p.source.path or ''} gave {len(train)} train and {len(evals)} eval prompts; both sets need at least one")
    overlap = {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}
    if overlap:  # impossible by construction; checked because evaluation depends on it
        raise AssertionError(f"seed: {len(overlap)} prompts in both train and eval")
    counts = {
        "read": read,
        "train": len(train),
        "eval": len(evals),
        "quarantined": len(quarantine),
        "unused_over_quota": unused,
        "dropped_by_reason": dict(sorted(reasons.items())),
    }
    return train, evals, quarantine, counts


def main() -> None:
    args = cli.parse_paths(__doc__, "out", "metrics")
    sections = params.load_sections(args.params, SECTIONS)
    task, p = sections["task"], sections["seed"]
    train, evals, quarantine, counts = run(task, p, source_rows(task, p))
    with atomic_dir(args.out) as tmp:
        outputs = {
            "train.parquet": write_table(tmp / "train.parquet", train, records.PROMPT_SCHEMA),
            "eval.parquet": write_table(tmp / "eval.parquet", evals, records.PROMPT_SCHEMA),
            "quarantine.parquet": write_table(tmp / "quarantine.parquet", quarantine, QUARANTINE_SCHEMA),
        }
        inputs = {"source": Path(p.source.path)} if p.source.kind in ("jsonl", "parquet") and p.source.path else {}
        lineage.write_manifest(tmp, "seed", sections, inputs=inputs, outputs=outputs, counts=counts)
    write_json(args.metrics, counts)
    log.info("seed: %d train, %d eval, %d quarantined", counts["train"], counts["eval"], counts["quarantined"])


if __name__ == "__main__":
    main()
