"""score: the teacher's offline signal on every curated pair (top-k log-probs).

    python -m stages.score --params params.yaml --pairs data/curate --models data/bootstrap \
        --out data/score --metrics metrics/score.json

For both responses of each pair (chosen and rejected), at every response position: the
teacher's `score.k` most likely next tokens with their log-probs, and its log-prob of
the token actually there. With `train.teacher_signal: topk` the train stage reads this
instead of loading the teacher, and compares the student with the teacher over those
k tokens plus one "everything else" bucket (losses.topk_buckets: the approximation
error, measured in tests/test_losses_topk.py, shrinks as k grows).

`score.k: 0` switches scoring off (the teacher is not loaded; an empty topk.parquet is
written), for runs that keep the online teacher. Output rows (one per pair and side):
pair_id, side, positions, k, topk_ids and topk_logprobs (positions x k, flattened),
target_logprob (positions). The scoring itself: distillflow/engines/scoring.py.

Memory stays bounded at any scale: each model batch becomes one typed Arrow record
batch (never Python lists), streamed into the file in row groups of 2 x score.batch_size
rows (distillflow/base/stream.py), and the output gate then streams the written file in
batches (quality.StageGates.check_file). The teacher runs on `score.device`; token
ids are checked against the tokenizer's length (head rows past it are padding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distillflow.audit import lineage, quality
from distillflow.base import models, params, records
from distillflow.base.config import Dtype, ModelParams
from distillflow.base.io import atomic_dir, read_table, write_json
from distillflow.base.stream import ParquetSink
from distillflow.engines import scoring
from distillflow.engines.scoring import ScoreParams
from distillflow.stagekit import entry

__all__ = ["SECTIONS", "PARAMS", "ScoreParams", "gate_scores", "main", "run", "write_scores"]

log = logging.getLogger("score")


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "score": ScoreParams,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)


def run(teacher: Any, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams) -> pa.Table:
    """Top-k rows for every (pair, side), in pair order, chosen before rejected, as one
    table: scoring.score (in-process callers; main streams instead)."""
    return scoring.score(teacher, tok, pairs, p)


def write_scores(path: Path, batches: Iterable[pa.RecordBatch], batch_rows: int) -> tuple[int, int]:
    """Stream top-k record batches into `path` (row groups of `batch_rows`, atomically):
    (rows, response positions) written. Only one model batch and one row group's worth of
    Arrow buffers are held at a time. main() passes 2 * score.batch_size (a top-k row is
    positions x k entries, so quality.batch_rows rows could be gigabytes)."""
    positions = 0
    with ParquetSink(path, records.TOPK_SCHEMA, batch_rows) as sink:
        for batch in batches:
            sink.write(batch)
            positions += pc.sum(batch.column("positions")).as_py() or 0
    return sink.rows, positions


def gate_scores(
    gates: quality.StageGates, path: Path, shown: Path, vocab_size: int | None, pair_ids: list[str]
) -> None:
    """The strict output gate over the written file, streamed in batches of
    quality.batch_rows: finite, sorted log-probs, token ids below `vocab_size` (the
    tokenizer's length: head rows past it are padding), every pair id known."""
    gates.check_file(
        "teacher top-k",
        path,
        "topk",
        shown=shown,
        vocab_size=vocab_size,
        refs={"pair_id": pa.array(pair_ids, type=pa.string())},
    )


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "models", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    p: ScoreParams = used["score"]
    q: quality.QualityParams = used["quality"]
    ref = used["models.teacher"].ref()
    src = args.pairs / "curated.parquet"
    gates = quality.StageGates(q, args.docs)
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict("curated pairs", src, "curated", table)
    pairs = table.to_pylist()
    batches: Iterable[pa.RecordBatch] = ()
    vocab: int | None = None
    if p.k > 0:
        teacher = models.load_model(
            ref, args.models / "teacher", used["models.trust_remote_code"], used["models.dtype"]
        ).to(p.device)
        tok = models.load_tokenizer(ref, args.models / "teacher", used["models.trust_remote_code"])
        vocab = len(tok)  # ids past the tokenizer are head padding, never real tokens
        batches = scoring.score_batches(teacher, tok, pairs, p)
    with atomic_dir(args.out) as tmp:
        n, positions = write_scores(tmp / "topk.parquet", batches, 2 * p.batch_size)
        gate_scores(gates, tmp / "topk.parquet", args.out / "topk.parquet", vocab, [pr["pair_id"] for pr in pairs])
        validation = gates.finish()
        counts = {
            "pairs": len(pairs),
            "rows": n,
            "k": p.k,
            "positions": positions,
            "gates": quality.validation_summary(validation),
        }
        lineage.write_manifest(
            tmp,
            "score",
            used,
            inputs={"pairs": src},
            outputs={"topk.parquet": n},
            counts=counts,
            extra={"teacher": models.describe(ref, args.models / "teacher"), "validation": validation},
        )
    write_json(args.metrics, counts)
    log.info("score: k=%d, %d rows, %d positions", p.k, counts["rows"], counts["positions"])


if __name__ == "__main__":
    entry.run_stage(main)
