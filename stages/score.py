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
target_logprob (positions). The scoring itself: stages/lib/engines/scoring.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, ModelParams
from stages.lib.data import records
from stages.lib.data.io import atomic_dir, read_table, write_json, write_table
from stages.lib.engines import scoring
from stages.lib.engines.scoring import ScoreParams

__all__ = ["SECTIONS", "PARAMS", "ScoreParams", "run", "main"]

log = logging.getLogger("score")


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "score": ScoreParams,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)


def run(teacher: Any, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams) -> list[dict[str, Any]]:
    """Top-k rows for every (pair, side), in pair order, chosen before rejected: scoring.score."""
    return scoring.score(teacher, tok, pairs, p)


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "models", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    p: ScoreParams = used["score"]
    ref = used["models.teacher"].ref()
    src = args.pairs / "curated.parquet"
    gates = quality.StageGates(used["quality"], args.docs)
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict("curated pairs", src, "curated", table)
    pairs = table.to_pylist()
    rows: list[dict[str, Any]] = []
    vocab: int | None = None
    if p.k > 0:
        teacher = models.load_model(
            ref, args.models / "teacher", used["models.trust_remote_code"], used["models.dtype"]
        )
        tok = models.load_tokenizer(ref, args.models / "teacher", used["models.trust_remote_code"])
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
        rows = run(teacher, tok, pairs, p)
    # the output: finite, sorted log-probs, token ids inside the teacher's vocabulary, every pair id known
    gates.strict(
        "teacher top-k",
        args.out / "topk.parquet",
        "topk",
        pa.Table.from_pylist(rows, schema=records.TOPK_SCHEMA),
        vocab_size=vocab,
        refs={"pair_id": pa.array([pr["pair_id"] for pr in pairs], type=pa.string())},
    )
    validation = gates.finish()
    counts = {
        "pairs": len(pairs),
        "rows": len(rows),
        "k": p.k,
        "positions": sum(r["positions"] for r in rows),
        "gates": quality.validation_summary(validation),
    }
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "topk.parquet", rows, records.TOPK_SCHEMA)
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
