"""The Great Expectations gates (stages/lib/audit/quality.py) and the curate stage that runs
them on a stream: real GX suites on small Arrow tables, and `python -m stages.curate`."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.lib.audit import quality
from stages.lib.data import records
from stages.lib.data.io import write_table

from .builders import gen, pair, prompt

ROOT = Path(__file__).resolve().parents[1]
Q = quality.QualityParams(
    min_prompt_chars=1,
    max_prompt_chars=100,
    max_response_tokens=16,
    max_truncated_share=0.25,
    max_duplicate_share=0.2,
    max_quarantine_share=0.5,
    data_docs=False,
    batch_rows=4,
)


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def test_row_failures_are_quarantined_with_the_expectation_and_counts_reconcile() -> None:
    prompts = [prompt(i) for i in range(6)]
    rows = [pair(i) for i in range(6)] + [pair(0)]  # a repeated pair id, in the second batch
    rows[2] = {**rows[2], "prompt": "x" * 101}  # too long
    rows[3] = {**rows[3], "prompt_id": "nowhere"}  # points at no prompt
    gate = quality.Gate(
        "pairs", "pairs.parquet", "pair", Q, quarantine=True, refs={"prompt_id": [p["prompt_id"] for p in prompts]}
    )
    kept, bad = gate.check(table(rows, records.PAIR_SCHEMA))
    assert {b["pair_id"]: b["reason"] for b in bad} == {
        rows[2]["pair_id"]: "gate:expect_column_value_lengths_to_be_between:prompt",
        rows[3]["pair_id"]: "gate:expect_column_values_to_be_in_set:prompt_id__exists_upstream",
        rows[6]["pair_id"]: "gate:expect_column_values_to_be_in_set:pair_id__first_occurrence",
    }
    assert kept.num_rows == 4 and kept.schema.names == records.PAIR_SCHEMA.names
    report = gate.finish()
    assert report["rows_in"] == 7 == report["kept"] + report["quarantined"] and not report["success"]


def test_a_strict_gate_stops_naming_artifact_expectation_and_observed_value() -> None:
    rows = [pair(i) for i in range(3)]
    rows[1] = {**rows[1], "chosen_tokens": 99}
    gate = quality.Gate("curated", "data/curate/curated.parquet", "curated", Q, quarantine=False)
    with pytest.raises(
        quality.GateError,
        match=r"data/curate/curated.parquet: curated failed expectation "
        r"expect_column_values_to_be_between:chosen_tokens \(first at row 1\): observed 1 of 3 rows",
    ):
        gate.check(table(rows, records.PAIR_SCHEMA))


def test_truncated_share_and_train_eval_disjointness_are_table_level() -> None:
    prs = [prompt(i) for i in range(4)]
    gens = [gen(p, "m", 0, finish="length" if i < 2 else "stop") for i, p in enumerate(prs)]
    gate = quality.Gate("teacher", "gen.parquet", "generation", Q, quarantine=True)  # even a quarantining gate stops
    gate.check(table(gens, records.GENERATION_SCHEMA))
    with pytest.raises(
        quality.GateError,
        match=r"expect_column_values_to_be_in_set:finish_reason:share: observed 2 of 4 rows unexpected \(50.0%\), "
        r"above the allowed 25.0%",
    ):
        gate.finish()
    student = quality.Gate("student", "gen.parquet", "generation", Q, quarantine=False, truncation=False)
    student.check(table(gens, records.GENERATION_SCHEMA))  # the student may run long
    assert student.finish()["success"]
    pairs = [pair(i) for i in range(3)]
    leak = quality.Gate("curated", "c.parquet", "curated", Q, quarantine=True, refs={"eval": [pairs[2]["prompt_id"]]})
    with pytest.raises(quality.GateError, match="prompt_id__in_eval"):
        leak.check(table(pairs, records.PAIR_SCHEMA))


def test_duplicate_rate_is_judged_over_the_whole_artifact_not_per_batch() -> None:
    rows = [pair(i) for i in range(7)] + [pair(0)]  # one repeat in 8 rows: 12.5%, but 25% of its batch
    gate = quality.Gate("pairs", "p.parquet", "pair", Q, quarantine=True)
    gate.check(table(rows, records.PAIR_SCHEMA))
    assert gate.finish()["quarantined"] == 1  # the repeated id; the 12.5% duplicate rate is allowed
    rows = [pair(0)] + [{**pair(0), "pair_id": f"id{i}"} for i in range(4)]  # same content, new ids: 80%
    gate = quality.Gate("pairs", "p.parquet", "pair", Q, quarantine=True)
    gate.check(table(rows, records.PAIR_SCHEMA))
    with pytest.raises(quality.GateError, match=r"content__duplicate:share: observed 4 of 5 rows"):
        gate.finish()


def topk_row(ids: list[int], lps: list[float], k: int = 2) -> dict:
    return {
        "pair_id": "p",
        "side": "chosen",
        "positions": len(ids) // k,
        "k": k,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "target_logprob": [-0.1] * (len(ids) // k),
    }


@pytest.mark.parametrize(
    "row, check",
    [
        (topk_row([1, 2], [-0.1, -0.5]), None),
        (topk_row([1, 2], [-0.5, -0.1]), "topk__sorted"),
        (topk_row([1, 2], [-0.1, -math.inf]), "topk__finite"),
        (topk_row([1, 50], [-0.1, -0.5]), "topk__ids_in_vocab"),
        ({**topk_row([1, 2], [-0.1, -0.5]), "positions": 2}, "topk__lengths_match"),
    ],
)
def test_topk_suite(row: dict, check: str | None) -> None:
    gate = quality.Gate("topk", "topk.parquet", "topk", Q, quarantine=False, vocab_size=40)
    if check is None:
        gate.check(table([row], records.TOPK_SCHEMA))
        assert gate.finish()["success"]
    else:
        with pytest.raises(quality.GateError, match=check):
            gate.check(table([row], records.TOPK_SCHEMA))


def test_too_many_quarantined_rows_stop_the_stage() -> None:
    rows = [{**pair(i), "prompt": "x" * 200} for i in range(3)] + [pair(9)]
    gate = quality.Gate("pairs", "p.parquet", "pair", Q, quarantine=True)
    gate.check(table(rows, records.PAIR_SCHEMA))
    with pytest.raises(quality.GateError, match=r"3 of 4 rows \(75.0%\).*max_quarantine_share=0.5"):
        gate.finish()


def test_data_docs_are_rendered_per_gate(tmp_path: Path) -> None:
    gates = quality.StageGates(dataclasses.replace(Q, data_docs=True), tmp_path / "docs")
    g = gates.gate("pairs", "p.parquet", "pair", quarantine=True)
    g.check(table([pair(i) for i in range(6)], records.PAIR_SCHEMA))  # two batches of 4
    report = gates.finish()
    pages = sorted(p.relative_to(tmp_path / "docs").parts[0] for p in (tmp_path / "docs").rglob("*.html"))
    assert pages.count("validations") == 2 and "index.html" in pages and "expectations" in pages
    assert report["data_docs_files"] == sum(p.is_file() for p in (tmp_path / "docs").rglob("*"))
    assert "expect_column_values_to_be_unique" not in json.dumps(
        report
    )  # uniqueness is a derived column, across batches


# --- the curate stage end to end ---------------------------------------------------


def stage_params(tmp: Path, **quality_overrides: object) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["quality"].update({"batch_rows": 3, **quality_overrides})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def run_curate(
    tmp: Path,
    pairs: list[dict],
    *,
    train: list[dict],
    evals: list[dict],
    expect_rc: int = 0,
    **quality_overrides: object,
) -> subprocess.CompletedProcess:
    write_table(tmp / "pairs" / "pairs.parquet", pairs, records.PAIR_SCHEMA)
    write_table(tmp / "seed" / "train.parquet", train, records.PROMPT_SCHEMA)
    write_table(tmp / "seed" / "eval.parquet", evals, records.PROMPT_SCHEMA)
    cmd = [
        sys.executable,
        "-m",
        "stages.curate",
        "--params",
        str(stage_params(tmp, **quality_overrides)),
        "--pairs",
        str(tmp / "pairs"),
        "--prompts",
        str(tmp / "seed"),
        "--out",
        str(tmp / "out"),
        "--metrics",
        str(tmp / "m.json"),
        "--docs",
        str(tmp / "docs"),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300
    )
    assert done.returncode == expect_rc, done.stderr[-3000:]
    return done


def test_curate_streams_gates_and_reconciles(tmp_path: Path) -> None:
    train = [prompt(i) for i in range(10)]
    evals = [{**prompt(100), "split": "eval"}]
    pairs = [pair(i) for i in range(10)]
    pairs[5] = {**pairs[5], "chosen": "wrong"}  # a filter drop
    pairs[7] = {**pairs[7], "prompt_id": "dangling"}  # a gate drop
    pairs.append(pairs[0])  # a repeated pair id in a later batch
    run_curate(tmp_path, pairs, train=train, evals=evals)
    m = json.loads((tmp_path / "m.json").read_text())
    bad = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert m["pairs_in"] == 11 == m["kept"] + m["quarantined"] and m["quarantined"] == len(bad) == 3
    assert sorted(b["reason"] for b in bad) == [
        "chosen_incorrect",
        "gate:expect_column_values_to_be_in_set:pair_id__first_occurrence",
        "gate:expect_column_values_to_be_in_set:prompt_id__exists_upstream",
    ]
    assert m["gates"]["pairs"]["quarantined"] == 2 and m["gates"]["curated"]["rows_in"] == 8
    kept = pq.read_table(tmp_path / "out" / "curated.parquet")
    assert kept.num_rows == 8 and kept.schema.equals(records.PAIR_SCHEMA, check_metadata=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [g["artifact"] for g in manifest["validation"]["gates"]] == ["pairs", "curated"]
    assert (
        len(list((tmp_path / "docs" / "validations").rglob("*.html"))) == 4 + 4
    )  # 11 pairs in batches of 3, each gate once per batch


def test_curate_stops_when_eval_prompts_reach_training(tmp_path: Path) -> None:
    train = [prompt(i) for i in range(4)]
    evals = [{**prompt(3), "split": "eval"}]
    done = run_curate(tmp_path, [pair(i) for i in range(4)], train=train, evals=evals, expect_rc=2)
    assert "\nerror: " in "\n" + done.stderr and "prompt_id__in_eval" in done.stderr and "pairs.parquet" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# --- the one train/eval disjointness check and the one quarantine shape ----------------


def test_in_eval_marks_eval_prompts_and_check_disjoint_names_files_count_and_an_id() -> None:
    ids = pa.array(["a", None, "b", "c", "b"], type=pa.string())
    assert quality.in_eval(ids, ["b", "z"]).to_pylist() == [False, False, True, False, True]
    assert quality.in_eval(["a", "z"], pa.array(["z"], type=pa.string())).to_pylist() == [False, True]
    quality.check_disjoint(["a", "c"], ["b"], train_file="t.parquet", eval_file="e.parquet")  # disjoint: no error
    with pytest.raises(quality.DataError) as err:
        quality.check_disjoint(ids, ["c", "b", "y"], train_file="t.parquet", eval_file="e.parquet", what="pairs")
    assert str(err.value) == (
        "e.parquet: 2 eval prompts are also pairs in t.parquet (e.g. b); evaluation would be contaminated"
    )


def test_the_gate_disjointness_expectation_uses_in_eval() -> None:
    """The derived column the prompt and pair suites check is in_eval's mask."""
    ps = [prompt(i) for i in range(3)]
    table = pa.Table.from_pylist(ps, schema=records.PROMPT_SCHEMA)
    refs = {"eval": pa.array([ps[1]["prompt_id"]], type=pa.string())}
    derived = quality.derive("prompt", table, refs, quality._State(), None)
    assert derived.column(quality.IN_EVAL).to_pylist() == [False, True, False]


def test_every_quarantine_file_is_the_artifact_columns_plus_reason() -> None:
    from stages.lib.audit import quarantine
    from stages.lib.data import curation, pairing, split

    for qs, base in [
        (split.QUARANTINE_SCHEMA, records.PROMPT_SCHEMA),
        (pairing.QUARANTINE_SCHEMA, records.PROMPT_SCHEMA),
        (curation.QUARANTINE_SCHEMA, records.PAIR_SCHEMA),
    ]:
        assert qs.names == [*base.names, "reason"]
        assert all(f.nullable for f in qs if f.name != "reason")
        assert qs.metadata[b"distillflow.schema"] == base.metadata[b"distillflow.schema"] + b"_quarantine"
    assert quarantine.top_reasons({"b": 2, "a": 2, "missing_field:x": 5, "c": 1}, n=2) == (
        "missing field 'x' (5), a (2), and 2 more reasons"
    )
