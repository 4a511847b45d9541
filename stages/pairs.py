"""pairs: join teacher and student responses into preference pairs, on ids (distillflow/data/pairing.py).

    python -m stages.pairs --params params.yaml --prompts data/seed --teacher data/teacher \
        --student data/student --out data/pairs --metrics metrics/pairs.json

Output rows follow TRL's preference format (prompt, chosen = teacher response,
rejected = student response) plus the ids of all three parts and the facts curate
needs (finish reasons, token counts, the reference answer where there is one).

With n teacher and m student samples for a prompt, pair k (k < max(n, m)) takes teacher
sample k mod n and student sample k mod m. A prompt without a teacher or a student
response is quarantined (its prompt's columns + `reason`); a generation whose prompt
id is not among the prompts is an upstream mismatch and stops the stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import lineage, quality
from distillflow.base import params, records
from distillflow.base.io import atomic_dir, read_rows, write_json, write_table
from distillflow.data import pairing
from distillflow.data.pairing import QUARANTINE_SCHEMA, PairsParams
from distillflow.stagekit import entry

__all__ = ["SECTIONS", "PARAMS", "PairsParams", "QUARANTINE_SCHEMA", "run", "main"]

log = logging.getLogger("pairs")

SECTIONS: dict[str, Any] = {"pairs": PairsParams, "quality": quality.QualityParams}
PARAMS = tuple(SECTIONS)


def run(
    p: PairsParams,
    prompts: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    student: list[dict[str, Any]],
    files: tuple[Path, Path] = (Path("teacher"), Path("student")),
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(pairs, quarantine, counts): distillflow/data/pairing.py's `build`."""
    return pairing.build_pairs(p, prompts, teacher, student, files)


def main() -> None:
    args = entry.parse_paths(__doc__, "prompts", "teacher", "student", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    files = {
        "prompts": args.prompts / "train.parquet",
        "teacher": args.teacher / "generations.parquet",
        "student": args.student / "generations.parquet",
    }
    prompts = read_rows(files["prompts"], records.PROMPT_SCHEMA)
    teacher = read_rows(files["teacher"], records.GENERATION_SCHEMA)
    student = read_rows(files["student"], records.GENERATION_SCHEMA)
    gates = quality.StageGates(used["quality"], args.docs)
    ids = {"prompt_id": pa.array([pr["prompt_id"] for pr in prompts], type=pa.string())}
    gates.strict("prompts", files["prompts"], "prompt", pa.Table.from_pylist(prompts, schema=records.PROMPT_SCHEMA))
    gates.strict(
        "teacher generations",
        files["teacher"],
        "generation",
        pa.Table.from_pylist(teacher, schema=records.GENERATION_SCHEMA),
        refs=ids,
    )
    gates.strict(
        "student generations",
        files["student"],
        "generation",
        pa.Table.from_pylist(student, schema=records.GENERATION_SCHEMA),
        refs=ids,
        truncation=False,
    )
    pairs, quarantine, counts = run(used["pairs"], prompts, teacher, student, (files["teacher"], files["student"]))
    # the output: every id resolves upstream (referential integrity), no duplicates beyond the threshold
    refs = {
        **ids,
        "chosen_id": pa.array([g["generation_id"] for g in teacher], type=pa.string()),
        "rejected_id": pa.array([g["generation_id"] for g in student], type=pa.string()),
    }
    gates.strict(
        "pairs", args.out / "pairs.parquet", "pair", pa.Table.from_pylist(pairs, schema=records.PAIR_SCHEMA), refs=refs
    )
    validation = gates.finish()
    counts["gates"] = quality.validation_summary(validation)
    with atomic_dir(args.out) as tmp:
        outputs = {
            "pairs.parquet": write_table(tmp / "pairs.parquet", pairs, records.PAIR_SCHEMA),
            "quarantine.parquet": write_table(tmp / "quarantine.parquet", quarantine, QUARANTINE_SCHEMA),
        }
        lineage.write_manifest(
            tmp, "pairs", used, inputs=files, outputs=outputs, counts=counts, extra={"validation": validation}
        )
    write_json(args.metrics, counts)
    log.info(
        "pairs: %d pairs from %d prompts, %d prompts quarantined",
        counts["pairs"],
        counts["prompts"],
        counts["prompts_quarantined"],
    )


if __name__ == "__main__":
    entry.run_stage(main)
