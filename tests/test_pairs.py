from pathlib import Path

import pyarrow as pa
import pytest

from distillflow.base import records
from distillflow.base.io import DataError
from stages import pairs

from .builders import gen, prompt


def test_join_on_ids_cycles_samples_and_quarantines_missing_partners() -> None:
    ps = [prompt(i) for i in range(4)]
    teacher = [gen(ps[0], "T", 0), gen(ps[1], "T", 0), gen(ps[3], "T", 0)]
    student = [gen(ps[0], "S", 1), gen(ps[0], "S", 0), gen(ps[2], "S", 0), gen(ps[3], "S", 0)]
    out, quarantine, counts = pairs.run(pairs.PairsParams(max_pairs_per_prompt=4), ps, teacher, student)
    assert [q["reason"] for q in quarantine] == ["missing_student_generation", "missing_teacher_generation"]
    assert [q["prompt_id"] for q in quarantine] == [ps[1]["prompt_id"], ps[2]["prompt_id"]]
    assert quarantine[0] == {**ps[1], "reason": "missing_student_generation"}  # the prompt's columns + reason
    assert pa.Table.from_pylist(quarantine, schema=pairs.QUARANTINE_SCHEMA).num_rows == 2
    first = [o for o in out if o["prompt_id"] == ps[0]["prompt_id"]]
    # One teacher sample, two student samples: the teacher's is reused, students in order.
    assert [(o["chosen_id"], o["rejected_id"]) for o in first] == [
        (teacher[0]["generation_id"], student[1]["generation_id"]),
        (teacher[0]["generation_id"], student[0]["generation_id"]),
    ]
    assert all(o["pair_id"] == records.pair_id(o["prompt_id"], o["chosen_id"], o["rejected_id"]) for o in out)
    assert counts == {
        "prompts": 4,
        "prompts_paired": 2,
        "prompts_quarantined": 2,
        "pairs": 3,
        "dropped_by_reason": {"missing_student_generation": 1, "missing_teacher_generation": 1},
    }


def test_max_pairs_per_prompt_caps_pairs() -> None:
    ps = [prompt(0)]
    out, _, _ = pairs.run(pairs.PairsParams(1), ps, [gen(ps[0], "T", 0)], [gen(ps[0], "S", 0), gen(ps[0], "S", 1)])
    assert len(out) == 1


def test_generation_for_unknown_prompt_stops_the_stage_naming_file_and_row() -> None:
    ps = [prompt(0)]
    stray = gen(prompt(99), "S", 0)
    with pytest.raises(DataError, match=r"student.parquet: row 1, field 'prompt_id': .* is not a training prompt"):
        pairs.run(
            pairs.PairsParams(1),
            ps,
            [gen(ps[0], "T", 0)],
            [gen(ps[0], "S", 0), stray],
            (Path("teacher.parquet"), Path("student.parquet")),
        )
