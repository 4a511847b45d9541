"""What the teacher and student stages share: generate responses for the train prompts.

The two stages differ only in which model (`models.teacher` / `models.student`) and
which sampling section (`teacher` / `student`) they use; both write
generations.parquet (records.GENERATION_SCHEMA) and manifest.json into their output
folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages.lib import cli, lineage, models, params, records
from stages.lib.config import Dtype, GenerationParams, ModelParams
from stages.lib.models import ModelRef
from stages.lib.generation import generate_transformers, generate_vllm
from stages.lib.io import atomic_dir, read_rows, write_json, write_table

log = logging.getLogger(__name__)


def sections(role: str) -> dict[str, Any]:
    """The params keys the `role` stage reads: its own model, not the other one."""
    return {f"models.{role}": ModelParams, "models.trust_remote_code": bool, "models.dtype": Dtype, role: GenerationParams}


def run(role: str, ref: ModelRef, trust_remote_code: bool, dtype: str, p: GenerationParams, prompts: list[dict[str, Any]], model_dir: Path) -> list[dict[str, Any]]:
    """Generate `p.num_samples` responses per prompt with the `role` model."""
    fp = models.fingerprint(ref, model_dir)
    tok = models.load_tokenizer(ref, model_dir, trust_remote_code)
    if p.engine == "vllm":
        where, revision = models.resolve(ref, model_dir)
        return generate_vllm(where, revision, tok, prompts, p, fp, dtype, trust_remote_code)
    model = models.load_model(ref, model_dir, trust_remote_code, dtype)
    return generate_transformers(model, tok, prompts, p, fp, desc=f"{role} generate")


def main(role: str, doc: str | None) -> None:
    """`python -m stages.<role> --params P --prompts data/seed --models data/bootstrap --out data/<role>`.

    `--previous DIR` (on-policy rounds) samples DIR/model, the student a previous
    round's train stage wrote, instead of `models.<role>`.
    """
    args = cli.parse_paths(doc, "prompts", "models", "out", "metrics", optional=("previous",))
    used = params.load_sections(args.params, sections(role))
    p: GenerationParams = used[role]
    if args.previous is None:
        ref: ModelRef = used[f"models.{role}"].ref()
        model_dir, model_input = args.models / role, models.lineage_input(ref, args.models, role)
    else:
        ref, model_dir, model_input = models.ModelRef(str(args.previous / "model"), None), Path(), args.previous / "model"
    prompt_file = args.prompts / "train.parquet"
    prompts = read_rows(prompt_file, records.PROMPT_SCHEMA)
    rows = run(role, ref, used["models.trust_remote_code"], used["models.dtype"], p, prompts, model_dir)
    finish = {reason: sum(r["finish_reason"] == reason for r in rows) for reason in ("stop", "length")}
    counts = {
        "prompts": len(prompts),
        "generations": len(rows),
        "finish_reason": finish,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "response_tokens": sum(r["response_tokens"] for r in rows),
    }
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "generations.parquet", rows, records.GENERATION_SCHEMA)
        lineage.write_manifest(
            tmp, role, used,
            inputs={"prompts": prompt_file, "model": model_input},
            outputs={"generations.parquet": n},
            counts=counts,
            extra={"model": models.describe(ref, model_dir), "engine": rows[0]["engine"] if rows else None},
        )
    write_json(args.metrics, counts)
    log.info("%s: %d generations, %d stopped, %d hit max_new_tokens", role, len(rows), finish["stop"], finish["length"])
