"""compare: one cell of the method comparison, a method (or DistiLLM-2 ablation) and a seed.

    python -m stages.compare --params params.yaml --run kd --seed 2 --prompts data/seed \
        --teacher-gens data/teacher --pairs data/curate --scores data/score --models data/bootstrap \
        --plain-models data/compare/plain/bootstrap --plain-teacher-gens data/compare/plain/teacher \
        --plain-pairs data/compare/plain/curate --plain-scores data/compare/plain/score \
        --out data/compare/kd-2 --metrics metrics/compare/kd-2.json --live plots/compare/kd-2

comparison/dvc.yaml (the comparison's own pipeline) runs this as a matrix over
`compare.runs` x `compare.seeds`. Every cell starts from the initial student and runs
the default pipeline's E rounds (1 + len(train.rounds)) in one process, with the train
stage's trainer, input gates and settings (`train`: epochs, lr, batch, teacher signal,
...; distillflow/training/) and the cell's method, DistiLLM-2 switches and seed:
round 1 trains on the curated pairs (teacher responses against the initial student's
samples); each later round is the round stage's round (distillflow/stagekit/rounds.py,
`run_round`): it samples the student the cell holds (in memory, transformers; the
`student` settings with a seed of its own per cell seed and round), pairs those samples
with the same teacher responses, curates, scores (topk signal) and trains, writing
each step's folder under out/rounds/r<e>/. The controls
(cells.RunParams): `rounds: stale` trains every round on round 1's pairs (the same
optimizer steps, no fresh samples); `teacher: plain` uses the plain_* stages' teacher,
bootstrapped without corrupted prefixes, its responses and its curated pairs.
Then the evaluate stage's evaluator (distillflow/evaluation/: the verifier's pass rate,
share of right steps, ROUGE-L, NLL, KL, greedy agreement, speculative decoding,
lengths). stages/report.py turns the cells into the comparison table.

Outputs: model/ (the trained student), predictions.parquet, rounds/r<e>/ (each fresh
round's student, pairs, curate and score folders), manifest.json (written last), the
metrics file (with each round's step counts, training summary and seconds), and the
per-step training log through DVCLive in the --live folder (the last round's).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from distillflow.audit import lineage, quality
from distillflow.base import models, params, records
from distillflow.base.config import Dtype, GenerationParams, ModelParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import atomic_dir, read_rows, write_json, write_table
from distillflow.data.curation import CurateParams
from distillflow.data.pairing import PairsParams
from distillflow.engines.generation import generate_transformers, sample_seed
from distillflow.engines.scoring import ScoreParams
from distillflow.evaluation import evaluator
from distillflow.evaluation.eval_params import PREDICTION_SCHEMA, EvaluateParams
from distillflow.stagekit import entry, rounds, trainrun
from distillflow.training import basics, trainer
from distillflow.training.cells import SHARED_TRAIN, RunParams, cell_params
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.summary import run_summary
from distillflow.training.train_params import TrainParams

log = logging.getLogger("compare")


def sections(run: str) -> dict[str, Any]:
    """The params keys the cell for `run` reads: its own entry, not the other runs'."""
    return {
        "models.teacher": ModelParams,
        "models.student": ModelParams,
        "models.trust_remote_code": bool,
        "models.dtype": Dtype,
        **dict.fromkeys(SHARED_TRAIN, Any),  # built into TrainParams by cells.cell_params
        "student": GenerationParams,
        "pairs": PairsParams,
        "curate": CurateParams,
        "score": ScoreParams,
        "evaluate": EvaluateParams,
        "quality": quality.QualityParams,
        f"compare.runs.{run}": RunParams,
        "compare.threads": int,
    }


SECTIONS = sections("${item.run}")  # as dvc.yaml's matrix template writes it
PARAMS = tuple(SECTIONS)


def in_memory_sampler(used: dict[str, Any], cell: trainrun.Prepared, seed: int, e: int) -> rounds.Sampler:
    """Round `e`'s samples of the student the cell holds, in this process with
    transformers (the `student` settings, a sampling seed of its own per cell seed and
    round)."""
    sp: GenerationParams = used["student"]
    if sp.engine != "transformers" or sp.num_samples != 1:
        raise ParamsError(
            "student: a comparison cell samples its rounds in process with engine transformers and num_samples 1; "
            f"got engine {sp.engine}, num_samples {sp.num_samples}"
        )
    sp = dataclasses.replace(sp, seed=sample_seed(sp.seed, f"cell-seed-{seed}", f"round-{e}"))

    def generate(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cell.student.eval()
        return generate_transformers(cell.student, cell.tok_s, prompts, sp, f"round-{e}", desc=f"round {e} student")

    def describe(_rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"in_memory": f"the cell's student after round {e - 1}", "fingerprint": f"round-{e}"}

    return rounds.Sampler(p=sp, generate=generate, describe=describe, model_input=None)


def cell_models(args: Any, used: dict[str, Any], run: RunParams) -> tuple[trainrun.Models, Path, Path, Path]:
    """(the models, the bootstrap folder, the curated pairs' folder, the teacher's scores
    folder) of the cell's teacher: the default one or, for `teacher: plain`, the control's."""
    pick = "plain_" if run.teacher == "plain" else ""
    models_dir, pairs_dir, scores_dir = (getattr(args, pick + k) for k in ("models", "pairs", "scores"))
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    m = trainrun.Models(
        s_ref,
        models_dir / "student",
        models.lineage_input(s_ref, models_dir, "student"),
        t_ref,
        models_dir / "teacher",
        models.lineage_input(t_ref, models_dir, "teacher"),
    )
    return m, models_dir, pairs_dir, scores_dir


def train_rounds(
    args: Any,
    used: dict[str, Any],
    run: RunParams,
    p: TrainParams,
    cell: trainrun.Prepared,
    ri: rounds.RoundInputs,
    eval_ids: pa.Array,
) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Path]]:
    """The cell's E rounds on the trainer: round 1 on the gated pairs (resuming from its
    checkpoints as the train stage does), later rounds through rounds.run_round into
    out/rounds/r<e>/ (`rounds: fresh`) or on round 1's pairs again (`stale`). (every
    step's log row, each round's record, the last round's pairs, the files the later
    rounds trained on: their manifests lead back to the samples and prompts)."""
    curriculum = AlphaCurriculum(p.distillm2)
    read: dict[str, Path] = {}
    rows: list[dict[str, float]] = []
    records_: list[dict[str, Any]] = []
    pairs = cell.pairs
    for e in range(1, p.total_rounds + 1):
        live = args.live if e == p.total_rounds else None  # one DVCLive log: the last round's
        if e > 1 and run.rounds == "fresh":
            sampler = in_memory_sampler(used, cell, args.seed, e)
            folder = args.out / "rounds" / f"r{e}"
            done = rounds.run_round(ri, lambda: cell, p, e, curriculum, folder, sampler, live=live, eval_ids=eval_ids)
            got, pairs, seconds, counts = done.rows, done.pairs, done.seconds, done.counts
            read[f"pairs_r{e}"] = done.src
            if p.teacher_signal == "topk":
                read[f"scores_r{e}"] = folder / "score" / "topk.parquet"
        else:
            t0 = time.perf_counter()
            ckpt = cell.checkpoint if e == 1 else None
            job = trainrun.job(cell, p, e, curriculum, pairs=cell.pairs, scores=cell.scores, checkpoint=ckpt, live=live)
            got = trainer.train(job)
            seconds, counts = {"sample": 0.0, "data": 0.0, "train": round(time.perf_counter() - t0, 1)}, {}
        rows += got
        train = run_summary(got, len(pairs), run.method)
        records_.append({"round": e, "pairs": len(pairs), "steps": counts, "train": train, "seconds": seconds})
    return rows, records_, pairs, read


def evaluate_and_write(
    args: Any,
    used: dict[str, Any],
    run: RunParams,
    p: TrainParams,
    cell: trainrun.Prepared,
    m: trainrun.Models,
    **done: Any,
) -> dict[str, Any]:
    """Export the student, score it and the teacher on the eval prompts, and write the
    rest of the cell's folder (model, predictions, then the manifest, last: a folder
    with a manifest is complete); its metrics."""
    trust, dtype, ev = used["models.trust_remote_code"], used["models.dtype"], used["evaluate"]
    prompts, rows, per_round, pairs = done["prompts"], done["rows"], done["rounds"], done["pairs"]
    teacher = cell.teacher
    if teacher is None:  # topk signal: training never needed the teacher; evaluation does
        teacher = models.load_model(m.t_ref, m.t_dir, trust, dtype)
    t_eval = time.perf_counter()
    t_fp = models.model_fingerprint(m.t_ref, m.t_dir)
    t_metrics, t_gens, _ = evaluator.generate_responses(teacher, cell.tok_t, t_fp, "teacher", prompts, ev)
    with atomic_dir(args.out / "model") as tmp:
        # float32 master weights -> models.dtype, in place: the student evaluated below is the saved one
        basics.export_student(cell.student, cell.tok_s, tmp, dtype)
    fp = models.model_fingerprint(models.ModelRef(str(args.out / "model"), None), Path())
    s_metrics, s_gens, predictions = evaluator.generate_responses(cell.student, cell.tok_s, fp, args.run, prompts, ev)
    s_metrics |= evaluator.student_metrics(teacher, cell.tok_t, cell.student, cell.tok_s, prompts, t_gens, s_gens, ev)
    seconds = {k: round(sum(r["seconds"][k] for r in per_round), 1) for k in ("sample", "data", "train")}
    metrics = {
        "run": args.run,
        "method": run.method,
        "disable": list(run.disable),
        "rounds": run.rounds,
        "teacher": run.teacher,
        "seed": args.seed,
        "train": run_summary(rows, len(pairs), run.method),
        "per_round": per_round,
        "seconds": {**seconds, "evaluate": round(time.perf_counter() - t_eval, 1)},
        "student": s_metrics,
        "teacher_exact_match": (t_metrics.get("accuracy") or {}).get("exact_match"),
    }
    n = write_table(args.out / "predictions.parquet", predictions, PREDICTION_SCHEMA)
    scores_dir = done["scores_dir"] if cell.scores is not None else None
    lineage.write_manifest(
        args.out,
        "compare",
        used,
        inputs={**trainrun.lineage_inputs(cell.src, scores_dir, m), **done["extra_inputs"]},
        outputs={"predictions.parquet": n},
        counts=metrics,
        extra={
            "seed": args.seed,
            "run": args.run,
            "threads": torch.get_num_threads(),
            "train_params": asdict(p),
            "validation": cell.validation,
        },
    )
    return metrics


def main() -> None:
    paths = ("prompts", "teacher_gens", "pairs", "scores", "models")
    args = entry.parse_paths(
        __doc__,
        *paths,
        *(f"plain_{k}" for k in paths[1:]),
        "out",
        "metrics",
        "live",
        values={"run": str, "seed": int},
    )
    used = params.load_sections(args.params, sections(args.run))
    threads = used["compare.threads"]
    if threads < 1:
        raise ParamsError(f"{args.params}: compare.threads: must be >= 1; got {threads}")
    # A fixed thread count per cell, whatever runs beside it: outputs do not depend on
    # how many cells run at once (`distillflow run --jobs 2` runs two on 2 cores).
    torch.set_num_threads(threads)
    run: RunParams = used[f"compare.runs.{args.run}"]
    p = cell_params(used, run, args.seed)
    m, _, pairs_dir, scores_dir = cell_models(args, used, run)
    gens_dir = args.plain_teacher_gens if run.teacher == "plain" else args.teacher_gens
    eval_file = args.prompts / "eval.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    eval_ids = pa.array([pr["prompt_id"] for pr in prompts], type=pa.string())
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    src = pairs_dir / "curated.parquet"
    if args.out.exists():  # a cell's folder is written in place (its rounds, then the rest): start empty
        shutil.rmtree(args.out)
    cell = trainrun.prepare(p, used["quality"], src, scores_dir, m, trust, dtype, args.out, eval_ids)
    fresh = p.total_rounds > 1 and run.rounds == "fresh"  # only fresh rounds sample: stale ones reread nothing
    ri = rounds.RoundInputs(
        used=used,
        module="compare",
        prompts_dir=args.prompts,
        teacher_file=gens_dir / "generations.parquet",
        teacher_info=models.describe(m.t_ref, m.t_dir),
        load_teacher=trainrun.teacher_loader(m, trust, dtype, used["score"].device),
    )
    rows, per_round, pairs, round_inputs = train_rounds(args, used, run, p, cell, ri, eval_ids)
    extra_inputs = {
        "eval_prompts": eval_file,
        **({"teacher_generations": ri.teacher_file, "train_prompts": args.prompts / "train.parquet"} if fresh else {}),
        **round_inputs,
    }
    metrics = evaluate_and_write(
        args,
        used,
        run,
        p,
        cell,
        m,
        prompts=prompts,
        rows=rows,
        rounds=per_round,
        pairs=pairs,
        scores_dir=scores_dir,
        extra_inputs=extra_inputs,
    )
    write_json(args.metrics, metrics)
    cell.checkpoint.clear()
    acc, s_metrics = metrics["student"].get("accuracy"), metrics["student"]
    log.info(
        "compare %s seed %d: exact match %s, KL %.4f, %s s",
        args.run,
        args.seed,
        acc["exact_match"] if acc else "n/a",
        s_metrics["kl_teacher_student"],
        metrics["seconds"],
    )


if __name__ == "__main__":
    entry.run_stage(main)
