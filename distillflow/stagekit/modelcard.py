"""The trained student's model card (README.md in the Hugging Face Hub format), written
into model/ by the train stage and each on-policy round (trainrun.write_trained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distillflow.base.io import digest_path
from distillflow.training.train_params import TrainParams


def _read_manifest(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def prompt_source(curate_manifest: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(params.seed.source, how it was found) by following the manifests from the
    curated pairs back to the seed stage; None with the reason when a link is missing
    or its digest does not match."""
    pairs_in = curate_manifest["inputs"].get("pairs")
    if pairs_in is None:
        return None, "the curate manifest names no pairs input"
    pairs_m = _read_manifest(Path(pairs_in["path"]).parent / "manifest.json")
    if pairs_m is None or pairs_m["outputs"].get(Path(pairs_in["path"]).name, {}).get("sha256") != pairs_in["sha256"]:
        return None, f"{Path(pairs_in['path']).parent}/manifest.json is missing or records other pairs than curate read"
    prompts_in = pairs_m["inputs"].get("prompts")
    seed_m = _read_manifest(Path(prompts_in["path"]).parent / "manifest.json") if prompts_in else None
    if (
        prompts_in is None
        or seed_m is None
        or seed_m["outputs"].get(Path(prompts_in["path"]).name, {}).get("sha256") != prompts_in["sha256"]
    ):
        return None, "the seed manifest is missing or records other prompts than pairs read"
    return seed_m["params"]["seed"][
        "source"
    ], f"{Path(prompts_in['path']).parent}/manifest.json (digests checked along curate -> pairs -> seed)"


def model_card(
    used: dict[str, Any],
    metrics: dict[str, Any],
    src: Path,
    s_info: dict[str, Any],
    t_info: dict[str, Any],
    round_index: int,
) -> str:
    """The trained student's README.md in the Hugging Face Hub format: YAML front
    matter, then method, training metrics and a lineage summary. Deterministic (no
    times): it lives inside the train stage's DVC out."""
    p: TrainParams = used["train"]
    curate_m = _read_manifest(src.parent / "manifest.json")
    source, found = (
        prompt_source(curate_m) if curate_m is not None else (None, f"{src.parent}/manifest.json is missing")
    )
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillflow", "knowledge-distillation", p.method],
    }
    if s_info.get("revision") is not None:  # a hub model at a pinned revision
        meta["base_model"] = s_info["name"]
    if source is not None and source["kind"] == "hf":
        meta["datasets"] = [source["path"]]
    counts = (curate_m or {}).get("counts", {})
    traced = json.dumps(source, sort_keys=True) if source is not None else "not traceable"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=True).strip(),
        "---",
        "",
        f"# distillflow student ({p.method}, round {round_index} of {p.total_rounds})",
        "",
        (
            f"Distilled from the teacher below with `train.method: {p.method}` (see distillflow's docs/training.md, "
            '"Methods"), on teacher (chosen) / student (rejected) preference pairs.'
        ),
        "",
        "## Training",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(metrics.items())),
        f"| seed | {p.seed} |",
        f"| epochs | {p.epochs} |",
        f"| lr | {p.lr} |",
        f"| batch size x grad accum | {p.batch_size} x {p.grad_accum_steps} |",
        "",
        "## Lineage",
        "",
        f"- teacher: `{t_info['name']}` fingerprint `{t_info['fingerprint']}`",
        f"- initial student: `{s_info['name']}` fingerprint `{s_info['fingerprint']}`",
        f"- training pairs: `{src.as_posix()}` sha256 `{digest_path(src)}`",
        f"- curation: {counts.get('pairs_in', '?')} pairs in, {counts.get('kept', '?')} kept, "
        f"dropped by reason {json.dumps(counts.get('dropped_by_reason', {}), sort_keys=True)}",
        f"- prompt source: {traced} (from {found})",
        "",
        (
            "`distillflow lineage show data/train/model` prints the full tree back to the source rows; "
            "`distillflow lineage verify` re-checks every digest."
        ),
        "",
    ]
    return "\n".join(lines)
