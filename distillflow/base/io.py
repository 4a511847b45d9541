"""File I/O every stage shares: atomic writes, checked Parquet, digests.

Writes go to a temporary name beside the target and are renamed into place, so a
killed stage never leaves a half-written file for DVC or Prefect to cache. Parquet
reads check the schema before any row is used and name the file and the column.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.base.errors import UsageError


class DataError(UsageError):
    """Bad input data; the message names the file, and the row and field where known."""


def digest_path(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file digest) list."""
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode())
            h.update(digest_path(p).encode())
        return h.hexdigest()
    raise FileNotFoundError(f"cannot digest {path}: no such file or folder")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; swap it in on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: Path, value: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> int:
    """Write `rows` as Parquet with exactly `schema`; returns the row count.

    Byte-deterministic for the same rows and pyarrow version (no timestamps, fixed
    compression), so DVC's early cutoff works downstream.
    """
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)
    return table.num_rows


def parquet_file(path: Path) -> pq.ParquetFile:
    """Open a Parquet file (footer and schema only); a missing or unreadable file is a
    DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (is the upstream stage's output missing?)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc


def check_columns(path: Path, got: pa.Schema, schema: pa.Schema) -> None:
    """`got` has exactly `schema`'s columns, with its types. Extra columns are an error
    too: a file from another stage or schema version must not pass for this one."""
    name = schema.metadata[b"distillflow.schema"].decode()
    version = (got.metadata or {}).get(b"distillflow.schema_version")
    if version is not None and version != schema.metadata[b"distillflow.schema_version"]:
        raise DataError(
            f"{path}: written with {name!r} schema version {version.decode()}, this release reads version "
            f"{schema.metadata[b'distillflow.schema_version'].decode()}: rerun the stage that wrote it (dvc repro)"
        )
    have = {f.name: f.type for f in got}
    want = {f.name: f.type for f in schema}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise DataError(f"{path}: columns do not match schema {name!r}: missing {missing}, unexpected {extra}")
    for name, typ in want.items():
        if have[name] != typ:
            raise DataError(f"{path}: column {name!r} has type {have[name]}, expected {typ}")


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file and check it has `schema`'s columns with its types
    (check_columns) and no nulls where the schema allows none."""
    pf = parquet_file(path)
    check_columns(path, pf.schema_arrow, schema)
    try:
        table = pf.read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            row = table.column(field.name).to_pylist().index(None)
            raise DataError(f"{path}: row {row}, field {field.name!r}: null in a non-nullable column")
    return table.select([f.name for f in schema]).cast(schema)


def read_rows(path: Path, schema: pa.Schema) -> list[dict[str, Any]]:
    return read_table(path, schema).to_pylist()
