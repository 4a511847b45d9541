from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillflow.base import io, records


def prompt_row(i: int) -> dict:
    return {
        "prompt_id": f"id{i}",
        "prompt": f"p{i}",
        "split": "train",
        "reference": None,
        "category": None,
        "source": "toy",
        "source_ref": f"toy:{i}",
        "group": None,
    }


def test_write_then_read_roundtrip_is_byte_deterministic(tmp_path: Path) -> None:
    rows = [prompt_row(i) for i in range(5)]
    io.write_table(tmp_path / "a.parquet", rows, records.PROMPT_SCHEMA)
    io.write_table(tmp_path / "b.parquet", rows, records.PROMPT_SCHEMA)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert io.read_rows(tmp_path / "a.parquet", records.PROMPT_SCHEMA) == rows


def test_read_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(io.DataError, match="nope.parquet: file not found"):
        io.read_table(tmp_path / "nope.parquet", records.PROMPT_SCHEMA)


def test_read_rejects_truncated_parquet(tmp_path: Path) -> None:
    io.write_table(tmp_path / "a.parquet", [prompt_row(i) for i in range(50)], records.PROMPT_SCHEMA)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.DataError, match="t.parquet: not a readable Parquet file"):
        io.read_table(tmp_path / "t.parquet", records.PROMPT_SCHEMA)


def test_read_names_missing_and_extra_columns(tmp_path: Path) -> None:
    table = pa.table({"prompt_id": ["a"], "prompt": ["x"], "bogus": [1]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(
        io.DataError,
        match=r"c.parquet: columns do not match schema 'prompt'.*missing \['category'.*unexpected \['bogus'\]",
    ):
        io.read_table(tmp_path / "c.parquet", records.PROMPT_SCHEMA)


def test_read_names_wrong_type(tmp_path: Path) -> None:
    row = prompt_row(0)
    table = pa.table({k: [v] for k, v in row.items()}).set_column(1, "prompt", pa.array([7]))
    pq.write_table(table, tmp_path / "w.parquet")
    with pytest.raises(io.DataError, match="column 'prompt' has type int64, expected string"):
        io.read_table(tmp_path / "w.parquet", records.PROMPT_SCHEMA)


def test_read_names_row_and_field_of_a_null(tmp_path: Path) -> None:
    rows = [prompt_row(i) for i in range(3)]
    rows[2]["prompt"] = None
    schema = pa.schema([f.with_nullable(True) for f in records.PROMPT_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "n.parquet")
    with pytest.raises(io.DataError, match="n.parquet: row 2, field 'prompt': null"):
        io.read_table(tmp_path / "n.parquet", records.PROMPT_SCHEMA)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_folder_and_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "stage"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with io.atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]


def test_digest_of_folder_changes_with_any_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    before = io.digest_path(tmp_path / "d")
    (tmp_path / "d" / "x").write_text("2")
    assert io.digest_path(tmp_path / "d") != before
