"""train: distil the teacher into the student on the curated pairs.

    python -m stages.train --params params.yaml --pairs data/curate --scores data/score \
        --models data/bootstrap --out data/train --metrics metrics/train.json --live plots/train

`train.method` picks the objective (distillflow/training/methods/): `distillm2` (default),
`distillm`, `gkd`, `kd`, `sft`, `dpkd`, all on the same pairs with the same loop. The
DistiLLM-2 objective (docs/METHOD.md), per pair i:

    L_i = (1 - beta) * SKL_seq(chosen_i; alpha_t,i) + beta * SRKL_seq(rejected_i; alpha_s,i)

with beta rising on a schedule and alpha adapted per sequence (switches:
`train.distillm2.contrastive`, `.beta_ramp`, `.adaptive_alpha`). Every optimizer step
is logged through DVCLive into the --live folder (loss, its parts, beta, alpha
mean/min/max, lr, grad norm: plots/metrics/<name>.tsv).

Memory: with `logits: chunked` the loss is computed chunk by chunk from the models'
final hidden states, so full (B, T, V) logits never exist. Long runs save a resumable
checkpoint every `checkpoint_every` steps into `<out>.checkpoints/`; a killed run picks
up from it (when params, data and models are unchanged) and ends with the same
weights as an uninterrupted run. The loop, checkpoints and logging live in
distillflow/training/ (trainer.py, shared with the comparison cells). The distilled
student is saved with save_pretrained (safetensors) in out/model.

Data parallel: the same command under `torchrun --nproc_per_node=N -m stages.train ...`
(gloo on CPU, nccl on GPU) gives the loss curve of one process with the same global
batch (distillflow/training/distributed.py). `bf16_autocast` and `gradient_checkpointing` are
for GPUs.

Precision: the student trains with float32 master weights whatever `models.dtype` says
(a bfloat16 weight would lose most AdamW updates at lr 1e-5); `train.bf16_autocast`
computes under bf16 autocast; out/model is saved in `models.dtype` (its config's `dtype`
says so). The teacher stays in `models.dtype` (frozen).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from distillflow.audit import lineage, quality
from distillflow.base import models, params
from distillflow.base.config import Dtype, ModelParams
from distillflow.base.io import DataError, atomic_dir, digest_path, write_json
from distillflow.stagekit import entry, trainrun
from distillflow.training import basics, distributed, trainer
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.summary import run_summary, tokens_trained
from distillflow.training.train_params import TrainParams

log = logging.getLogger("train")

SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "train": TrainParams,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)


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
            f"Distilled from the teacher below with `train.method: {p.method}` (see the distillflow README, "
            '"Methods, ablations and the training engine"), on teacher (chosen) / student (rejected) preference pairs.'
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


def log_done(round_index: int, p: TrainParams, rows: list[dict[str, float]], n_pairs: int, seconds: float) -> None:
    what = f"round {round_index} of {p.total_rounds}, {p.method}, {len(rows)} steps on {n_pairs} pairs"
    log.info("train: %s in %.1fs, final loss %.4f", what, seconds, rows[-1]["loss"])


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "scores", "models", "out", "metrics", "live", optional=("previous",))
    used = params.load_sections(args.params, SECTIONS)
    p: TrainParams = used["train"]
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    s_dir, s_input = args.models / "student", models.lineage_input(s_ref, args.models, "student")
    round_index, curriculum = 1, AlphaCurriculum(p.distillm2)
    if args.previous is not None:  # an on-policy round after the first: start from the last round's student
        round_index, curriculum = previous_round(args.previous, p)
        s_ref, s_dir, s_input = models.ModelRef(str(args.previous / "model"), None), Path(), args.previous / "model"
    m = trainrun.Models(
        s_ref, s_dir, s_input, t_ref, args.models / "teacher", models.lineage_input(t_ref, args.models, "teacher")
    )
    distributed.init_from_env(p.device)
    run = trainrun.prepare(p, used["quality"], args.pairs / "curated.parquet", args.scores, m, trust, dtype, args.out)
    t0 = time.perf_counter()
    rows = trainer.train(trainrun.job(run, p, round_index, curriculum, checkpoint=True, live=args.live))
    rank, _ = distributed.rank_and_size()
    distributed.finish()
    if rank != 0:
        return  # every process holds the same weights and logs; one writes them
    log_done(round_index, p, rows, len(run.pairs), time.perf_counter() - t0)
    metrics = {"round": round_index, **run_summary(rows, len(run.pairs), p.method)}
    s_info, t_info = models.describe(s_ref, s_dir), models.describe(t_ref, m.t_dir)
    with atomic_dir(args.out) as tmp:
        basics.export_student(run.student, run.tok_s, tmp / "model", dtype)  # float32 master weights -> models.dtype
        (tmp / "model" / "README.md").write_text(model_card(used, metrics, run.src, s_info, t_info, round_index))
        write_json(tmp / "curriculum.json", curriculum.state())
        tokens = tokens_trained(run.tok_s, run.pairs, p)
        lineage.write_manifest(
            tmp,
            "train",
            used,
            inputs=trainrun.lineage_inputs(run, args.scores, m),
            outputs={"curriculum.json": len(curriculum.gaps_t)},
            counts=metrics,
            extra={
                "round": round_index,
                "rounds": p.total_rounds,
                "initial_student": s_info,
                "teacher": t_info,
                "validation": run.validation,
            },
            cost={"tokens_read": tokens, "tokens_trained": tokens, "optimizer_steps": len(rows)},
        )
    write_json(args.metrics, metrics)
    run.checkpoint.clear()


if __name__ == "__main__":
    entry.run_stage(main)
