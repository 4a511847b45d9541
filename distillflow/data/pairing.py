"""Preference pairs from teacher and student responses, joined on ids (the pairs
stage's logic, callable in process: an on-policy round builds its pairs here).

Rows follow TRL's preference format (prompt, chosen = teacher response, rejected =
student response) plus the ids of all three parts and the facts curate needs (finish
reasons, token counts, the reference answer where there is one).

With n teacher and m student samples for a prompt, pair k (k < max(n, m)) takes teacher
sample k mod n and student sample k mod m. With several teachers (base/teachers.py) a
prompt's teacher samples are ordered by sample index, then the routed teacher first, so
one pair per prompt takes a sample of the weighted mixture; each pair keeps its chosen
response's `teacher`. A prompt without a teacher or a student
response is quarantined (the prompt's columns + `reason`); a generation whose prompt
id is not among the prompts is an upstream mismatch and raises DataError.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.base import quarantine as q
from distillflow.base.params import check
from distillflow.base import records
from distillflow.base.io import DataError
from distillflow.base.teachers import TeacherSet

QUARANTINE_SCHEMA = q.PROMPT_SCHEMA  # a prompt that could not be paired, with the reason


@dataclass(frozen=True)
class PairsParams:
    """params.yaml `pairs`."""

    # pairs per prompt, at most: the k-th teacher sample with the k-th student sample (cycling the shorter side)
    max_pairs_per_prompt: int

    def __post_init__(self) -> None:
        check(self.max_pairs_per_prompt >= 1, "max_pairs_per_prompt", "must be >= 1")


def _by_prompt(
    gens: list[dict[str, Any]], prompt_ids: dict[str, str | None], file: Path, teachers: TeacherSet | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each prompt's generations (`prompt_ids`: the prompts' ids to their category), by
    sample index, then (several teachers) the routed teacher's first."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row, g in enumerate(gens):
        if g["prompt_id"] not in prompt_ids:
            raise DataError(
                f"{file}: row {row}, field 'prompt_id': {g['prompt_id']} is not a training prompt "
                "(stale or foreign generations?)"
            )
        grouped[g["prompt_id"]].append(g)
    for pid, rows in grouped.items():
        if teachers is None:
            rows.sort(key=lambda g: g["sample_index"])
        else:
            cat = prompt_ids[pid]
            rows.sort(key=lambda g: (g["sample_index"], teachers.rank(g["teacher"], pid, cat)))
    return grouped


def pair_row(pr: dict[str, Any], c: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """The records.PAIR_SCHEMA row of prompt `pr`, chosen generation `c` and rejected `r`."""
    pid = pr["prompt_id"]
    return {
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
        "teacher": c["teacher"],
        "chosen_token_ids": c["token_ids"],
        "rejected_token_ids": r["token_ids"],
    }


def build_pairs(
    p: PairsParams,
    prompts: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    student: list[dict[str, Any]],
    files: tuple[Path, Path] = (Path("teacher"), Path("student")),
    teachers: TeacherSet | None = None,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(pairs, quarantine, counts) from prompts and both sides' generations (`files`:
    the teacher's and the student's, as error messages name them; `teachers`: several
    teachers' order, None for one)."""
    ids = {pr["prompt_id"]: pr["category"] for pr in prompts}
    t_by = _by_prompt(teacher, ids, files[0], teachers if teachers is not None and teachers.several else None)
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
            quarantine.append(q.row(pr, reason))
            continue
        for k in range(min(max(len(ts), len(ss)), p.max_pairs_per_prompt)):
            pairs.append(pair_row(pr, ts[k % len(ts)], ss[k % len(ss)]))
    counts = {
        "prompts": len(prompts),
        "prompts_paired": len(prompts) - len(quarantine),
        "prompts_quarantined": len(quarantine),
        "pairs": len(pairs),
        "dropped_by_reason": dict(sorted(reasons.items())),
    }
    return pairs, quarantine, counts
