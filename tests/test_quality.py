"""The Great Expectations gates (distillflow/audit/quality.py) and the curate stage that runs
them on a stream: real GX suites on small Arrow tables, and `python -m stages.curate`."""

import dataclasses
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distillflow.audit import quality, suites
from distillflow.base import records
from distillflow.base.io import write_table

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
    from distillflow.base import quarantine
    from distillflow.data import curation, pairing, split

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


def old_topk_flags(batch: pa.Table, vocab_size: int | None) -> dict[str, list[bool]]:
    """The Python-list `suites._topk_flags` this project had before the numpy one: the reference."""
    flags: dict[str, list[bool]] = {name: [] for name in suites.TOPK_OK}
    for ids, lps, target, positions, k in zip(
        *(batch.column(c).to_pylist() for c in ("topk_ids", "topk_logprobs", "target_logprob", "positions", "k")),
        strict=True,
    ):
        ids, lps, target = ids or [], lps or [], target or []
        flags["topk__finite"].append(all(math.isfinite(x) for x in lps) and all(math.isfinite(x) for x in target))
        rows = [lps[i : i + k] for i in range(0, len(lps), k)] if k and k > 0 else []
        flags["topk__sorted"].append(all(a >= b for row in rows for a, b in itertools.pairwise(row)))
        flags["topk__ids_in_vocab"].append(
            all(0 <= t < vocab_size for t in ids) if vocab_size is not None else all(t >= 0 for t in ids)
        )
        n = (positions or 0) * (k or 0)
        flags["topk__lengths_match"].append(len(ids) == n and len(lps) == n and len(target) == (positions or 0))
    return flags


# The top-k schema with every field nullable: rows the writer never makes (a null list,
# a null k) that a damaged file could still hold.
LOOSE_TOPK = pa.schema([f.with_nullable(True) for f in records.TOPK_SCHEMA])


def raw_topk(ids: list | None, lps: list | None, target: list | None, positions: int | None, k: int | None) -> dict:
    return {
        "pair_id": "p",
        "side": "chosen",
        "positions": positions,
        "k": k,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "target_logprob": target,
    }


VOCAB = 40
NAN, INF = math.nan, math.inf
# (row, the flags that must fail), each kind of fault in its own row, good rows in between
TOPK_CASES = [
    (raw_topk([1, 2, 3, 4], [-0.1, -0.5, -0.2, -0.3], [-0.1, -0.2], 2, 2), set()),
    # ascending from one position to the next is allowed: only inside a position must it descend
    (raw_topk([1, 2, 3, 4], [-0.5, -0.6, -0.1, -0.2], [-0.1, -0.2], 2, 2), set()),
    (raw_topk([1, 2, 3, 4], [-0.1, -0.5, -0.3, -0.2], [-0.1, -0.2], 2, 2), {"topk__sorted"}),
    (raw_topk([1, 2, 3], [-0.1, -0.1, -0.1], [-1.0], 1, 3), set()),  # ties are sorted
    (raw_topk([5], [-0.4], [-0.0], 1, 1), set()),
    (raw_topk([], [], [], 0, 4), set()),  # an empty response
    (raw_topk([1, 2], [-0.1, -INF], [-0.1], 1, 2), {"topk__finite"}),
    (raw_topk([1, 2], [INF, -0.5], [-0.1], 1, 2), {"topk__finite"}),
    (raw_topk([1, 2], [NAN, -0.5], [-0.1], 1, 2), {"topk__finite", "topk__sorted"}),
    (raw_topk([1, 2], [-0.1, -0.5], [-INF], 1, 2), {"topk__finite"}),
    (raw_topk([1, 2], [-0.1, -0.5], [NAN], 1, 2), {"topk__finite"}),
    (raw_topk([1, -1], [-0.1, -0.5], [-0.1], 1, 2), {"topk__ids_in_vocab"}),
    (raw_topk([VOCAB, 2], [-0.1, -0.5], [-0.1], 1, 2), {"topk__ids_in_vocab"}),
    (raw_topk([VOCAB - 1, 0], [-0.1, -0.5], [-0.1], 1, 2), set()),
    (raw_topk([1, 2], [-0.1, -0.5], [-0.1], 2, 2), {"topk__lengths_match"}),  # positions says 2
    (raw_topk([1], [-0.1, -0.5], [-0.1], 1, 2), {"topk__lengths_match"}),  # ids short
    (raw_topk([1, 2], [-0.1, -0.5, -0.6], [-0.1], 1, 2), {"topk__lengths_match"}),  # log-probs long
    (raw_topk([1, 2], [-0.1, -0.5], [-0.1, -0.2], 1, 2), {"topk__lengths_match"}),  # targets long
    # not a multiple of k: the last chunk is short and still checked on its own
    (raw_topk([1, 2, 3], [-0.1, -0.5, -0.2], [-0.1], 1, 2), {"topk__lengths_match"}),
    (raw_topk([1, 2, 3], [-0.1, -0.5, -0.9], [-0.1], 1, 2), {"topk__lengths_match"}),
    (raw_topk([1, 2, 3, 4, 5], [-0.1, -0.5, -0.9, -0.2, -0.1], [-0.1], 2, 2), {"topk__lengths_match", "topk__sorted"}),
    (raw_topk([1, 2], [-0.5, -0.1], [-0.1], 2, 0), {"topk__lengths_match"}),  # k 0: no chunks to sort
    (raw_topk([], [], [], 3, 0), {"topk__lengths_match"}),
    (raw_topk([1, 2], [-0.5, -0.1], [-0.1], -1, -2), {"topk__lengths_match"}),  # negative k: no chunks
    (raw_topk([], [], [], 0, 0), set()),
    # nulls a damaged file could hold: a null list is empty, a null count is 0
    (raw_topk(None, None, None, 0, 2), set()),
    (raw_topk(None, [-0.1, -0.5], [-0.1], 1, 2), {"topk__lengths_match"}),
    (raw_topk([1, 2], [-0.1, -0.5], None, 1, 2), {"topk__lengths_match"}),
    (raw_topk([1, 2], [-0.5, -0.1], [-0.1], 1, None), {"topk__lengths_match"}),
    (raw_topk([], [], [], None, 2), set()),
    (raw_topk([1, 2], [-0.1, -0.5], [-0.1], None, 2), {"topk__lengths_match"}),
    # every fault at once
    (raw_topk([-3, 99, 7], [-0.5, NAN, 0.1], [INF, -0.1], 2, 2), set(suites.TOPK_OK)),
    (raw_topk([1, 2, 3, 4], [-0.1, -0.5, -0.2, -0.3], [-0.1, -0.2], 2, 2), set()),
]


def assert_flags_match(batch: pa.Table, vocab_size: int | None) -> dict[str, list[bool]]:
    want = old_topk_flags(batch, vocab_size)
    got = {name: col.to_pylist() for name, col in suites._topk_flags(batch, vocab_size).items()}
    assert list(got) == list(want) == list(suites.TOPK_OK)
    assert all(isinstance(v, bool) for col in got.values() for v in col)
    assert got == want
    return got


@pytest.mark.parametrize("vocab_size", [VOCAB, None, 2**40])
def test_array_topk_flags_flag_exactly_the_rows_the_python_checks_flagged(vocab_size: int | None) -> None:
    batch = table([row for row, _ in TOPK_CASES], LOOSE_TOPK)
    got = assert_flags_match(batch, vocab_size)
    if vocab_size == VOCAB:  # and the faults are the ones each row was built with
        failing = [{name for name, col in got.items() if not col[i]} for i in range(batch.num_rows)]
        assert failing == [bad for _, bad in TOPK_CASES]
    # a slice (offsets not at 0), a table of several chunks, an empty table
    assert_flags_match(batch.slice(5, 17), vocab_size)
    assert_flags_match(pa.concat_tables([batch.slice(0, 7), batch.slice(7, 1), batch.slice(8)]), vocab_size)
    assert_flags_match(batch.slice(0, 0), vocab_size)


def test_array_topk_flags_ignore_what_a_null_list_points_at() -> None:
    # Arrow lets a null list own a non-empty segment of the child values: the middle row's is all faults
    null_middle = pa.array([False, True, False])

    def lists(offsets: list[int], values: list, type_: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_), mask=null_middle)

    batch = pa.table(
        {
            "positions": pa.array([1, 0, 1], pa.int32()),
            "k": pa.array([2, 2, 2], pa.int32()),
            "topk_ids": lists([0, 2, 4, 6], [1, 2, -5, 99, 3, 4], pa.int32()),
            "topk_logprobs": lists([0, 2, 4, 6], [-0.1, -0.5, NAN, 0.5, -0.1, -0.2], pa.float32()),
            "target_logprob": lists([0, 1, 2, 3], [-0.1, INF, -0.3], pa.float32()),
        }
    )
    assert batch.column("topk_ids").to_pylist() == [[1, 2], None, [3, 4]]
    got = assert_flags_match(batch, VOCAB)
    assert all(all(col) for col in got.values())
    assert_flags_match(batch.slice(1), VOCAB)


def test_array_topk_flags_agree_with_the_python_checks_on_random_rows() -> None:
    rng = random.Random(7)
    rows = []
    for _ in range(400):
        k, positions = rng.choice([1, 2, 3, 4]), rng.randint(0, 5)
        lps = []
        for _ in range(positions):
            lps += sorted((-rng.expovariate(1.0) for _ in range(k)), reverse=True)
        ids = [rng.randrange(VOCAB) for _ in range(positions * k)]
        target = [-rng.expovariate(1.0) for _ in range(positions)]
        fault = rng.randrange(8)
        if fault == 1 and len(lps) > 1:
            i = rng.randrange(len(lps) - 1)
            lps[i], lps[i + 1] = lps[i + 1], lps[i]
        elif fault == 2 and lps:
            lps[rng.randrange(len(lps))] = rng.choice([NAN, INF, -INF])
        elif fault == 3 and target:
            target[rng.randrange(len(target))] = rng.choice([NAN, INF, -INF])
        elif fault == 4 and ids:
            ids[rng.randrange(len(ids))] = rng.choice([-1, VOCAB, VOCAB + 7, -(2**31)])
        elif fault == 5:
            rng.choice([ids, lps, target]).append(-0.5 if rng.random() < 0.5 else 3)
        elif fault == 6:
            positions += rng.choice([-1, 1])
        elif fault == 7:
            k = rng.choice([0, -1, k + 1])
        rows.append(raw_topk([int(i) for i in ids], lps, target, positions, k))
    batch = table(rows, LOOSE_TOPK)
    got = assert_flags_match(batch, VOCAB)
    assert sum(not all(col[i] for col in got.values()) for i in range(len(rows))) > 100  # faults were made
    assert_flags_match(batch, None)


def test_a_null_entry_inside_a_topk_list_fails_its_check() -> None:
    # the Python checks raised TypeError on these; a missing id or log-prob is not a valid one
    rows = [
        raw_topk([1, None], [-0.1, -0.5], [-0.1], 1, 2),
        raw_topk([1, 2], [-0.1, None], [-0.1], 1, 2),
        raw_topk([1, 2], [-0.1, -0.5], [None], 1, 2),
        raw_topk([1, 2], [-0.1, -0.5], [-0.1], 1, 2),
    ]
    flags = {n: c.to_pylist() for n, c in suites._topk_flags(table(rows, LOOSE_TOPK), VOCAB).items()}
    assert flags["topk__ids_in_vocab"] == [False, True, True, True]
    assert flags["topk__finite"] == [True, False, False, True]
    assert flags["topk__lengths_match"] == [True] * 4


def test_a_quarantining_topk_gate_names_the_first_failing_check_per_row() -> None:
    rows = [{**row, "pair_id": f"p{i}"} for i, (row, _) in enumerate(TOPK_CASES) if None not in row.values()]
    gate = quality.Gate(
        "topk",
        "topk.parquet",
        "topk",
        dataclasses.replace(Q, max_quarantine_share=1.0),
        quarantine=True,
        vocab_size=VOCAB,
    )
    kept, bad = gate.check(table(rows, records.TOPK_SCHEMA))
    want = {}
    for row, (_, flags) in zip(rows, [(r, f) for r, f in TOPK_CASES if None not in r.values()], strict=True):
        if row["k"] < 1:
            want[row["pair_id"]] = "gate:expect_column_values_to_be_between:k"
        elif flags:
            first = next(name for name in suites.TOPK_OK if name in flags)
            want[row["pair_id"]] = f"gate:expect_column_values_to_be_in_set:{first}"
    assert {b["pair_id"]: b["reason"] for b in bad} == want
    assert kept.num_rows == len(rows) - len(want) > 0
