"""The pairs step (distillflow/stagekit/writer.py): the pairs stage runs it on files, an
on-policy round (rounds.py) on its fresh student samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import lineage, quality
from distillflow.base import records
from distillflow.base.config import TEACHER_SECTIONS, teachers_of
from distillflow.base.io import atomic_dir, write_table
from distillflow.data import pairing
from distillflow.data.pairing import QUARANTINE_SCHEMA, PairsParams
from distillflow.stagekit.writer import Writer, ids

# models: several teachers' order among a prompt's pairs (base/teachers.py)
PAIRS_SECTIONS: dict[str, Any] = {**TEACHER_SECTIONS, "pairs": PairsParams, "quality": quality.QualityParams}


def write_pairs(
    w: Writer,
    prompts: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    student: list[dict[str, Any]],
    files: dict[str, Path],
) -> dict[str, Any]:
    """pairs.parquet (records.PAIR_SCHEMA), quarantine.parquet (the prompts that could
    not be paired, with the reason) and the manifest; `files` names the prompts, teacher
    and student files read. The inputs are gated first, the pairs before writing."""
    gates = w.gates()
    prompt_ids = {"prompt_id": ids(prompts, "prompt_id")}
    gates.strict("prompts", files["prompts"], "prompt", pa.Table.from_pylist(prompts, schema=records.PROMPT_SCHEMA))
    for name, rows in (("teacher", teacher), ("student", student)):
        gates.strict(
            f"{name} generations",
            files[name],
            "generation",
            pa.Table.from_pylist(rows, schema=records.GENERATION_SCHEMA),
            refs=prompt_ids,
            **({"truncation": False} if name == "student" else {}),
        )
    pairs, quarantine, counts = pairing.build_pairs(
        w.used["pairs"], prompts, teacher, student, (files["teacher"], files["student"]), teachers_of(w.used)
    )
    # the output: every id resolves upstream (referential integrity), no duplicates beyond the threshold
    refs = {**prompt_ids, "chosen_id": ids(teacher, "generation_id"), "rejected_id": ids(student, "generation_id")}
    table = pa.Table.from_pylist(pairs, schema=records.PAIR_SCHEMA)
    gates.strict("pairs", w.out / "pairs.parquet", "pair", table, refs=refs)
    validation = gates.finish()
    counts["gates"] = quality.validation_summary(validation)
    with atomic_dir(w.out) as tmp:
        outputs = {
            "pairs.parquet": write_table(tmp / "pairs.parquet", pairs, records.PAIR_SCHEMA),
            "quarantine.parquet": write_table(tmp / "quarantine.parquet", quarantine, QUARANTINE_SCHEMA),
        }
        lineage.write_manifest(
            tmp,
            "pairs",
            w.only(PAIRS_SECTIONS),
            inputs=files,
            outputs=outputs,
            counts=counts,
            extra={"validation": validation},
            module=w.module,
            step=w.is_step("pairs"),
        )
    return counts
