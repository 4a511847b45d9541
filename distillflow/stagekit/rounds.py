"""One on-policy round: sample the student, pair its samples with the teacher's
responses, curate, score, train (docs/training.md, "Batched on-policy rounds").

`run_round` is the round. The round stage (stages/round.py: rounds 2..E of the default
pipeline, `train.rounds`) and every comparison cell (stages/compare.py: its rounds
2..E) call it. They differ in one thing, where the student's samples come from (a
`Sampler`): the round stage samples the model the last round saved, with the `student`
section's engine (resumable shards, any engine: what the student stage runs); a cell
samples the student it holds in memory with transformers.

A round writes what the student, pairs, curate and score stages write, each folder
with its manifest, through the same steps
(genstage, pairstep, curating and scorestep in distillflow/stagekit/), under its
folder: student/generations.parquet; pairs/pairs.parquet and quarantine.parquet;
curate/curated.parquet and quarantine.parquet; score/topk.parquet (the teacher's top-k
on the curated pairs with `train.teacher_signal: topk`; with the online signal the
trainer reads the teacher itself, so an empty file says so). Then it trains the
student in place on the curated pairs, through the same input gate as the train stage;
the caller saves the student (trainrun.write_trained) or goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.base import records
from distillflow.base.config import GenerationParams
from distillflow.base.io import DataError, read_rows
from distillflow.stagekit import curating, genstage, pairstep, scorestep, trainrun
from distillflow.stagekit.writer import Writer
from distillflow.training import distributed, stored_topk
from distillflow.training.checkpoint import Checkpoint
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.train_params import TrainParams

__all__ = ["Sampler", "RoundInputs", "RoundResult", "previous_round", "run_round"]


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """Where a round's student samples come from. `p`: the sampling settings it uses
    (the student folder's manifest records them: a cell derives its own seed);
    `generate(prompts)` returns records.GENERATION_SCHEMA rows in prompt order and may
    fill `stats` with its shard
    counts (sampling.sample's); `describe(rows)` describes the sampled model for the
    student folder's manifest, `model_input` is the file that names it among the inputs
    (None for a student held in memory)."""

    p: GenerationParams
    generate: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    describe: Callable[[list[dict[str, Any]]], dict[str, Any]]
    model_input: Path | None
    stats: dict[str, Any] = field(default_factory=lambda: {"shards": 1, "shards_generated": 1, "shards_resumed": 0})


@dataclass(frozen=True, kw_only=True)
class RoundInputs:
    """What every round of a run reads: the params sections (the steps' and train's),
    the stage module running the rounds (its code goes into the manifests), the seed's
    folder (train.parquet, eval.parquet), the teacher's generations, the Data Docs
    folder (a subfolder per step) and how to load the teacher for scoring."""

    used: dict[str, Any]
    module: str
    prompts_dir: Path
    teacher_file: Path
    teacher_info: dict[str, Any]
    load_teacher: Callable[[], tuple[Any, Any]]
    docs: Path | None = None


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """A trained round: the models it trained and their checkpoint (None without), the
    curated pairs it trained on (and their file), the training input gate's report, each
    step's counts, the training log and the seconds spent sampling, on the data steps and
    training."""

    learner: trainrun.Learner
    checkpoint: Checkpoint | None
    pairs: list[dict[str, Any]]
    src: Path
    validation: dict[str, Any]
    counts: dict[str, Any]
    rows: list[dict[str, float]]
    seconds: dict[str, float]


def previous_round(previous: Path, p: TrainParams) -> tuple[int, AlphaCurriculum]:
    """(this round's number, the curriculum carried over) for `--previous DIR`, the
    train output of the round before; checks it is the entry params.yaml names."""
    manifest_file = previous / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{previous}: no manifest.json; --previous must be a train stage's output folder")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("stage") != "train" or "round" not in manifest:
        raise DataError(
            f"{manifest_file}: not a train stage's manifest (stage {manifest.get('stage')!r}); "
            "--previous must be a train stage's output folder"
        )
    e = manifest["round"] + 1
    round_entry = p.rounds.get(f"r{e}")
    if round_entry is None or Path(round_entry.previous) != previous:
        raise ValueError(
            f"train.rounds: {previous} holds round {e - 1}, so this is round {e}, "
            f"but train.rounds.r{e} is {round_entry}; r{e} must have previous: {previous}"
        )
    state = json.loads((previous / "curriculum.json").read_text())
    curriculum = AlphaCurriculum(p.distillm2)
    curriculum.gaps_t, curriculum.gaps_s = state["gaps_t"], state["gaps_s"]
    return e, curriculum


def round_data(ri: RoundInputs, folder: Path, sampler: Sampler, topk: bool) -> tuple[dict[str, Any], float]:
    """The round's four data steps into `folder`: (each step's counts, seconds sampling)."""

    def writer(name: str) -> Writer:
        used = {**ri.used, "student": sampler.p}  # the settings the samples were drawn with
        return Writer(out=folder / name, module=ri.module, used=used, docs=ri.docs / name if ri.docs else None)

    prompt_file = ri.prompts_dir / "train.parquet"
    prompts = read_rows(prompt_file, records.PROMPT_SCHEMA)
    teacher = read_rows(ri.teacher_file, records.GENERATION_SCHEMA)
    w = writer("student")
    gates = w.gates()
    gates.strict("prompts", prompt_file, "prompt", pa.Table.from_pylist(prompts, schema=records.PROMPT_SCHEMA))
    t0 = time.perf_counter()
    gens = sampler.generate(prompts)
    sample_seconds = time.perf_counter() - t0
    inputs = {"prompts": prompt_file, **({"model": sampler.model_input} if sampler.model_input else {})}
    counts = {
        "student": genstage.write_generations(
            w, gates, "student", prompts, gens, inputs, sampler.describe(gens), sampler.stats
        )
    }
    files = {"prompts": prompt_file, "teacher": ri.teacher_file, "student": folder / "student" / "generations.parquet"}
    counts["pairs"] = pairstep.write_pairs(writer("pairs"), prompts, teacher, gens, files)
    counts["curate"] = curating.write_curated(writer("curate"), folder / "pairs" / "pairs.parquet", ri.prompts_dir)
    skipped = None if topk else "train.teacher_signal is online: the trainer reads the teacher itself"
    counts["score"] = scorestep.write_scores(
        writer("score"),
        folder / "curate" / "curated.parquet",
        ri.load_teacher if topk else None,
        ri.teacher_info,
        skipped,
    )
    return counts, sample_seconds


def run_round(
    ri: RoundInputs,
    load: Callable[[], trainrun.Learner],
    p: TrainParams,
    e: int,
    curriculum: AlphaCurriculum,
    folder: Path,
    sampler: Sampler,
    *,
    checkpoint: Callable[[Path], Checkpoint] | None = None,
    live: Path | None = None,
    eval_ids: pa.Array | None = None,
) -> RoundResult:
    """Round `e`: the data steps into `folder` (round_data), then the student of
    `load()` (called after sampling, so an engine and the training models are not held
    at once where the caller loads them afresh) trained in place on the curated pairs,
    after the train stage's input gate (with `eval_ids`, also disjoint from those
    prompts). `checkpoint(src)`: the resumable checkpoint for the pairs file `src`
    (None: no checkpoints); `live`: the DVCLive folder."""
    t0 = time.perf_counter()
    topk = p.teacher_signal == "topk"
    # Under a launcher rank 0 alone writes the round's data; the others wait, then
    # every rank trains its share on it.
    counts, sample_seconds = round_data(ri, folder, sampler, topk) if distributed.rank_and_size()[0] == 0 else ({}, 0.0)
    distributed.barrier()
    src, scores_dir = folder / "curate" / "curated.parquet", folder / "score"
    pairs, validation = trainrun.gate_inputs(ri.used["quality"], src, scores_dir, p, eval_ids)
    learner = load()
    t1 = time.perf_counter()
    ckpt = checkpoint(src) if checkpoint is not None else None
    scores = stored_topk.load_scores(p, scores_dir)
    rows = trainrun.train(
        learner,
        trainrun.job(
            learner, p, e, curriculum, pairs=pairs, scores=scores, checkpoint=ckpt, live=live, score=ri.used["score"]
        ),
    )
    seconds = {
        "sample": round(sample_seconds, 1),
        "data": round(t1 - t0 - sample_seconds, 1),
        "train": round(time.perf_counter() - t1, 1),
    }
    return RoundResult(
        learner=learner,
        checkpoint=ckpt,
        pairs=pairs,
        src=src,
        validation=validation,
        counts=counts,
        rows=rows,
        seconds=seconds,
    )
