import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import seed
from stages.lib import params, records
from stages.lib.io import DataError, read_table, write_table

from .conftest import ROOT
from .test_bootstrap import TASK


def seed_params(kind: str = "toy", path: str | None = None, field: str | None = None, num_train: int = 40, num_eval: int = 5, max_chars: int = 2000) -> seed.SeedParams:
    return seed.SeedParams(seed.SourceParams(kind, path, None, None, None, field), seed=1, num_train=num_train, num_eval=num_eval, max_prompt_chars=max_chars)


def reconcile(counts: dict) -> None:
    assert counts["read"] == counts["train"] + counts["eval"] + counts["quarantined"] + counts["unused_over_quota"]
    assert counts["quarantined"] == sum(counts["dropped_by_reason"].values())


def test_toy_source_is_deterministic_disjoint_and_reconciles() -> None:
    p = seed_params()
    train, evals, _quarantine, counts = seed.run(TASK, p, seed.source_rows(TASK, p))
    again = seed.run(TASK, p, seed.source_rows(TASK, p))
    assert (train, evals) == again[:2]
    assert len(train) == 40 and len(evals) == 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}
    assert all(r["reference"] and r["category"] and r["source_ref"].startswith("toy:seed=1:index=") for r in train)
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in evals} == {"eval"}
    reconcile(counts)


def test_jsonl_bad_rows_are_quarantined_with_reasons(tmp_path: Path) -> None:
    f = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"text": "What is distillation?"}).encode(),
        b"{not json",
        b"\xff\xfe invalid utf-8",
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * 1_000_000}).encode(),
        json.dumps({"text": "What is  distillation?"}).encode(),  # duplicate after normalisation
        *[json.dumps({"text": f"Question number {i}?"}).encode() for i in range(60)],
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    p = seed_params("jsonl", str(f), "text", num_train=1000, num_eval=1000, max_chars=10_000)
    train, evals, quarantine, counts = seed.run(TASK, p, seed.source_rows(TASK, p))
    by_ref = {q["source_ref"]: q["reason"] for q in quarantine}
    assert by_ref == {
        f"{f}:line=2": "invalid_json",
        f"{f}:line=3": "invalid_utf8",
        f"{f}:line=4": "missing_field:text",
        f"{f}:line=5": "null_prompt",
        f"{f}:line=6": "not_a_string",
        f"{f}:line=7": "empty_prompt",
        f"{f}:line=8": "prompt_too_long",
        f"{f}:line=9": "duplicate_prompt",
    }
    assert len(train) + len(evals) == 61
    assert counts["read"] == len(lines)
    reconcile(counts)
    assert all(r["reference"] is None and r["source"] == "jsonl" for r in train)


def test_parquet_source_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": [f"Prompt {i}" for i in range(50)]}), f)
    p = seed_params("parquet", str(f), "q", num_train=1000, num_eval=1000)
    train, evals, _, _counts = seed.run(TASK, p, seed.source_rows(TASK, p))
    assert len(train) + len(evals) == 50
    assert train[0]["source_ref"].startswith(f"{f}:row=")
    with pytest.raises(DataError, match=r"p.parquet: no column 'prompt'"):
        list(seed.source_rows(TASK, seed_params("parquet", str(f), "prompt")))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        list(seed.source_rows(TASK, seed_params("parquet", str(broken), "q")))


def test_empty_source_fails_clearly(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    p = seed_params("jsonl", str(f), "text")
    with pytest.raises(DataError, match="gave 0 train and 0 eval prompts"):
        seed.run(TASK, p, seed.source_rows(TASK, p))


def test_file_sources_need_path_and_field() -> None:
    with pytest.raises(ValueError, match="path: source kind 'jsonl' needs a path"):
        seed.SourceParams("jsonl", None, None, None, None, "text")
    with pytest.raises(ValueError, match="split: an hf source needs a split"):
        seed.SourceParams("hf", "HuggingFaceH4/ultrachat_200k", None, None, None, "prompt")


def reconcile_files(folder: Path, counts: dict) -> None:
    """The written files hold the counted rows and read back with their schemas."""
    assert read_table(folder / "train.parquet", records.PROMPT_SCHEMA).num_rows == counts["train"]
    assert read_table(folder / "eval.parquet", records.PROMPT_SCHEMA).num_rows == counts["eval"]
    assert read_table(folder / "quarantine.parquet", seed.QUARANTINE_SCHEMA).num_rows == counts["quarantined"]
    reconcile(counts)


def big_rows(n: int) -> list[object]:
    """n prompt values, with a duplicate, an empty and a non-string every so often."""
    values: list[object] = []
    for i in range(n):
        values.append("" if i % 997 == 1 else 7 if i % 1009 == 2 else f"Prompt number {i % (n - 100)}: say something.")
    return values


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streaming_a_50k_row_source_reconciles(tmp_path: Path, kind: str) -> None:
    n = 50_000
    values = big_rows(n)
    src = tmp_path / f"src.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"q": pa.array([v if isinstance(v, str) else None for v in values], pa.string())}), src)
    else:
        src.write_text("".join(json.dumps({"q": v}) + "\n" for v in values))
    p = seed_params(kind, str(src), "q", num_train=1_000_000, num_eval=1_000)  # eval fills up, train never
    out = tmp_path / "out"
    out.mkdir()
    result, outputs = seed.stream_to(out, TASK, p, seed.source_rows(TASK, p), batch_rows=4096)
    counts = result.counts
    assert counts["read"] == n and counts["train"] > 40_000 and counts["eval"] == 1_000
    assert counts["unused_over_quota"] > 0 and counts["dropped_by_reason"]["duplicate_prompt"] > 0
    assert outputs == {"train.parquet": counts["train"], "eval.parquet": 1_000, "quarantine.parquet": counts["quarantined"]}
    assert pq.ParquetFile(out / "train.parquet").num_row_groups == -(-counts["train"] // 4096)
    reconcile_files(out, counts)
    # the same rows, in the same order, as the in-memory path
    train, _, quarantine, again = seed.run(TASK, p, seed.source_rows(TASK, p))
    assert again == counts
    assert read_table(out / "train.parquet", records.PROMPT_SCHEMA).to_pylist() == train
    assert read_table(out / "quarantine.parquet", seed.QUARANTINE_SCHEMA).to_pylist() == quarantine


def test_streamed_outputs_are_the_bytes_write_table_gave(tmp_path: Path) -> None:
    """params.yaml's toy default, streamed, is byte-identical to io.write_table of the
    same rows (the pre-streaming writer), so the reference run's dvc.lock stays valid."""
    sections = params.load_sections(ROOT / "params.yaml", seed.SECTIONS)
    task, p = sections["task"], sections["seed"]
    streamed, listed = tmp_path / "streamed", tmp_path / "listed"
    streamed.mkdir()
    result, _ = seed.stream_to(streamed, task, p, seed.source_rows(task, p))
    train, evals, quarantine, counts = seed.run(task, p, seed.source_rows(task, p))
    assert counts == result.counts
    write_table(listed / "train.parquet", train, records.PROMPT_SCHEMA)
    write_table(listed / "eval.parquet", evals, records.PROMPT_SCHEMA)
    write_table(listed / "quarantine.parquet", quarantine, seed.QUARANTINE_SCHEMA)
    for name in ("train.parquet", "eval.parquet", "quarantine.parquet"):
        assert (streamed / name).read_bytes() == (listed / name).read_bytes(), name
