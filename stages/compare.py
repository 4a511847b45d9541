"""compare: one cell of the method comparison, a method (or DistiLLM-2 ablation) and a seed.

    python -m stages.compare --params params.yaml --run kd --seed 2 --pairs data/curate --scores data/score \
        --models data/bootstrap --prompts data/seed --out data/compare/kd-2 --metrics metrics/compare/kd-2.json \
        --live plots/compare/kd-2

comparison/dvc.yaml (the comparison's own pipeline) runs this as a matrix over
`compare.runs` x `compare.seeds`: every cell trains
the initial student on the same curated pairs with the train stage's trainer, input
gates and settings (`train`: epochs, lr, batch, teacher signal, ...; stages/lib/training/),
with the cell's method, DistiLLM-2 switches and seed, then evaluates it with the evaluate
stage's evaluator (stages/lib/evaluation/: exact match, ROUGE-L, NLL on teacher and own
responses, KL, greedy agreement, speculative decoding, lengths). The curated pairs'
gate also checks that no pair's prompt is an eval prompt. The comparison is
single-round: `train.rounds` does not apply. stages/report.py turns the cells into the
comparison table.

Outputs: model/ (the trained student), predictions.parquet, manifest.json, the metrics
file, and the per-step training log through DVCLive in the --live folder.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, ModelParams
from stages.lib.data import records
from stages.lib.data.io import atomic_dir, digest_path, read_rows, write_json, write_table
from stages.lib.evaluation import evaluator
from stages.lib.evaluation.eval_params import PREDICTION_SCHEMA, EvaluateParams
from stages.lib.training import basics, trainer
from stages.lib.training.cells import SHARED_TRAIN, RunParams, cell_params
from stages.lib.training.checkpoint import Checkpoint, run_key
from stages.lib.training.summary import run_summary

log = logging.getLogger("compare")


def sections(run: str) -> dict[str, Any]:
    """The params keys the cell for `run` reads: its own entry, not the other runs'."""
    return {
        "models.teacher": ModelParams,
        "models.student": ModelParams,
        "models.trust_remote_code": bool,
        "models.dtype": Dtype,
        **dict.fromkeys(SHARED_TRAIN, Any),  # built into TrainParams by cells.cell_params
        "evaluate": EvaluateParams,
        "quality": quality.QualityParams,
        f"compare.runs.{run}": RunParams,
    }


SECTIONS = sections("${item.run}")  # as dvc.yaml's matrix template writes it
PARAMS = tuple(SECTIONS)


def main() -> None:
    args = entry.parse_paths(
        __doc__, "pairs", "scores", "models", "prompts", "out", "metrics", "live", values={"run": str, "seed": int}
    )
    used = params.load_sections(args.params, sections(args.run))
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    run: RunParams = used[f"compare.runs.{args.run}"]
    p = cell_params(used, run, args.seed)
    ev: EvaluateParams = used["evaluate"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    s_dir, t_dir = args.models / "student", args.models / "teacher"
    src, eval_file = args.pairs / "curated.parquet", args.prompts / "eval.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    eval_ids = pa.array([pr["prompt_id"] for pr in prompts], type=pa.string())
    pairs, validation = trainer.gate_inputs(used["quality"], src, args.scores, p, eval_ids)
    student, teacher, tok_s, tok_t, scores = trainer.load_inputs(
        p, s_ref, s_dir, t_ref, t_dir, args.scores, trust, dtype
    )
    key = run_key(
        p, digest_path(src), models.model_fingerprint(s_ref, s_dir), models.model_fingerprint(t_ref, t_dir), dtype
    )
    ckpt = Checkpoint.beside(args.out, key)
    rows = trainer.train(
        trainer.Job(
            student=student,
            teacher=teacher,
            tok_s=tok_s,
            tok_t=tok_t,
            pairs=pairs,
            p=p,
            scores=scores,
            checkpoint=ckpt,
            live=args.live,
        )
    )
    if teacher is None:  # topk signal: training never needed the teacher; evaluation does
        teacher = models.load_model(t_ref, t_dir, trust, dtype)
    t_metrics, t_gens, _ = evaluator.generate_responses(
        teacher, tok_t, models.model_fingerprint(t_ref, t_dir), "teacher", prompts, ev
    )
    with atomic_dir(args.out) as tmp:
        # float32 master weights -> models.dtype, in place: the student evaluated below is the saved one
        basics.export_student(student, tok_s, tmp / "model", dtype)
        fp = models.model_fingerprint(models.ModelRef(str(tmp / "model"), None), Path())
        s_metrics, s_gens, predictions = evaluator.generate_responses(student, tok_s, fp, args.run, prompts, ev)
        s_metrics |= evaluator.student_metrics(teacher, tok_t, student, tok_s, prompts, t_gens, s_gens, ev)
        metrics = {
            "run": args.run,
            "method": run.method,
            "disable": list(run.disable),
            "seed": args.seed,
            "train": run_summary(rows, len(pairs), run.method),
            "student": s_metrics,
            "teacher_exact_match": (t_metrics.get("accuracy") or {}).get("exact_match"),
        }
        n = write_table(tmp / "predictions.parquet", predictions, PREDICTION_SCHEMA)
        lineage.write_manifest(
            tmp,
            "compare",
            used,
            inputs={
                "pairs": src,
                "eval_prompts": eval_file,
                "student": models.lineage_input(s_ref, args.models, "student"),
                "teacher": models.lineage_input(t_ref, args.models, "teacher"),
                **({"scores": args.scores / "topk.parquet"} if scores is not None else {}),
            },
            outputs={"predictions.parquet": n},
            counts=metrics,
            extra={"seed": args.seed, "run": args.run, "train_params": asdict(p), "validation": validation},
        )
    write_json(args.metrics, metrics)
    ckpt.clear()
    acc = s_metrics.get("accuracy")
    log.info(
        "compare %s seed %d: exact match %s, KL %.4f",
        args.run,
        args.seed,
        acc["exact_match"] if acc else "n/a",
        s_metrics["kl_teacher_student"],
    )


if __name__ == "__main__":
    entry.run_stage(main)
