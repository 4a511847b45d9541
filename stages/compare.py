"""compare: one cell of the method comparison, a method (or DistiLLM-2 ablation), a bootstrap and a seed.

    python -m stages.compare --params params.yaml --run kd --bootstrap 2 --seed 3 --prompts data/seed \
        --teacher-gens data/compare/b2/default/teacher --pairs data/compare/b2/default/curate \
        --scores data/compare/b2/default/score --models data/compare/b2/default/bootstrap \
        --plain-models data/compare/b2/plain/bootstrap --plain-teacher-gens data/compare/b2/plain/teacher \
        --plain-pairs data/compare/b2/plain/curate --plain-scores data/compare/b2/plain/score \
        --out data/compare/cells/kd-b2-s3 --metrics metrics/compare/kd-b2-s3.json \
        --prompt-scores metrics/compare/kd-b2-s3.prompts.parquet --live plots/compare/kd-b2-s3

comparison/dvc.yaml (the comparison's own pipeline) runs this as a matrix over
`compare.runs` x `compare.bootstraps` x `compare.seeds`. Every cell starts from its
bootstrap's initial student and runs the default pipeline's E rounds (1 +
len(train.rounds)) in one process, with the train stage's trainer, input gates and
settings (`train`: epochs, lr, batch, teacher signal, ...; distillflow/training/) and
the cell's method, DistiLLM-2 switches and seed: round 1 trains on the bootstrap's
curated pairs (teacher responses against the initial student's samples); each later
round is the round stage's round (distillflow/stagekit/rounds.py, `run_round`): it
samples the student the cell holds (in memory, transformers; the `student` settings
with a seed of its own per bootstrap, seed and round), pairs those samples with the
same teacher responses, curates, scores (topk signal) and trains, writing each step's
folder under out/rounds/r<e>/. Seeds are nested in bootstraps: the training seed is
records.replicate_seed(seed, bootstrap), and every run of one (bootstrap, seed) shares
it and the sampling seeds, so runs are paired within it. The controls (cells.RunParams): `rounds: stale` trains every
round on round 1's pairs (the same optimizer steps, no fresh samples); `teacher: plain`
uses the bootstrap's plain teacher, trained without corrupted prefixes, its responses
and its curated pairs.

Then the evaluate stage's evaluator (distillflow/evaluation/), always against the
bootstrap's default teacher (the reference: plain-teacher cells are scored against it
too): the verifier's pass rate, share of right steps, ROUGE-L, KL, greedy agreement,
NLL on the teacher's responses, on the student's own greedy responses and on its own
responses sampled at the training temperature (the `student` settings: DPKD's collapse
shows there), speculative decoding, lengths, and how far training moved the student
(KL(initial || final) on the teacher's responses).

Outputs: model/ (the trained student), predictions.parquet, rounds/r<e>/ (each fresh
round's student, pairs, curate and score folders), manifest.json (written last); the
metrics file (each round's step counts, training summary, cost and seconds; the cost:
optimizer steps, sequences and tokens trained on, wall seconds) and the per-prompt
scores (PROMPT_SCORES: what the report's paired resamples of the eval prompts
read), both committed to git; the per-step training log through DVCLive in the --live
folder (the last round's). stages/report.py turns the cells into the comparison report.
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
from distillflow.base.config import TEACHER_SECTIONS, Dtype, GenerationParams, ModelParams, teachers_of
from distillflow.base.errors import ParamsError
from distillflow.base.io import atomic_dir, read_rows, write_json, write_table
from distillflow.data.curation import CurateParams
from distillflow.data.pairing import PairsParams
from distillflow.engines.generation import generate_transformers, sample_seed
from distillflow.engines.scoring import ScoreParams
from distillflow.evaluation import evaluator
from distillflow.evaluation import metrics as metrics_lib
from distillflow.evaluation.eval_params import PREDICTION_SCHEMA, PROMPT_SCORES, EvaluateParams
from distillflow.stagekit import entry, rounds, scorestep, trainrun
from distillflow.training import basics, trainer
from distillflow.training.cells import SHARED_TRAIN, RunParams, cell_params
from distillflow.training.methods import METHODS
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.summary import run_summary, tokens_trained
from distillflow.training.train_params import TrainParams

log = logging.getLogger("compare")


def sections(run: str) -> dict[str, Any]:
    """The params keys the cell for `run` reads: its own entry, not the other runs'."""
    return {
        **TEACHER_SECTIONS,
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


def in_memory_sampler(used: dict[str, Any], cell: trainrun.Prepared, args: Any, e: int) -> rounds.Sampler:
    """Round `e`'s samples of the student the cell holds, in this process with
    transformers (the `student` settings, a sampling seed of its own per bootstrap, seed
    and round, the same for every run of that bootstrap and seed; the model fingerprint
    names the cell, so generation ids differ between cells)."""
    sp: GenerationParams = used["student"]
    if sp.engine != "transformers" or sp.num_samples != 1:
        raise ParamsError(
            "student: a comparison cell samples its rounds in process with engine transformers and num_samples 1; "
            f"got engine {sp.engine}, num_samples {sp.num_samples}"
        )
    base = records.replicate_seed(sp.seed, args.bootstrap)
    sp = dataclasses.replace(sp, seed=sample_seed(base, f"cell-seed-{args.seed}", f"round-{e}"))

    fp = f"{cell_name(args)}-round-{e}"

    def generate(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cell.student.eval()
        return generate_transformers(cell.student, cell.tok_s, prompts, sp, fp, desc=f"round {e} student")

    def describe(_rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"in_memory": f"the cell's student after round {e - 1}", "fingerprint": fp}

    return rounds.Sampler(p=sp, generate=generate, describe=describe, model_input=None)


def cell_name(args: Any) -> str:
    """`<run>-b<bootstrap>-s<seed>`: the cell's folder and metrics name."""
    return f"{args.run}-b{args.bootstrap}-s{args.seed}"


def models_of(used: dict[str, Any], models_dir: Path) -> trainrun.Models:
    """The student and teacher bootstrap wrote into `models_dir`."""
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    return trainrun.Models(
        s_ref,
        models_dir / "student",
        models.lineage_input(s_ref, models_dir, "student"),
        t_ref,
        models_dir / "teacher",
        models.lineage_input(t_ref, models_dir, "teacher"),
    )


def cell_models(args: Any, used: dict[str, Any], run: RunParams) -> tuple[trainrun.Models, Path, Path, Path]:
    """(the models, the bootstrap folder, the curated pairs' folder, the teacher's scores
    folder) of the cell's teacher: the default one or, for `teacher: plain`, the control's."""
    pick = "plain_" if run.teacher == "plain" else ""
    models_dir, pairs_dir, scores_dir = (getattr(args, pick + k) for k in ("models", "pairs", "scores"))
    return models_of(used, models_dir), models_dir, pairs_dir, scores_dir


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
    method = METHODS[p.method]
    sides = sum(method.sides(method.section(p)))  # sequences per pair the trainer runs
    read: dict[str, Path] = {}
    rows: list[dict[str, float]] = []
    records_: list[dict[str, Any]] = []
    pairs = cell.pairs
    for e in range(1, p.total_rounds + 1):
        live = args.live if e == p.total_rounds else None  # one DVCLive log: the last round's
        if e > 1 and run.rounds == "fresh":
            sampler = in_memory_sampler(used, cell, args, e)
            folder = args.out / "rounds" / f"r{e}"
            done = rounds.run_round(ri, lambda: cell, p, e, curriculum, folder, sampler, live=live, eval_ids=eval_ids)
            got, pairs, seconds, counts = done.rows, done.pairs, done.seconds, done.counts
            read[f"pairs_r{e}"] = done.src
            if p.teacher_signal == "topk":
                read[f"scores_r{e}"] = folder / "score" / "topk.parquet"
        else:
            t0 = time.perf_counter()
            ckpt = cell.checkpoint if e == 1 else None
            job = trainrun.job(
                cell,
                p,
                e,
                curriculum,
                pairs=cell.pairs,
                scores=cell.scores,
                checkpoint=ckpt,
                live=live,
                score=ri.used["score"],
            )
            got = trainer.train(job)
            seconds, counts = {"sample": 0.0, "data": 0.0, "train": round(time.perf_counter() - t0, 1)}, {}
        rows += got
        train = run_summary(got, len(pairs), run.method)
        cost = {
            "optimizer_steps": len(got),
            "sequences": len(pairs) * p.epochs * sides,
            "tokens": tokens_trained(cell.tok_s, pairs, p, train.get("sampled_tokens")),
        }
        records_.append(
            {"round": e, "pairs": len(pairs), "steps": counts, "train": train, "cost": cost, "seconds": seconds}
        )
    return rows, records_, pairs, read


def reference_scores(
    args: Any, used: dict[str, Any], run: RunParams, cell: trainrun.Prepared, prompts: list[dict[str, Any]]
) -> tuple[Any, list[dict[str, Any]], dict[str, Any], list[dict[str, Any]], Any]:
    """The yardsticks every cell of the bootstrap shares: the reference teacher (the
    bootstrap's default one, for plain-teacher cells too) with its greedy eval
    responses and their metrics, and the initial student's greedy responses and model.
    (teacher, its responses, its metrics, the initial student's responses, the initial student)."""
    trust, dtype, ev = used["models.trust_remote_code"], used["models.dtype"], used["evaluate"]
    ref = models_of(used, args.models)
    teacher = cell.teacher if run.teacher == "default" and cell.teacher is not None else None
    if teacher is None:  # topk signal, or a plain-teacher cell: load the reference teacher
        teacher = models.load_model(ref.t_ref, ref.t_dir, trust, dtype)
    t_fp = models.model_fingerprint(ref.t_ref, ref.t_dir)
    t_metrics, t_gens, _ = evaluator.generate_responses(teacher, cell.tok_t, t_fp, "teacher", prompts, ev)
    initial = models.load_model(ref.s_ref, ref.s_dir, trust, dtype)
    i_fp = models.model_fingerprint(ref.s_ref, ref.s_dir)
    _, i_gens, _ = evaluator.generate_responses(initial, cell.tok_s, i_fp, "student_initial", prompts, ev)
    return teacher, t_gens, t_metrics, i_gens, initial


def sampled_nll(
    args: Any, used: dict[str, Any], cell: trainrun.Prepared, fp: str, prompts: list[dict[str, Any]], vocab: int
) -> tuple[float | None, dict[str, list[Any]]]:
    """The student's NLL on its own eval responses sampled at the training temperature
    (the `student` sampling settings, a seed per bootstrap and seed, shared by the runs
    so their difference is paired): the measurement of DPKD's collapse in its paper.
    (token mean or None, per-prompt sums and tokens)."""
    ev: EvaluateParams = used["evaluate"]
    sp = dataclasses.replace(
        used["student"],
        seed=sample_seed(records.replicate_seed(used["student"].seed, args.bootstrap), "eval-sample", f"s{args.seed}"),
        device=ev.device,
    )
    gens = generate_transformers(cell.student, cell.tok_s, prompts, sp, fp, desc="evaluate sampled")
    seqs = metrics_lib.sequences(cell.tok_s, prompts, gens)
    if not sum(len(r) for _, r in seqs):
        return None, {"nll": [0.0] * len(seqs), "tokens": [0] * len(seqs)}
    got = metrics_lib.teacher_forced(
        None,
        cell.student,
        cell.tok_s,
        seqs,
        vocab,
        ev.batch_size,
        "the student's sampled eval responses",
        ev.device,
        per_sequence=True,
    )
    return got["nll"], got["per_sequence"]


def score_student(
    args: Any, used: dict[str, Any], cell: trainrun.Prepared, fp: str, prompts: list[dict[str, Any]], ref: tuple
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The trained student's metrics, prediction rows and per-prompt scores against
    `ref` (reference_scores': the teacher, its responses, the initial student's
    responses and the initial student)."""
    ev: EvaluateParams = used["evaluate"]
    teacher, t_gens, i_gens, initial = ref
    s_metrics, s_gens, predictions = evaluator.generate_responses(cell.student, cell.tok_s, fp, args.run, prompts, ev)
    s_metrics |= evaluator.student_metrics(
        teacher, cell.tok_t, cell.student, cell.tok_s, prompts, t_gens, s_gens, ev, per_prompt=True
    )
    per_prompt = s_metrics.pop("per_prompt")
    vocab = models.check_vocabularies(cell.tok_s, cell.tok_t, cell.student.config.vocab_size, teacher.config.vocab_size)
    s_metrics["nll_on_sampled_responses"], sampled = sampled_nll(args, used, cell, fp, prompts, vocab)
    on_teacher = metrics_lib.sequences(cell.tok_s, prompts, t_gens)
    where = "the reference teacher's eval responses"
    moved = metrics_lib.teacher_forced(
        initial, cell.student, cell.tok_s, on_teacher, vocab, ev.batch_size, where, ev.device
    )
    s_metrics["kl_initial_final"] = moved["kl_teacher_student"]  # KL(initial || final): how far training moved it
    gens = {"student": s_gens, "teacher": t_gens, "initial": i_gens}
    return s_metrics, predictions, evaluator.prompt_scores(prompts, gens, per_prompt, sampled)


def evaluate_and_write(
    args: Any,
    used: dict[str, Any],
    run: RunParams,
    p: TrainParams,
    cell: trainrun.Prepared,
    m: trainrun.Models,
    **done: Any,
) -> dict[str, Any]:
    """Export the student, score it against the reference teacher on the eval prompts,
    and write the rest of the cell's folder (model, predictions, then the manifest,
    last: a folder with a manifest is complete) and the per-prompt scores; its metrics."""
    dtype = used["models.dtype"]
    prompts, rows, per_round, pairs = done["prompts"], done["rows"], done["rounds"], done["pairs"]
    t_eval = time.perf_counter()
    teacher, t_gens, t_metrics, i_gens, initial = reference_scores(args, used, run, cell, prompts)
    with atomic_dir(args.out / "model") as tmp:
        # float32 master weights -> models.dtype, in place: the student evaluated below is the saved one
        basics.export_student(cell.student, cell.tok_s, tmp, dtype)
    fp = models.model_fingerprint(models.ModelRef(str(args.out / "model"), None), Path())
    s_metrics, predictions, scores = score_student(args, used, cell, fp, prompts, (teacher, t_gens, i_gens, initial))
    seconds = {k: round(sum(r["seconds"][k] for r in per_round), 1) for k in ("sample", "data", "train")}
    seconds["evaluate"] = round(time.perf_counter() - t_eval, 1)
    metrics = {
        "run": args.run,
        "method": run.method,
        "disable": list(run.disable),
        "online": run.online,
        "rounds": run.rounds,
        "teacher": run.teacher,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "train_seed": p.seed,
        "train": run_summary(rows, len(pairs), run.method),
        "per_round": per_round,
        "seconds": seconds,
        "cost": {
            **{k: sum(r["cost"][k] for r in per_round) for k in ("optimizer_steps", "sequences", "tokens")},
            "seconds": round(time.perf_counter() - done["started"], 1),
        },
        "student": s_metrics,
        "teacher_exact_match": (t_metrics.get("accuracy") or {}).get("exact_match"),
    }
    n = write_table(args.out / "predictions.parquet", predictions, PREDICTION_SCHEMA)
    write_table(args.prompt_scores, scores, PROMPT_SCORES)
    scores_dir = done["scores_dir"] if cell.scores is not None else None
    reference = {"reference_models": args.models / "teacher", "initial_student": args.models / "student"}
    lineage.write_manifest(
        args.out,
        "compare",
        used,
        inputs={**trainrun.lineage_inputs(cell.src, scores_dir, m), **done["extra_inputs"], **reference},
        outputs={"predictions.parquet": n},
        counts=metrics,
        extra={
            "bootstrap": args.bootstrap,
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
        "prompt_scores",
        "live",
        values={"run": str, "bootstrap": int, "seed": int},
    )
    started = time.perf_counter()
    used = params.load_sections(args.params, sections(args.run))
    threads = used["compare.threads"]
    if threads < 1:
        raise ParamsError(f"{args.params}: compare.threads: must be >= 1; got {threads}")
    # A fixed thread count per cell, whatever runs beside it: outputs do not depend on
    # how many cells run at once (`distillflow run --jobs 2` runs two on 2 cores).
    torch.set_num_threads(threads)
    run: RunParams = used[f"compare.runs.{args.run}"]
    # the training seed, nested in the bootstrap: the same for every run of (bootstrap, seed)
    p = cell_params(used, run, records.replicate_seed(args.seed, args.bootstrap))
    trainrun.check_served(p, used["score"])
    teachers = teachers_of(used)
    if teachers.several:
        raise ParamsError("models.teachers: the comparison distils from models.teacher alone; set models.teachers: []")
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
        teacher_info=scorestep.teacher_description(teachers, m.t_dir.parent, used["score"]),
        load_teacher=scorestep.teacher_loader(
            (m.s_ref, m.s_dir), teachers, m.t_dir.parent, trust, dtype, used["score"]
        ),
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
        started=started,
    )
    write_json(args.metrics, metrics)
    cell.checkpoint.clear()
    acc, s_metrics = metrics["student"].get("accuracy"), metrics["student"]
    log.info(
        "compare %s: exact match %s, KL %.4f, %s s",
        cell_name(args),
        acc["exact_match"] if acc else "n/a",
        s_metrics["kl_teacher_student"],
        metrics["seconds"],
    )


if __name__ == "__main__":
    entry.run_stage(main)
