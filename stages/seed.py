"""seed: the prompt sets, train and eval, disjoint by construction.

    python -m stages.seed --params params.yaml --out data/seed --metrics metrics/seed.json

Sources (params.yaml `seed.source.kind`, distillflow/data/sources.py):
- toy: the embedded task's generator (`task`), with ground-truth answers;
- jsonl / parquet: a local file, prompt text in `seed.source.field`;
- hf: a Hugging Face dataset (`path` = name, `config`, `split`, `revision`, `field`).

Every prompt is normalised (NFC, whitespace collapsed) and gets a content id. Empty
prompts, over-long prompts, prompts of the wrong type and duplicates go to
quarantine.parquet (prompt columns + `reason`, distillflow/base/quarantine.py). The
split is a hash of the prompt's group (`seed.group_by`: the toy task's instance, or a
file's group column; ungrouped, the prompt id: records.split_key, split_of), the same
function bootstrap uses, so no eval prompt, nor another prompt of its group, can be a
training prompt (distillflow/data/split.py). With `seed.synthesis.enabled` the teacher
adds train prompts (distillflow/data/synthesis.py).
Outputs: train.parquet, eval.parquet, quarantine.parquet, manifest.json; counts
reconcile: read = train + eval + quarantined + unused_over_quota + reserved_for_sft (bootstrap's
student SFT bucket, toy source only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillflow.audit import lineage, quality
from distillflow.base import params
from distillflow.base.config import Dtype, ModelParams, TaskParams
from distillflow.base.io import atomic_dir, write_json
from distillflow.data.sources import Raw, SeedParams, source_rows
from distillflow.data.split import prompt_sets, stream_to
from distillflow.data.synthesis import open_generate, teacher_of
from distillflow.stagekit import entry

__all__ = ["SECTIONS", "PARAMS", "run", "source_rows", "gate_outputs", "main"]

log = logging.getLogger("seed")

# models.*: the teacher that synthesis samples (read only when seed.synthesis.enabled).
SECTIONS: dict[str, Any] = {
    "task": TaskParams,
    "seed": SeedParams,
    "models.teacher": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)


def run(
    task: TaskParams, p: SeedParams, rows: Iterator[Raw], eval_rows: Iterator[Raw] | None = None
) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """(train, eval, quarantine, counts) in memory: split.prompt_sets (`eval_rows`: the
    rows of seed.eval_source, when it is set)."""
    return prompt_sets(task, p, rows, eval_rows)


def gate_outputs(tmp: Path, out: Path, q: quality.QualityParams, docs: Path | None) -> dict[str, Any]:
    """The output gates (distillflow/audit/quality.py): both prompt sets pass the prompt suite,
    and no training prompt is an eval prompt. Rows seed rejects never reach the files
    (they are in quarantine.parquet), so any failure here stops the stage."""
    gates = quality.StageGates(q, docs)
    eval_ids = quality.read_prompt_ids(tmp / "eval.parquet")
    gates.check_file("eval prompts", tmp / "eval.parquet", "prompt", shown=out / "eval.parquet")
    gates.check_file(
        "train prompts", tmp / "train.parquet", "prompt", shown=out / "train.parquet", refs={"eval": eval_ids}
    )
    return gates.finish()


def main() -> None:
    args = entry.parse_paths(__doc__, "out", "metrics", optional=("models", "docs"))
    sections = params.load_sections(args.params, SECTIONS)
    task, p = sections["task"], sections["seed"]
    inputs = {
        name: Path(src.path)
        for name, src in (("source", p.source), ("eval_source", p.eval_source))
        if src is not None and src.kind in ("jsonl", "parquet") and src.path
    }
    synth, extra = None, {}
    if p.synthesis.enabled:
        teacher = teacher_of(sections, args.models)
        generate, fingerprint, details = open_generate(p.synthesis, teacher)
        synth, extra, inputs["teacher"] = (generate, fingerprint), {"synthesis": details}, teacher.lineage_input
    with atomic_dir(args.out) as tmp:
        held_out = source_rows(task, p, p.eval_source) if p.eval_source is not None else None
        result, outputs = stream_to(tmp, task, p, source_rows(task, p), synth, eval_rows=held_out)
        validation = gate_outputs(tmp, args.out, sections["quality"], args.docs)
        counts = {**result.counts, "gates": quality.validation_summary(validation)}
        lineage.write_manifest(
            tmp,
            "seed",
            sections,
            inputs=inputs,
            outputs=outputs,
            counts=counts,
            extra={**extra, "validation": validation},
        )
    write_json(args.metrics, counts)
    log.info("seed: %d train, %d eval, %d quarantined", counts["train"], counts["eval"], counts["quarantined"])
    if "synthesis" in counts:
        log.info("seed: synthesis kept %(accepted)d of %(attempted)d attempts", counts["synthesis"])


if __name__ == "__main__":
    entry.run_stage(main)
