"""pairs: join teacher and student responses into preference pairs, on ids.

    python -m stages.pairs --params params.yaml --prompts data/seed --teacher data/teacher \
        --student data/student --out data/pairs --metrics metrics/pairs.json

Output rows follow TRL's preference format (prompt, chosen = teacher response,
rejected = student response) plus the ids of all three parts and the facts curate
needs (finish reasons, token counts, the reference answer where there is one).

With n teacher and m student samples for a prompt, pair k (k < max(n, m)) takes teacher
sample k mod n and student sample k mod m. A prompt without a teacher or a student
response is quarantined with the reason; a generation whose prompt id is not among
the prompts is an upstream mismatch and stops the stage.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, params
from stages.lib.core.params import check
from stages.lib.data import records
from stages.lib.data.io import DataError, atomic_dir, read_rows, write_json, write_table

log = logging.getLogger("pairs")

QUARANTINE_SCHEMA = records.schema(
    "pairs_quarantine",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
)


@dataclass(frozen=True)
class PairsParams:
    """params.yaml `pairs`."""

    max_pairs_per_prompt: int

    def __post_init__(self) -> None:
        check(self.max_pairs_per_prompt >= 1, "max_pairs_per_prompt", "must be >= 1")


SECTIONS: dict[str, Any] = {"pairs": PairsParams, "quality": quality.QualityParams}
PARAMS = tuple(SECTIONS)


def _by_prompt(gens: list[dict[str, Any]], prompt_ids: set[str], file: Path) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, g in enumerate(gens):
        if g["prompt_id"] not in prompt_ids:
            raise DataError(
                f"{file}: row {row}, field 'prompt_id': {g['prompt_id']} is not a training prompt (stale or foreign generations?)"
            )
        grouped[g["prompt_id"]].append(g)
    for rows in grouped.values():
        rows.sort(key=lambda g: g["sample_index"])
    return grouped


def run(
    p: PairsParams,
    prompts: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    student: list[dict[str, Any]],
    files: tuple[Path, Path] = (Path("teacher"), Path("student")),
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(pairs, quarantine, counts) from prompts and both sides' generations."""
    ids = {pr["prompt_id"] for pr in prompts}
    t_by = _by_prompt(teacher, ids, files[0])
    s_by = _by_prompt(student, ids, files[1])
    pairs: list[dict] = []
    quarantine: list[dict] = []
    reasons: Counter[str] = Counter()
    for pr in prompts:
        pid = pr["prompt_id"]
        ts, ss = t_by.get(pid, []), s_by.get(pid, [])
        reason = "missing_teacher_generation" if not ts else "missing_student_generation" if not ss else None
        if reason:
            reasons[reason] += 1
            quarantine.append({"prompt_id": pid, "reason": reason})
            continue
        for k in range(min(max(len(ts), len(ss)), p.max_pairs_per_prompt)):
            c, r = ts[k % len(ts)], ss[k % len(ss)]
            pairs.append(
                {
                    "pair_id": records.pair_id(pid, c["generation_id"], r["generation_id"]),
                    "prompt_id": pid,
                    "chosen_id": c["generation_id"],
                    "rejected_id": r["generation_id"],
                    "prompt": pr["prompt"],
                    "chosen": c["response"],
                    "rejected": r["response"],
                    "reference": pr["reference"],
                    "category": pr["category"],
                    "chosen_finish_reason": c["finish_reason"],
                    "rejected_finish_reason": r["finish_reason"],
                    "chosen_tokens": c["response_tokens"],
                    "rejected_tokens": r["response_tokens"],
                }
            )
    counts = {
        "prompts": len(prompts),
        "prompts_paired": len(prompts) - len(quarantine),
        "prompts_quarantined": len(quarantine),
        "pairs": len(pairs),
        "dropped_by_reason": dict(sorted(reasons.items())),
    }
    return pairs, quarantine, counts


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
    counts["gates"] = quality.summary(validation)
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
    entry.run(main)
