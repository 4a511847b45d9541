"""What train, the round stage and the comparison cells share around the trainer: the
training inputs' strict gate (distillflow/audit/quality.py), loading the models, the
checkpoint key, the trainer's job, the manifest's inputs, and (train and the round stage)
writing the trained student's folder: the model in models.dtype with its model card,
the curriculum and the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch

from distillflow.audit import lineage, quality
from distillflow.base import models, records
from distillflow.base.config import TEACHER_SECTIONS, Dtype, ModelParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import atomic_dir, digest_path, read_table, write_json
from distillflow.base.teachers import TeacherSet
from distillflow.engines.scoring import ScoreParams
from distillflow.engines.served import ServedTeacher
from distillflow.stagekit import modelcard
from distillflow.training import basics, stored_topk, trainer
from distillflow.training.checkpoint import Checkpoint, run_key
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.summary import run_summary, tokens_trained
from distillflow.training.train_params import TrainParams

# The params sections a trained student's manifest records (the train stage's).
TRAIN_SECTIONS: dict[str, Any] = {
    **TEACHER_SECTIONS,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "train": TrainParams,
    "score": ScoreParams,  # its endpoint scores online samples with train.online.teacher served
    "quality": quality.QualityParams,
}


def gate_inputs(
    q: quality.QualityParams, src: Path, scores_dir: Path, p: TrainParams, eval_ids: pa.Array | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the curated pairs, the validation report): the pairs through the strict curated
    gate (with `eval_ids`, also disjoint from those eval prompts), and with the topk
    signal the teacher's scores file; any failure stops the stage. No Data Docs here:
    the files' Data Docs come from curate and score."""
    gates = quality.StageGates(q, None)
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict(
        "curated pairs", src, "curated", table, **({"refs": {"eval": eval_ids}} if eval_ids is not None else {})
    )
    if p.teacher_signal == "topk":  # streamed here, then read again by load_inputs
        gates.check_file("teacher top-k", scores_dir / "topk.parquet", "topk")
    return table.to_pylist(), gates.finish()


class Learner(Protocol):
    """The models a round trains: the student (float32 master weights), the teacher (None
    with the topk signal) and both tokenizers. `Prepared` is one; `Loaded` another."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tok_s: Any
    tok_t: Any


@dataclass
class Loaded:
    """A Learner loaded without a pairs file (trainer.load_models): the round stage's."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tok_s: Any
    tok_t: Any


@dataclass
class Prepared:
    """What a training run starts from, gated and loaded: the pairs and their validation
    report, the models and tokenizers (teacher None with the topk signal), the stored
    scores, and the checkpoint folder keyed by params, data and both models."""

    src: Path
    pairs: list[dict[str, Any]]
    validation: dict[str, Any]
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tok_s: Any
    tok_t: Any
    scores: Any
    checkpoint: Checkpoint


@dataclass(frozen=True)
class Models:
    """Where a run's two models are: the student (the initial one or the last round's)
    and the teacher, with the files that name them among the stage's lineage inputs."""

    s_ref: models.ModelRef
    s_dir: Path
    s_input: Path
    t_ref: models.ModelRef
    t_dir: Path
    t_input: Path


def prepare(
    p: TrainParams,
    q: quality.QualityParams,
    src: Path,
    scores_dir: Path,
    m: Models,
    trust: bool,
    dtype: str,
    out: Path,
    eval_ids: pa.Array | None = None,
) -> Prepared:
    """Gate the inputs (stops the stage on any failure), load the models, and key the
    checkpoint beside `out`: what train and a comparison cell do before training."""
    pairs, validation = gate_inputs(q, src, scores_dir, p, eval_ids)
    student, teacher, tok_s, tok_t, scores = trainer.load_inputs(
        p, m.s_ref, m.s_dir, m.t_ref, m.t_dir, scores_dir, trust, dtype
    )
    ckpt = checkpoint_for(p, src, m, dtype, out)
    return Prepared(src, pairs, validation, student, teacher, tok_s, tok_t, scores, ckpt)


def checkpoint_for(p: TrainParams, src: Path, m: Models, dtype: str, out: Path) -> Checkpoint:
    """The resumable checkpoint folder beside `out`, keyed by the params, the pairs file
    `src` and both models."""
    s_fp, t_fp = models.model_fingerprint(m.s_ref, m.s_dir), models.model_fingerprint(m.t_ref, m.t_dir)
    return Checkpoint.beside(out, run_key(p, digest_path(src), s_fp, t_fp, dtype))


def load_learner(p: TrainParams, m: Models, trust: bool, dtype: str) -> Loaded:
    """The student and (online signal) the teacher of `m`, with their tokenizers."""
    return Loaded(*trainer.load_models(p, m.s_ref, m.s_dir, m.t_ref, m.t_dir, trust, dtype))


def check_served(p: TrainParams, score: ScoreParams) -> None:
    """train.online.teacher served needs the endpoint in score.openai: refused before any
    model loads, naming the key."""
    if p.online.served and not score.openai.is_set:
        raise ParamsError(
            "score.openai: train.online.teacher is served, so the teacher's endpoint must be set "
            "(score.openai.base_url and score.openai.model)"
        )


def check_teachers(p: TrainParams, teachers: TeacherSet) -> None:
    """Several teachers (models.teachers) reach training only through the score stage's
    stored top-k of their mixture or routing: refused otherwise, before any model loads."""
    if not teachers.several:
        return
    n = len(teachers.teachers)
    if p.teacher_signal != "topk":
        raise ParamsError(
            f"train.teacher_signal: models.teachers lists {n} teachers, which the score stage mixes or routes into "
            "its stored top-k; set train.teacher_signal: topk"
        )
    if p.online.every > 0:
        raise ParamsError(
            f"train.online: samples drawn during training are scored by one teacher; models.teachers lists {n} "
            "(set train.online.every: 0)"
        )


def job(
    learner: Learner,
    p: TrainParams,
    round_index: int,
    curriculum: AlphaCurriculum,
    *,
    pairs: list[dict[str, Any]],
    scores: stored_topk.Scores | None,
    checkpoint: Checkpoint | None,
    live: Path | None,
    score: ScoreParams,
) -> trainer.Job:
    """The trainer's job for round `round_index` of `learner`'s models on `pairs` (and,
    with the topk signal, the teacher's stored `scores`); with train.online.teacher
    served, the teacher behind `score.openai` scores the samples (engines/served.py)."""
    served = ServedTeacher(score.openai, learner.tok_s, score.logprobs_via) if p.online.served else None
    return trainer.Job(
        score_samples=served.token_logprobs if served is not None else None,
        student=learner.student,
        teacher=learner.teacher,
        tok_s=learner.tok_s,
        tok_t=learner.tok_t,
        pairs=pairs,
        p=p,
        scores=scores,
        round_index=round_index,
        curriculum=curriculum,
        checkpoint=checkpoint,
        live=live,
    )


def train(learner: Learner, job: trainer.Job) -> list[dict[str, float]]:
    """trainer.train; the learner then holds the trained student whole (the gathered
    model under FSDP2, see distributed.gathered)."""
    rows = trainer.train(job)
    learner.student = job.student
    return rows


def lineage_inputs(src: Path, scores_dir: Path | None, m: Models) -> dict[str, Path]:
    """The manifest inputs every training run has: the pairs file `src`, the stored
    scores (scores_dir: the topk signal's folder, else None), the student it started
    from and the teacher."""
    return {
        "pairs": src,
        **({"scores": scores_dir / "topk.parquet"} if scores_dir is not None else {}),
        "student": m.s_input,
        "teacher": m.t_input,
    }


@dataclass(frozen=True, kw_only=True)
class Trained:
    """What a finished run of the train stage or of a round hands to `write_trained`."""

    learner: Learner
    pairs: list[dict[str, Any]]
    src: Path
    rows: list[dict[str, float]]
    curriculum: AlphaCurriculum
    round_index: int
    inputs: dict[str, Path]
    validation: dict[str, Any]


def write_trained(out: Path, used: dict[str, Any], m: Models, t: Trained, module: str) -> dict[str, Any]:
    """The trained student's folder, atomically: model/ (float32 master weights saved in
    models.dtype, with its model card), curriculum.json and manifest.json (stage `train`,
    written by stages/<module>.py). Returns the metrics (round and run summary)."""
    p: TrainParams = used["train"]
    dtype = used["models.dtype"]
    metrics = {"round": t.round_index, **run_summary(t.rows, len(t.pairs), p.method)}
    s_info, t_info = models.describe(m.s_ref, m.s_dir), models.describe(m.t_ref, m.t_dir)
    student, tok_s = t.learner.student, t.learner.tok_s
    with atomic_dir(out) as tmp:
        basics.export_student(student, tok_s, tmp / "model", dtype)
        card = modelcard.model_card(used, metrics, t.src, s_info, t_info, t.round_index)
        (tmp / "model" / "README.md").write_text(card)
        write_json(tmp / "curriculum.json", t.curriculum.state())
        sampled = t.rows[-1].get("sampled_tokens") if t.rows else None  # train.online
        tokens = tokens_trained(tok_s, t.pairs, p, None if sampled is None else int(sampled))
        lineage.write_manifest(
            tmp,
            "train",
            {k: used[k] for k in TRAIN_SECTIONS},
            inputs=t.inputs,
            outputs={"curriculum.json": len(t.curriculum.gaps_t)},
            counts=metrics,
            extra={
                "round": t.round_index,
                "rounds": p.total_rounds,
                "initial_student": s_info,
                "teacher": t_info,
                "validation": t.validation,
            },
            cost={"tokens_read": tokens, "tokens_trained": tokens, "optimizer_steps": len(t.rows)},
            module=module,
        )
    return metrics
