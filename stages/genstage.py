"""What the teacher and student stages share: generate responses for the train prompts.

The two stages differ only in which model (`models.teacher` / `models.student`) and
which sampling section (`teacher` / `student`) they use; both write
generations.parquet (records.GENERATION_SCHEMA) and manifest.json into their output
folder.

Generation runs in resumable shards (stages/lib/engines/shards.py) under `<out>.shards/`
beside the output folder; the folder is removed once the output is written. A run
killed half-way and started again generates only the shards it had not finished, and
writes the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, GenerationParams, ModelParams
from stages.lib.core.models import ModelRef
from stages.lib.data import records
from stages.lib.data.encoding import prompt_ids
from stages.lib.data.io import atomic_dir, digest_path, read_rows, write_json, write_table
from stages.lib.engines import shards
from stages.lib.engines.generation import (
    SEEDING,
    Engine,
    Shard,
    TransformersEngine,
    VllmEngine,
    engine_version,
    plan_shards,
    sampling_record,
)

log = logging.getLogger(__name__)

# Engines opened in this process (workers > 1 open theirs in worker processes): their
# request and cache counters go into the run's cost record.
_OPENED: list[Engine] = []


def sections(role: str) -> dict[str, Any]:
    """The params keys the `role` stage reads: its own model, not the other one."""
    return {
        f"models.{role}": ModelParams,
        "models.trust_remote_code": bool,
        "models.dtype": Dtype,
        role: GenerationParams,
        "quality": quality.QualityParams,
    }


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to open an engine, picklable for worker processes."""

    p: GenerationParams
    ref: ModelRef
    model_dir: Path
    trust_remote_code: bool
    dtype: str
    fingerprint: str


def fingerprint(p: GenerationParams, ref: ModelRef, model_dir: Path) -> str:
    """The `model` column: a local model's digest or hub id, or the API endpoint's model."""
    if p.engine == "openai":
        from stages.lib.engines.openai_engine import fingerprint as api_fingerprint

        assert p.openai is not None  # GenerationParams checks it for engine openai
        return api_fingerprint(p.openai)
    return models.fingerprint(ref, model_dir)


def open_engine(spec: EngineSpec) -> Engine:
    """Load the engine `spec.p.engine` names (in each worker process, when several)."""
    p = spec.p
    if p.engine == "openai":
        from stages.lib.engines.openai_engine import OpenAIEngine  # the openai client is an optional extra

        engine = OpenAIEngine(p)
        _OPENED.append(engine)
        return engine
    tok = models.load_tokenizer(spec.ref, spec.model_dir, spec.trust_remote_code)
    if p.engine == "vllm":
        where, revision = models.resolve(spec.ref, spec.model_dir)
        return VllmEngine(where, revision, tok, p, spec.fingerprint, spec.dtype, spec.trust_remote_code)
    model = models.load_model(spec.ref, spec.model_dir, spec.trust_remote_code, spec.dtype).to(p.device)
    return TransformersEngine(model, tok, p, spec.fingerprint)


def plan(spec: EngineSpec, prompts: list[dict[str, Any]]) -> list[Shard]:
    """The run's shards; the transformers engine buckets by prompt length in tokens."""
    lengths = None
    if spec.p.engine == "transformers":
        tok = models.load_tokenizer(spec.ref, spec.model_dir, spec.trust_remote_code)
        lengths = [len(prompt_ids(tok, pr["prompt"])) for pr in prompts]
    return plan_shards(spec.p, lengths, len(prompts))


def code_digest() -> dict[str, str]:
    """The generation code's files: shards made by other code are not resumed."""
    from stages.lib.core import config
    from stages.lib.data import encoding, io
    from stages.lib.engines import generation, openai_engine

    mods = [sys.modules[__name__], config, encoding, generation, io, models, openai_engine, records, shards]
    return {Path(m.__file__).name: digest_path(Path(m.__file__)) for m in mods if m.__file__ is not None}


def run(
    role: str,
    ref: ModelRef,
    trust_remote_code: bool,
    dtype: str,
    p: GenerationParams,
    prompts: list[dict[str, Any]],
    model_dir: Path,
    work: Path,
    part: tuple[int, int] | None = None,
    stats: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generate `p.num_samples` responses per prompt with the `role` model, resumably.

    Shards go to `work`; finished ones found there (for the same model, params, prompts
    and code) are reused. `part=(k, n)` generates only shards k, k + n, k + 2n, ... and
    returns no records (one of n machines sharing `work`; a full run gathers after).
    `stats`, when given, receives the shard counts (planned, generated, resumed).
    """
    spec = EngineSpec(p, ref, model_dir, trust_remote_code, dtype, fingerprint(p, ref, model_dir))
    planned = plan(spec, prompts)
    key = {
        "role": role,
        "model": spec.fingerprint,
        "engine": engine_version(p.engine),
        "sampling": sampling_record(p),
        "shard_size": p.shard_size,
        "prompts": records.content_id("prompt-list", *(pr["prompt_id"] for pr in prompts)),
        "plan": records.content_id("shard-plan", records.canonical_json([list(s.prompts) for s in planned])),
        "code": code_digest(),
    }
    shards.prepare(work, key)
    mine = planned if part is None else [s for s in planned if s.index % part[1] == part[0]]
    gpus = 0 if p.engine == "openai" or (p.engine == "transformers" and p.device == "cpu") else p.tensor_parallel_size
    generated = shards.generate(work, mine, prompts, open_engine, spec, p.workers, gpus)
    if stats is not None:
        stats |= {"shards": len(planned), "shards_generated": generated, "shards_resumed": len(mine) - generated}
    if part is not None:
        return []
    return shards.gather(work, planned, prompts, p.num_samples)


@dataclass(frozen=True)
class Inputs:
    used: dict[str, Any]
    p: GenerationParams
    ref: ModelRef
    model_dir: Path
    model_input: Path
    prompt_file: Path
    prompts: list[dict[str, Any]]


def inputs(role: str, params_file: Path, prompts_dir: Path, models_dir: Path, previous: Path | None) -> Inputs:
    """Params, model and prompts of the `role` stage. `previous` (on-policy rounds)
    samples previous/model, the student a previous round's train stage wrote."""
    used = params.load_sections(params_file, sections(role))
    if previous is None:
        ref: ModelRef = used[f"models.{role}"].ref()
        model_dir, model_input = models_dir / role, models.lineage_input(ref, models_dir, role)
    else:
        ref, model_dir, model_input = models.ModelRef(str(previous / "model"), None), Path(), previous / "model"
    prompt_file = prompts_dir / "train.parquet"
    return Inputs(
        used, used[role], ref, model_dir, model_input, prompt_file, read_rows(prompt_file, records.PROMPT_SCHEMA)
    )


def work_dir(out: Path) -> Path:
    """Where a stage writing `out` keeps its shards: beside it, never inside a DVC out."""
    return out.with_name(out.name + ".shards")


def generate_part(
    role: str,
    params_file: Path,
    prompts_dir: Path,
    models_dir: Path,
    out: Path,
    part: int,
    parts: int,
    previous: Path | None = None,
) -> None:
    """Generate shards part, part + parts, ... of the stage writing `out`, into its
    work folder, and nothing else: for an orchestrator (e.g. Prefect tasks mapped over
    `part` on several machines sharing the folder); the stage run afterwards finds
    those shards done and only gathers them."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in 0..{parts - 1}, got {part}")
    i = inputs(role, params_file, prompts_dir, models_dir, previous)
    run(
        role,
        i.ref,
        i.used["models.trust_remote_code"],
        i.used["models.dtype"],
        i.p,
        i.prompts,
        i.model_dir,
        work_dir(out),
        part=(part, parts),
    )


def describe_model(p: GenerationParams, ref: ModelRef, model_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if p.engine == "openai":
        assert p.openai is not None
        return {
            "endpoint": p.openai.base_url,
            "model": p.openai.model,
            "fingerprint": rows[0]["model"] if rows else None,
        }
    return models.describe(ref, model_dir)


def generation_cost(p: GenerationParams, rows: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
    """Tokens and cache hits for the run record. Tokens count every output row, those
    of resumed shards (generated by an earlier process) included; `shards_resumed` says
    how many shards that was. The openai engine's cache hits are counted for engines
    opened in this process (workers: 1); worker processes only log theirs."""
    cost: dict[str, Any] = {
        "tokens_read": sum(r["prompt_tokens"] for r in rows),
        "tokens_generated": sum(r["response_tokens"] for r in rows),
        "cache_hits": {"shards_resumed": stats["shards_resumed"]},
        "shards": stats["shards"],
    }
    if p.engine == "openai":
        from stages.lib.engines.openai_engine import OpenAIEngine

        opened = [e for e in _OPENED if isinstance(e, OpenAIEngine)]
        counted = p.workers == 1 or stats["shards_generated"] <= 1
        cost["cache_hits"]["openai_responses"] = sum(e.cache_hits for e in opened) if counted else None
        cost["openai_requests_sent"] = sum(e.requests for e in opened) if counted else None
    return cost


def main(role: str, doc: str | None) -> None:
    """`python -m stages.<role> --params P --prompts data/seed --models data/bootstrap --out data/<role>`.

    `--previous DIR` (on-policy rounds) samples DIR/model, the student a previous
    round's train stage wrote, instead of `models.<role>`.
    """
    args = entry.parse_paths(doc, "prompts", "models", "out", "metrics", optional=("previous", "docs"))
    i = inputs(role, args.params, args.prompts, args.models, args.previous)
    gates = quality.StageGates(i.used["quality"], args.docs)
    # the input, already read by inputs(), checked before any model time is spent
    gates.strict("prompts", i.prompt_file, "prompt", pa.Table.from_pylist(i.prompts, schema=records.PROMPT_SCHEMA))
    p, work = i.p, work_dir(args.out)
    stats: dict[str, Any] = {}
    rows = run(
        role,
        i.ref,
        i.used["models.trust_remote_code"],
        i.used["models.dtype"],
        p,
        i.prompts,
        i.model_dir,
        work,
        stats=stats,
    )
    finish = {reason: sum(r["finish_reason"] == reason for r in rows) for reason in ("stop", "length")}
    counts = {
        "prompts": len(i.prompts),
        "generations": len(rows),
        "finish_reason": finish,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "response_tokens": sum(r["response_tokens"] for r in rows),
    }
    # The output gate: ids unique and pointing at the prompts, lengths in bounds, and
    # for the teacher the share of truncated responses (a weak student may run long).
    prompt_ids = pa.array([pr["prompt_id"] for pr in i.prompts], type=pa.string())
    gates.strict(
        "generations",
        args.out / "generations.parquet",
        "generation",
        pa.Table.from_pylist(rows, schema=records.GENERATION_SCHEMA),
        refs={"prompt_id": prompt_ids},
        truncation=role == "teacher",
    )
    validation = gates.finish()
    counts["gates"] = quality.summary(validation)
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "generations.parquet", rows, records.GENERATION_SCHEMA)
        lineage.write_manifest(
            tmp,
            role,
            i.used,
            inputs={"prompts": i.prompt_file, "model": i.model_input},
            outputs={"generations.parquet": n},
            counts=counts,
            extra={
                "validation": validation,
                "model": describe_model(p, i.ref, i.model_dir, rows),
                # engine and version, the sampling record hashed into every generation id,
                # and how the seeds were derived from it
                "engine": rows[0]["engine"] if rows else engine_version(p.engine),
                "sampling": sampling_record(p),
                "seeding": SEEDING[p.engine],
            },
            cost=generation_cost(p, rows, stats),
        )
    write_json(args.metrics, counts)
    shutil.rmtree(work)
    log.info("%s: %d generations, %d stopped, %d hit max_new_tokens", role, len(rows), finish["stop"], finish["length"])
