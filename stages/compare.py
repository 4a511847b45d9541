"""compare: one cell of the method comparison, a method (or DistiLLM-2 ablation) and a seed.

    python -m stages.compare --params params.yaml --run kd --seed 2 --pairs data/curate --scores data/score \
        --models data/bootstrap --prompts data/seed --out data/compare/kd-2 --metrics metrics/compare/kd-2.json

dvc.yaml runs this as a matrix over `compare.runs` x `compare.seeds`: every cell trains
the initial student on the same curated pairs with the train stage's loop and
settings (`train`: epochs, lr, batch, teacher signal, ...), with the cell's method,
DistiLLM-2 switches and seed, then evaluates it like the evaluate stage does (exact
match, ROUGE-L, NLL on teacher and own responses, KL, greedy agreement, speculative
decoding, lengths). The comparison is single-round: `train.rounds` does not apply.
stages/report.py turns the cells into the comparison table.

Outputs: model/ (the trained student), log.csv (one row per optimizer step),
predictions.parquet, manifest.json, and the metrics file.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from stages import evaluate, train
from stages.lib.audit import lineage
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, ModelParams
from stages.lib.core.params import check
from stages.lib.data import records
from stages.lib.data.io import DataError, atomic_dir, digest_path, read_rows, write_json, write_table
from stages.lib.training import basics
from stages.lib.training.objectives import DistiLLM2Params, Method

log = logging.getLogger("compare")

SWITCHES = ("contrastive", "beta_ramp", "adaptive_alpha")


@dataclass(frozen=True)
class RunParams:
    """One entry of params.yaml `compare.runs`: a method and, for distillm2, the
    ablation switches turned off. (Not named `off`: YAML 1.1 reads that key as false.)"""

    method: Method
    disable: tuple[str, ...]

    def __post_init__(self) -> None:
        for s in self.disable:
            check(s in SWITCHES, "disable", f"unknown switch {s!r}; DistiLLM-2's switches are {list(SWITCHES)}")
        check(
            not self.disable or self.method == "distillm2",
            "disable",
            f"switches belong to distillm2, not {self.method}",
        )


# The train settings a cell shares with the train stage: all but what the cell sets
# itself (method, seed, DistiLLM-2's switches) and the rounds (a cell is one round).
# Listing them one by one keeps DVC from rerunning every cell when train.method changes.
OWN = ("method", "seed", "rounds", "distillm2")
SHARED_TRAIN = tuple(f"train.{f.name}" for f in fields(train.TrainParams) if f.name not in OWN) + tuple(
    f"train.distillm2.{f.name}" for f in fields(DistiLLM2Params) if f.name not in SWITCHES
)


def sections(run: str) -> dict[str, Any]:
    """The params keys the cell for `run` reads: its own entry, not the other runs'."""
    return {
        "models.teacher": ModelParams,
        "models.student": ModelParams,
        "models.trust_remote_code": bool,
        "models.dtype": Dtype,
        **dict.fromkeys(SHARED_TRAIN, Any),  # built into TrainParams by cell_params
        "evaluate": evaluate.EvaluateParams,
        f"compare.runs.{run}": RunParams,
    }


SECTIONS = sections("${item.run}")  # as dvc.yaml's matrix template writes it
PARAMS = tuple(SECTIONS)


def cell_params(used: dict[str, Any], run: RunParams, seed: int) -> train.TrainParams:
    """TrainParams from the shared train settings plus this cell's method, switches and
    seed, one round; checked as strictly as the train stage's own."""
    raw: dict[str, Any] = {
        "method": run.method,
        "seed": seed,
        "rounds": {},
        "distillm2": {s: s not in run.disable for s in SWITCHES},
    }
    for key in SHARED_TRAIN:
        *parents, leaf = key.split(".")[1:]
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = used[key]
    return params.build(train.TrainParams, raw, "train")


def main() -> None:
    args = entry.parse_paths(
        __doc__, "pairs", "scores", "models", "prompts", "out", "metrics", values={"run": str, "seed": int}
    )
    used = params.load_sections(args.params, sections(args.run))
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    run: RunParams = used[f"compare.runs.{args.run}"]
    p = cell_params(used, run, args.seed)
    ev: evaluate.EvaluateParams = used["evaluate"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    s_dir, t_dir = args.models / "student", args.models / "teacher"
    src = args.pairs / "curated.parquet"
    pairs = read_rows(src, records.PAIR_SCHEMA)
    eval_file = args.prompts / "eval.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    if {pr["prompt_id"] for pr in prompts} & {pr["prompt_id"] for pr in pairs}:
        raise DataError(
            f"{eval_file}: eval prompts appear among the training pairs in {src}; evaluation would be contaminated"
        )
    student, teacher, tok_s, tok_t, scores = train.load_inputs(p, s_ref, s_dir, t_ref, t_dir, args.scores, trust, dtype)
    key = train.run_key(p, digest_path(src), models.fingerprint(s_ref, s_dir), models.fingerprint(t_ref, t_dir))
    ckpt_dir = args.out.with_name(args.out.name + ".checkpoints")
    rows = train.run(student, teacher, tok_s, tok_t, pairs, p, ckpt_dir, key, scores=scores)
    if teacher is None:  # topk signal: training never needed the teacher; evaluation does
        teacher = models.load_model(t_ref, t_dir, trust, dtype)
    t_metrics, t_gens, _ = evaluate.generate(teacher, tok_t, models.fingerprint(t_ref, t_dir), "teacher", prompts, ev)
    with atomic_dir(args.out) as tmp:
        basics.save_model(student.to("cpu"), tok_s, tmp / "model")
        fp = models.fingerprint(models.ModelRef(str(tmp / "model"), None), Path())
        s_metrics, s_gens, predictions = evaluate.generate(student, tok_s, fp, args.run, prompts, ev)
        s_metrics |= evaluate.student_metrics(teacher, tok_t, student, tok_s, prompts, t_gens, s_gens, ev)
        metrics = {
            "run": args.run,
            "method": run.method,
            "disable": list(run.disable),
            "seed": args.seed,
            "train": train.summary(rows, len(pairs), run.method),
            "student": s_metrics,
            "teacher_exact_match": (t_metrics.get("accuracy") or {}).get("exact_match"),
        }
        train.write_plot(tmp / "log.csv", rows)
        n = write_table(tmp / "predictions.parquet", predictions, evaluate.PREDICTION_SCHEMA)
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
            extra={"seed": args.seed, "run": args.run, "train_params": asdict(p)},
        )
    write_json(args.metrics, metrics)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    acc = s_metrics.get("accuracy")
    log.info(
        "compare %s seed %d: exact match %s, KL %.4f",
        args.run,
        args.seed,
        acc["exact_match"] if acc else "n/a",
        s_metrics["kl_teacher_student"],
    )


if __name__ == "__main__":
    entry.run(main)
