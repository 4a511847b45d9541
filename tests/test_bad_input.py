"""A corpus of malformed inputs, each run through the real stage command line: every
case ends in a clear error naming the file (and the row and field where there is one),
exit status 2 and no traceback, or in a quarantine with the reason, with counts that
reconcile. Nothing is dropped silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distillflow.base import records
from distillflow.base.io import write_table

from .builders import pair, prompt

ROOT = Path(__file__).resolve().parents[1]
MB_PROMPT = "word " * 200_000  # 1 MB


def stage(tmp: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"stages.{module}", "--params", str(tmp / "params.yaml"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISTILLFLOW_LINEAGE_DIR": str(tmp / "lineage")}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False
    )  # the exit status is what is tested


def write_params(tmp: Path, source: dict | None = None, group_by: str | None = None) -> None:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    if source is not None:
        p["seed"]["source"] = {
            "kind": "jsonl",
            "path": None,
            "config": None,
            "split": None,
            "revision": None,
            "field": "text",
            **source,
        }
        p["seed"]["group_by"] = group_by  # a file: ungrouped unless named (params.yaml's `instance` is the toy's)
    p["seed"]["num_train"] = p["seed"]["num_eval"] = 1000
    p["seed"]["max_prompt_chars"] = 2000
    p["quality"]["batch_rows"] = 4
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))


def assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr[done.stderr.rindex("error: ") :]
    for needle in needles:
        assert needle in last, (needle, last)


# --- seed: prompt sources ------------------------------------------------------------


def run_seed(tmp: Path, kind: str, path: Path, group_by: str | None = None) -> subprocess.CompletedProcess:
    write_params(tmp, {"kind": kind, "path": str(path)}, group_by)
    return stage(tmp, "seed", "--out", str(tmp / "seed"), "--metrics", str(tmp / "seed.json"))


def test_seed_quarantines_every_bad_jsonl_line_with_its_reason(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"Question number {i}?"}).encode() for i in range(40)]
    bad = {
        "null_prompt": json.dumps({"text": None}).encode(),
        "not_a_string": json.dumps({"text": 42}).encode(),
        "missing_field:text": json.dumps({"prompt": "wrong key"}).encode(),
        "invalid_utf8": b'{"text": "caf\xe9"}',
        "invalid_json": b'{"text": "unterminated',
        "prompt_too_long": json.dumps({"text": MB_PROMPT}).encode(),
        "duplicate_prompt": lines[0],
        "empty_prompt": json.dumps({"text": "   "}).encode(),
    }
    src = tmp_path / "prompts.jsonl"
    src.write_bytes(b"\n".join(lines + list(bad.values())) + b"\n")
    done = run_seed(tmp_path, "jsonl", src)
    assert done.returncode == 0, done.stderr[-3000:]
    q = pq.read_table(tmp_path / "seed" / "quarantine.parquet").to_pylist()
    assert sorted(r["reason"] for r in q) == sorted(bad)
    lines_of = {r["reason"]: r["source_ref"] for r in q}
    assert lines_of["invalid_utf8"] == f"{src}:line=44"  # file and line of each rejected row
    m = json.loads((tmp_path / "seed.json").read_text())
    assert m["read"] == 48 == m["train"] + m["eval"] + m["quarantined"] + m["unused_over_quota"] + m["reserved_for_sft"]


def test_seed_on_an_empty_file_says_so(tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    assert_clean_error(run_seed(tmp_path, "jsonl", src), f"error: {src}: the file has no rows")


def test_seed_on_a_file_without_the_field_names_the_reason_and_the_fields_rows_have(tmp_path: Path) -> None:
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(40)))
    assert_clean_error(
        run_seed(tmp_path, "jsonl", src),
        f"error: {src}: 0 of 40 rows usable: missing field 'text' (40); rows have fields: question, answer",
    )


def test_seed_on_a_truncated_parquet_file_names_it(tmp_path: Path) -> None:
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": [f"Question {i}" for i in range(100)]}), src)
    src.write_bytes(src.read_bytes()[:-200])
    assert_clean_error(run_seed(tmp_path, "parquet", src), str(src), "not a readable Parquet file")


def test_seed_on_a_parquet_file_without_the_field_names_the_columns(tmp_path: Path) -> None:
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"question": ["a", "b"]}), src)
    assert_clean_error(run_seed(tmp_path, "parquet", src), str(src), "no column 'text'", "question")


def test_seed_quarantines_wrong_types_and_nulls_in_a_parquet_column(tmp_path: Path) -> None:
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": pa.array([f"Question {i}" for i in range(30)] + [None], type=pa.string())}), src)
    done = run_seed(tmp_path, "parquet", src)
    assert done.returncode == 0, done.stderr[-3000:]
    q = pq.read_table(tmp_path / "seed" / "quarantine.parquet").to_pylist()
    assert [(r["reason"], r["source_ref"]) for r in q] == [("null_prompt", f"{src}:row=30")]
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    done = run_seed(tmp_path / "ints", "parquet", ints)
    # both rows are quarantined as not_a_string, and a prompt set with nothing in it stops the stage
    assert_clean_error(done, f"error: {ints}: 0 of 2 rows usable: not_a_string (2)")
    assert not (tmp_path / "ints" / "seed").exists()  # a failed stage leaves no output behind


def test_seed_with_a_group_column_null_in_some_rows_names_file_column_and_count(tmp_path: Path) -> None:
    rows = [{"conv_id": f"c{i // 3}", "text": f"Question {i}?"} for i in range(40)]
    rows[5]["conv_id"] = None
    del rows[17]["conv_id"]
    src = tmp_path / "conv.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_clean_error(
        run_seed(tmp_path, "jsonl", src, group_by="conv_id"),
        f"error: {src}: seed.group_by column 'conv_id' is null or missing in 2 of 40 rows read "
        f"(first at {src}:line=6); every row needs a group",
    )
    assert not (tmp_path / "seed").exists()  # nothing half-written


# --- curate: pair files ----------------------------------------------------------------


def curate_inputs(tmp: Path, n: int = 6) -> list[dict]:
    write_params(tmp)
    write_table(tmp / "seed" / "train.parquet", [prompt(i) for i in range(n)], records.PROMPT_SCHEMA)
    write_table(tmp / "seed" / "eval.parquet", [{**prompt(1000), "split": "eval"}], records.PROMPT_SCHEMA)
    (tmp / "pairs").mkdir(exist_ok=True)
    return [pair(i) for i in range(n)]


def run_curate(tmp: Path) -> subprocess.CompletedProcess:
    return stage(
        tmp,
        "curate",
        "--pairs",
        str(tmp / "pairs"),
        "--prompts",
        str(tmp / "seed"),
        "--out",
        str(tmp / "out"),
        "--metrics",
        str(tmp / "m.json"),
    )


def test_curate_on_an_empty_file(tmp_path: Path) -> None:
    curate_inputs(tmp_path)
    (tmp_path / "pairs" / "pairs.parquet").write_bytes(b"")
    assert_clean_error(run_curate(tmp_path), "pairs.parquet", "not a readable Parquet file")


def test_curate_left_with_nothing_names_the_top_reasons_with_counts(tmp_path: Path) -> None:
    rows = curate_inputs(tmp_path)
    rows = [{**r, "chosen": "2"} for r in rows[:4]] + [{**r, "chosen_finish_reason": "length"} for r in rows[4:]]
    path = tmp_path / "pairs" / "pairs.parquet"
    write_table(path, rows, records.PAIR_SCHEMA)
    assert_clean_error(
        run_curate(tmp_path),
        f"error: {path}: 0 of 6 pairs usable: chosen_incorrect (4), truncated_chosen (2); nothing to train on",
    )
    assert not (tmp_path / "out").exists()


def test_curate_on_a_pairs_file_without_rows(tmp_path: Path) -> None:
    curate_inputs(tmp_path)
    path = tmp_path / "pairs" / "pairs.parquet"
    write_table(path, [], records.PAIR_SCHEMA)
    assert_clean_error(run_curate(tmp_path), f"error: {path}: the file has no pairs")


def test_curate_on_a_truncated_parquet_file(tmp_path: Path) -> None:
    rows = curate_inputs(tmp_path)
    path = tmp_path / "pairs" / "pairs.parquet"
    write_table(path, rows, records.PAIR_SCHEMA)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert_clean_error(run_curate(tmp_path), str(path), "not a readable Parquet file")


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda t: t.drop_columns(["chosen"]), ["missing ['chosen']"]),
        (lambda t: t.append_column("extra", pa.array(["x"] * t.num_rows)), ["unexpected ['extra']"]),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("chosen_tokens"), "chosen_tokens", pa.array(["2"] * t.num_rows)
            ),
            ["column 'chosen_tokens' has type string, expected int32"],
        ),
    ],
)
def test_curate_names_schema_problems(tmp_path: Path, change, needles: list[str]) -> None:
    rows = curate_inputs(tmp_path)
    path = tmp_path / "pairs" / "pairs.parquet"
    pq.write_table(change(pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA)), path)
    assert_clean_error(run_curate(tmp_path), str(path), *needles)


def test_curate_quarantines_bad_rows_with_reasons_and_counts_reconcile(tmp_path: Path) -> None:
    rows = curate_inputs(tmp_path, n=12)
    loose = pa.schema([f.with_nullable(True) for f in records.PAIR_SCHEMA])  # a writer that allowed nulls
    rows[1] = {**rows[1], "chosen": None}
    rows[2] = {**rows[2], "prompt": MB_PROMPT}
    rows[3] = {**rows[3], "prompt_id": "0" * 32}  # points at no prompt
    rows[4] = {**rows[4], "chosen_id": None, "rejected_tokens": None}
    rows.append(rows[0])  # a duplicate id, in a later batch
    pq.write_table(pa.Table.from_pylist(rows, schema=loose), tmp_path / "pairs" / "pairs.parquet")
    done = run_curate(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    q = {r["pair_id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()}
    assert q == {
        rows[1]["pair_id"]: "gate:expect_column_values_to_not_be_null:chosen",
        rows[2]["pair_id"]: "gate:expect_column_value_lengths_to_be_between:prompt",
        rows[3]["pair_id"]: "gate:expect_column_values_to_be_in_set:prompt_id__exists_upstream",
        rows[4]["pair_id"]: "gate:expect_column_values_to_not_be_null:chosen_id",
        rows[0]["pair_id"]: "gate:expect_column_values_to_be_in_set:pair_id__first_occurrence",
    }
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["pairs_in"] == 13 == m["kept"] + m["quarantined"] and m["kept"] == 8
    assert sum(m["dropped_by_reason"].values()) == m["quarantined"]
