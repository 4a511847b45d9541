"""What train and the comparison cells share around the trainer: the training inputs'
strict gate (distillflow/audit/quality.py), loading the models, the checkpoint key, the
trainer's job and the manifest's inputs. Each then exports the student
(training.basics.export_student) and writes its manifest (audit.lineage.write_manifest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from distillflow.audit import quality
from distillflow.base import models, records
from distillflow.base.io import digest_path, read_table
from distillflow.training import trainer
from distillflow.training.checkpoint import Checkpoint, run_key
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.train_params import TrainParams


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
    s_fp, t_fp = models.model_fingerprint(m.s_ref, m.s_dir), models.model_fingerprint(m.t_ref, m.t_dir)
    key = run_key(p, digest_path(src), s_fp, t_fp, dtype)
    ckpt = Checkpoint.beside(out, key)
    return Prepared(src, pairs, validation, student, teacher, tok_s, tok_t, scores, ckpt)


def job(
    run: Prepared,
    p: TrainParams,
    round_index: int,
    curriculum: AlphaCurriculum,
    *,
    pairs: list[dict[str, Any]] | None = None,
    checkpoint: bool,
    live: Path | None,
) -> trainer.Job:
    """The trainer's job for one round of `run` (its gated pairs unless `pairs` are given)."""
    return trainer.Job(
        student=run.student,
        teacher=run.teacher,
        tok_s=run.tok_s,
        tok_t=run.tok_t,
        pairs=run.pairs if pairs is None else pairs,
        p=p,
        scores=run.scores,
        round_index=round_index,
        curriculum=curriculum,
        checkpoint=run.checkpoint if checkpoint else None,
        live=live,
    )


def lineage_inputs(run: Prepared, scores_dir: Path, m: Models) -> dict[str, Path]:
    """The manifest inputs every training run has: the pairs, the stored scores (topk
    signal), the student it started from and the teacher."""
    return {
        "pairs": run.src,
        **({"scores": scores_dir / "topk.parquet"} if run.scores is not None else {}),
        "student": m.s_input,
        "teacher": m.t_input,
    }
