"""evaluate: teacher, initial student and distilled student on the held-out prompts.

    python -m stages.evaluate --params params.yaml --prompts data/seed --models data/bootstrap \
        --trained data/train --out data/evaluate --metrics metrics/evaluate.json --summary metrics/summary.json \
        --round r1

For each model, responses to every eval prompt (greedy unless `evaluate.temperature`
says otherwise) and, where prompts carry reference answers (the toy task), exact-match
accuracy overall and per skill. For both students, the token-level KL(teacher ||
student) on the teacher's held-out responses. The eval prompts come from
data/seed/eval.parquet, which is disjoint from every training prompt (checked here
against data/seed/train.parquet again, not assumed).

Outputs: predictions.parquet (one row per model and prompt, with correctness),
manifest.json, the metrics file (every number, a plain output) and the summary (the
headline numbers, the DVC metric that `dvc metrics show` and `dvc exp show` compare:
evaluator.headline). The evaluation itself lives in
distillflow/evaluation/ (shared with the comparison cells).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillflow.audit import disjoint, lineage
from distillflow.base import models, params, records
from distillflow.base.config import Dtype, ModelParams
from distillflow.base.io import atomic_dir, read_rows, read_table, write_json, write_table
from distillflow.evaluation import evaluator
from distillflow.evaluation.eval_params import PREDICTION_SCHEMA, EvaluateParams
from distillflow.stagekit import entry

log = logging.getLogger("evaluate")

SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "evaluate": EvaluateParams,
}
PARAMS = tuple(SECTIONS)


def main() -> None:
    args = entry.parse_paths(
        __doc__, "prompts", "models", "trained", "out", "metrics", "summary", values={"round": str}
    )
    used = params.load_sections(args.params, SECTIONS)
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    eval_file, train_file = args.prompts / "eval.parquet", args.prompts / "train.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    disjoint.check_disjoint(
        read_table(train_file, records.PROMPT_SCHEMA).column("prompt_id"),
        [pr["prompt_id"] for pr in prompts],
        train_file=train_file,
        eval_file=eval_file,
    )
    refs = {
        "teacher": (used["models.teacher"].ref(), args.models / "teacher"),
        "student_initial": (used["models.student"].ref(), args.models / "student"),
        "student_distilled": (models.ModelRef(str(args.trained / "model"), None), Path()),
    }
    loaded = {
        name: (
            models.load_model(ref, d, trust, dtype),
            models.load_tokenizer(ref, d, trust),
            models.model_fingerprint(ref, d),
        )
        for name, (ref, d) in refs.items()
    }
    metrics, predictions = evaluator.evaluate_models(loaded, prompts, used["evaluate"])
    metrics["eval_prompts"] = len(prompts)
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "predictions.parquet", predictions, PREDICTION_SCHEMA)
        lineage.write_manifest(
            tmp,
            "evaluate",
            used,
            inputs={"eval_prompts": eval_file, "train_prompts": train_file, "trained": args.trained},
            outputs={"predictions.parquet": n},
            counts=metrics,
        )
    write_json(args.metrics, metrics)
    write_json(args.summary, evaluator.headline(metrics, args.round))
    for name in loaded:
        acc = metrics[name].get("accuracy")
        log.info(
            "%s: exact match %s, KL %s",
            name,
            acc["exact_match"] if acc else "n/a",
            metrics[name].get("kl_teacher_student", "-"),
        )


if __name__ == "__main__":
    entry.run_stage(main)
