"""score: the teacher's offline signal on every curated pair (top-k log-probs).

    python -m stages.score --params params.yaml --pairs data/curate --models data/bootstrap \
        --out data/score --metrics metrics/score.json

For both responses of each pair (chosen and rejected), at every response position: the
teacher's `score.k` most likely next tokens with their log-probs, and its log-prob of
the token actually there. With `train.teacher_signal: topk` the train stage reads this
instead of loading the teacher, and compares the student with the teacher over those
k tokens plus one "everything else" bucket (losses.topk_buckets: the approximation
error, measured in tests/test_losses_topk.py, shrinks as k grows).

`score.engine: openai` scores with a teacher served behind an OpenAI-compatible completions
endpoint that returns `prompt_logprobs` (a vLLM server; distillflow/engines/served.py)
instead of loading models.teacher; the pairs are then encoded with the student's
tokenizer, which a probe checks the endpoint shares.

With several teachers (`models.teachers`) the stored signal is their weighted
mixture's (`models.routing: mix`) or, per pair, its own teacher's (`route`, by the
pair's `teacher` column): scoring.Mixture, docs/training.md.

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
from typing import Any

import pyarrow as pa

from distillflow.base import params
from distillflow.base.config import teachers_of
from distillflow.base.io import write_json
from distillflow.engines import scoring
from distillflow.engines.scoring import ScoreParams
from distillflow.stagekit import entry, scorestep
from distillflow.stagekit.writer import Writer

__all__ = ["SECTIONS", "PARAMS", "ScoreParams", "main", "run"]

log = logging.getLogger("score")

SECTIONS: dict[str, Any] = scorestep.SCORE_SECTIONS
PARAMS = tuple(SECTIONS)


def run(teacher: Any, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams) -> pa.Table:
    """Top-k rows for every (pair, side), in pair order, chosen before rejected, as one
    table: scoring.score (in-process callers; main streams instead)."""
    return scoring.score(teacher, tok, pairs, p)


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "models", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    p: ScoreParams = used["score"]
    student = (used["models.student"].ref(), args.models / "student")
    teachers = teachers_of(used)
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    load = scorestep.teacher_loader(student, teachers, args.models, trust, dtype, p)
    w = Writer(out=args.out, module="score", used=used, docs=args.docs)
    info = scorestep.teacher_description(teachers, args.models, p)
    counts = scorestep.write_scores(w, args.pairs / "curated.parquet", load if p.k > 0 else None, info)
    write_json(args.metrics, counts)
    log.info("score: k=%d, %d rows, %d positions", p.k, counts["rows"], counts["positions"])


if __name__ == "__main__":
    entry.run_stage(main)
