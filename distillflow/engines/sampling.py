"""Sampling a model's responses for a list of prompts, resumably: the teacher and
student stages' body (distillflow/stagekit/genstage.py wraps it for the command line), callable in
process with in-memory prompts (an on-policy round in a comparison cell, seed's
synthesis).

    rows = sampling.sample("student", p, ref, prompts, model_dir, work,
                           trust_remote_code=False, dtype="float32")

Generation runs in resumable shards (distillflow/engines/shards.py) under `work`: a run
killed half-way and started again generates only the shards it had not finished, and
returns the same rows an uninterrupted run returns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.base import models, records
from distillflow.base.config import GenerationParams
from distillflow.base.encoding import prompt_ids
from distillflow.base.io import digest_path
from distillflow.base.models import ModelRef
from distillflow.engines import shards
from distillflow.engines.generation import (
    Engine,
    Shard,
    TransformersEngine,
    engine_version,
    plan_shards,
    sampling_record,
)
from distillflow.engines.vllm_engine import VllmEngine

# Engines opened in this process (workers > 1 open theirs in worker processes): their
# request and cache counters go into the run's cost record.
_OPENED: list[Engine] = []


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Everything needed to open an engine, picklable for worker processes."""

    p: GenerationParams
    ref: ModelRef
    model_dir: Path
    trust_remote_code: bool
    dtype: str
    fingerprint: str


def generation_fingerprint(p: GenerationParams, ref: ModelRef, model_dir: Path) -> str:
    """The `model` column: a local model's digest or hub id, or the API endpoint's model."""
    if p.engine == "openai":
        from distillflow.engines.openai_engine import endpoint_fingerprint

        assert p.openai is not None  # GenerationParams checks it for engine openai
        return endpoint_fingerprint(p.openai)
    return models.model_fingerprint(ref, model_dir)


def open_engine(spec: EngineSpec) -> Engine:
    """Load the engine `spec.p.engine` names (in each worker process, when several)."""
    p = spec.p
    if p.engine == "openai":
        from distillflow.engines.openai_engine import OpenAIEngine  # the openai client is an optional extra

        engine = OpenAIEngine(p)
        _OPENED.append(engine)
        return engine
    tok = models.load_tokenizer(spec.ref, spec.model_dir, spec.trust_remote_code)
    if p.engine == "vllm":
        where, revision = models.resolve(spec.ref, spec.model_dir)
        return VllmEngine(where, revision, tok, p, spec.fingerprint, spec.dtype, spec.trust_remote_code)
    model = models.load_model(spec.ref, spec.model_dir, spec.trust_remote_code, spec.dtype).to(p.device)
    return TransformersEngine(model, tok, p, spec.fingerprint)


def prompt_lengths(spec: EngineSpec, role: str, prompts: list[dict[str, Any]]) -> list[int] | None:
    """Each prompt's length in tokens (None for the openai engine: its tokenizer is the
    server's). Refuses, before anything is generated, a model whose max positions do not
    hold the longest prompt plus `max_new_tokens`."""
    if spec.p.engine == "openai":
        return None
    tok = models.load_tokenizer(spec.ref, spec.model_dir, spec.trust_remote_code)
    lengths = [len(prompt_ids(tok, pr["prompt"])) for pr in prompts]
    models.check_positions(
        models.config_max_positions(spec.ref, spec.model_dir, spec.trust_remote_code),
        f"models.{role} ({spec.ref.name})",
        max(lengths, default=0),
        spec.p.max_new_tokens,
        f"{role}.max_new_tokens",
    )
    return lengths


def shard_plan(spec: EngineSpec, prompts: list[dict[str, Any]], lengths: list[int] | None) -> list[Shard]:
    """The run's shards; the transformers engine buckets by prompt length in tokens."""
    return plan_shards(spec.p, lengths if spec.p.engine == "transformers" else None, len(prompts))


def generation_code_digest() -> dict[str, str]:
    """The generation code's files: shards made by other code are not resumed."""
    from distillflow.base import config, encoding, io
    from distillflow.engines import generation, openai_engine, vllm_engine

    mods = [
        sys.modules[__name__],
        config,
        encoding,
        generation,
        io,
        models,
        openai_engine,
        records,
        shards,
        vllm_engine,
    ]
    return {Path(m.__file__).name: digest_path(Path(m.__file__)) for m in mods if m.__file__ is not None}


def sample(
    role: str,
    p: GenerationParams,
    ref: ModelRef,
    prompts: list[dict[str, Any]],
    model_dir: Path,
    work: Path,
    *,
    trust_remote_code: bool,
    dtype: str,
    part: tuple[int, int] | None = None,
    stats: dict[str, Any] | None = None,
    done_in: Path | None = None,
) -> list[dict[str, Any]]:
    """Generate `p.num_samples` responses per prompt with the `role` model, resumably;
    records.GENERATION_SCHEMA rows in prompt order.

    Shards go to `work`; finished ones found there (for the same model, params, prompts
    and code) are reused. `part=(k, n)` generates only shards k, k + n, k + 2n, ... and
    returns no records (one of n machines sharing `work`; a full run gathers after).
    `stats`, when given, receives the shard counts (planned, generated, resumed).
    `done_in` (for a part): another folder whose finished shards for the same plan count
    as done (the stage's work folder, where earlier parts were merged).
    """
    spec = EngineSpec(
        p=p,
        ref=ref,
        model_dir=model_dir,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        fingerprint=generation_fingerprint(p, ref, model_dir),
    )
    planned = shard_plan(spec, prompts, prompt_lengths(spec, role, prompts))
    key = {
        "role": role,
        "model": spec.fingerprint,
        "engine": engine_version(p.engine),
        "sampling": sampling_record(p),
        "shard_size": p.shard_size,
        "prompts": records.content_id("prompt-list", *(pr["prompt_id"] for pr in prompts)),
        "plan": records.content_id("shard-plan", records.canonical_json([list(s.prompts) for s in planned])),
        "code": generation_code_digest(),
    }
    shards.prepare(work, key)
    mine = planned if part is None else [s for s in planned if s.index % part[1] == part[0]]
    if done_in is not None:
        elsewhere = shards.done_for(done_in, key, [s.index for s in mine])
        mine = [s for s in mine if s.index not in elsewhere]
    gpus = 0 if p.engine == "openai" or (p.engine == "transformers" and p.device == "cpu") else p.tensor_parallel_size
    generated = shards.run_shards(work, mine, prompts, open_engine, spec, p.workers, gpus)
    if stats is not None:
        stats |= {"shards": len(planned), "shards_generated": generated, "shards_resumed": len(mine) - generated}
    if part is not None:
        return []
    return shards.gather(work, planned, prompts, p.num_samples)


def counts(prompts: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The generation stage's counts: prompts, generations, finish reasons, tokens."""
    return {
        "prompts": len(prompts),
        "generations": len(rows),
        "finish_reason": {reason: sum(r["finish_reason"] == reason for r in rows) for reason in ("stop", "length")},
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "response_tokens": sum(r["response_tokens"] for r in rows),
    }


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
        from distillflow.engines.openai_engine import OpenAIEngine

        opened = [e for e in _OPENED if isinstance(e, OpenAIEngine)]
        counted = p.workers == 1 or stats["shards_generated"] <= 1
        cost["cache_hits"]["openai_responses"] = sum(e.cache_hits for e in opened) if counted else None
        cost["openai_requests_sent"] = sum(e.requests for e in opened) if counted else None
    return cost
