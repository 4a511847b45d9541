"""The score step (distillflow/stagekit/writer.py): the score stage runs it on the
curated pairs, an on-policy round (rounds.py) on its own with the topk signal."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distillflow.audit import lineage, quality
from distillflow.base import models, records
from distillflow.base.config import TEACHER_SECTIONS, Dtype, ModelParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import atomic_dir, read_table
from distillflow.base.stream import ParquetSink
from distillflow.base.teachers import TeacherSet
from distillflow.engines import scoring
from distillflow.engines.openai_engine import endpoint_fingerprint
from distillflow.engines.scoring import ScoreParams
from distillflow.engines.served import ServedTeacher
from distillflow.engines.vllm_scoring import VllmTeacher
from distillflow.stagekit.writer import Writer

SCORE_SECTIONS: dict[str, Any] = {
    **TEACHER_SECTIONS,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "score": ScoreParams,
    "quality": quality.QualityParams,
}


def teacher_loader(
    student: tuple[models.ModelRef, Path],
    teachers: TeacherSet,
    models_dir: Path,
    trust: bool,
    dtype: str,
    score: ScoreParams,
) -> Callable[[], tuple[Any, Any]]:
    """A function giving (the scorer, its tokenizer) for write_scores: the teacher model
    (its folder under `models_dir`, bootstrap's output) on `score.device` and its
    tokenizer (`score.engine: vllm`: loaded by vLLM's offline engine,
    engines/vllm_scoring.py), or with `score.engine: openai` the served teacher
    (engines/served.py) and the student's tokenizer, which the endpoint must share.
    Several teachers (models.teachers): a scoring.Mixture of them all, transformers only."""
    if teachers.several and score.engine != "transformers" and score.k > 0:
        raise ParamsError(
            f"score.engine: {score.engine} scores one teacher; models.teachers lists {len(teachers.teachers)} "
            "(mixing or routing them needs score.engine transformers)"
        )
    first = teachers.teachers[0]

    def load() -> tuple[Any, Any]:
        if score.engine == "openai":
            tok = models.load_tokenizer(*student, trust)
            return ServedTeacher(score.openai, tok, score.logprobs_via), tok
        tok = models.load_tokenizer(first.ref, models_dir / first.role, trust)
        if score.engine == "vllm":
            where, revision = models.resolve(first.ref, models_dir / first.role)
            return VllmTeacher(where, revision, tok, score.device, dtype, trust), tok
        loaded = [
            models.load_model(t.ref, models_dir / t.role, trust, dtype).to(score.device) for t in teachers.teachers
        ]
        return (scoring.Mixture(loaded, teachers) if teachers.several else loaded[0]), tok

    return load


def teacher_description(teachers: TeacherSet, models_dir: Path, score: ScoreParams) -> dict[str, Any]:
    """What the score manifest records of the teacher: the local model (each of several,
    with its weight, and the routing), or the endpoint."""
    if score.engine == "openai":
        return {"endpoint": endpoint_fingerprint(score.openai), "engine": "openai"}
    if teachers.several:
        described = {
            t.label: {**models.describe(t.ref, models_dir / t.role), "weight": t.weight} for t in teachers.teachers
        }
        return {"teachers": described, "routing": teachers.routing}
    first = teachers.teachers[0]
    return models.describe(first.ref, models_dir / first.role)


def stream_topk(path: Path, batches: Iterable[pa.RecordBatch], batch_rows: int) -> tuple[int, int]:
    """Stream top-k record batches into `path` (row groups of `batch_rows`, atomically):
    (rows, response positions) written. Only one model batch and one row group's worth of
    Arrow buffers are held at a time. write_scores passes 2 * score.batch_size (a top-k
    row is positions x k entries, so quality.batch_rows rows could be gigabytes)."""
    positions = 0
    with ParquetSink(path, records.TOPK_SCHEMA, batch_rows) as sink:
        for batch in batches:
            sink.write(batch)
            positions += pc.sum(batch.column("positions")).as_py() or 0
    return sink.rows, positions


def gate_topk(gates: quality.StageGates, path: Path, shown: Path, vocab_size: int | None, pair_ids: list[str]) -> None:
    """The strict output gate over the written file, streamed in batches of
    quality.batch_rows: finite, sorted log-probs, token ids below `vocab_size` (the
    tokenizer's length: head rows past it are padding), every pair id known."""
    gates.check_file(
        "teacher top-k",
        path,
        "topk",
        shown=shown,
        vocab_size=vocab_size,
        refs={"pair_id": pa.array(pair_ids, type=pa.string())},
    )


def write_scores(
    w: Writer,
    src: Path,
    load: Callable[[], tuple[Any, Any]] | None,
    teacher_info: dict[str, Any],
    skipped: str | None = None,
) -> dict[str, Any]:
    """topk.parquet (records.TOPK_SCHEMA) and the manifest: the teacher's top-k signal on
    every curated pair of `src` (engines/scoring.py), streamed in row groups of
    2 x score.batch_size rows and gated as it is read back. `load` gives (teacher,
    tokenizer), or (a served teacher, the student's tokenizer) with score.engine openai
    (teacher_loader), called once the input passed its gate; None writes an empty file
    (`score.k: 0`, or `skipped`: why a round does not need the signal)."""
    p: ScoreParams = w.used["score"]
    gates = w.gates()
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict("curated pairs", src, "curated", table)
    pairs = table.to_pylist()
    batches: Iterable[pa.RecordBatch] = ()
    vocab: int | None = None
    if load is not None:
        teacher, tok = load()
        vocab = len(tok)  # ids past the tokenizer are head padding, never real tokens
        if isinstance(teacher, ServedTeacher | VllmTeacher):  # score.engine: openai or vllm
            batches = teacher.score_batches(pairs, p.k, p.batch_size)
        else:
            batches = scoring.score_batches(teacher, tok, pairs, p)
    with atomic_dir(w.out) as tmp:
        n, positions = stream_topk(tmp / "topk.parquet", batches, 2 * p.batch_size)
        gate_topk(gates, tmp / "topk.parquet", w.out / "topk.parquet", vocab, [pr["pair_id"] for pr in pairs])
        validation = gates.finish()
        counts = {
            "pairs": len(pairs),
            "rows": n,
            "k": p.k if load is not None else 0,
            "positions": positions,
            **({"skipped": skipped} if skipped else {}),
            "gates": quality.validation_summary(validation),
        }
        lineage.write_manifest(
            tmp,
            "score",
            w.only(SCORE_SECTIONS),
            inputs={"pairs": src},
            outputs={"topk.parquet": n},
            counts=counts,
            extra={"teacher": teacher_info, "validation": validation},
            module=w.module,
            step=w.is_step("score"),
        )
    return counts
