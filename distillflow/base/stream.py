"""Streaming Parquet output: write rows as they come, never the whole table in memory.

    with ParquetSink(path, schema, batch_rows=65_536) as sink:
        for row in rows:
            sink.write([row])          # row dicts, a pa.Table or a pa.RecordBatch
    sink.rows                          # rows written

Rows are buffered and written as row groups of exactly `batch_rows` (the last one
holds the rest), so the file's layout depends only on the rows and `batch_rows`,
never on how the writes were chunked. With the same writer options as
io.write_table (zstd, no statistics) a file of up to `batch_rows` rows is one row
group, the same bytes io.write_table writes for those rows. The file appears at
`path` only when the `with` block ends without an error (io.atomic_path).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.base.io import atomic_path

DEFAULT_BATCH_ROWS = 65_536


class RowSink(Protocol):
    """Where a streaming stage puts rows: a ParquetSink, or a list in tests."""

    rows: int

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table | pa.RecordBatch) -> None: ...


class ParquetSink:
    """A Parquet file written in row groups of `batch_rows`, atomically, with `schema`."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        if batch_rows < 1:
            raise ValueError(f"{path}: batch_rows must be >= 1, got {batch_rows}")
        self.path, self.schema, self.batch_rows = path, schema, batch_rows
        self.rows = 0  # rows accepted by write(), flushed or not
        self._dicts: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []
        self._buffered = 0
        self._stack = ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> Self:
        tmp = self._stack.enter_context(atomic_path(self.path))
        # The options io.write_table uses: byte-deterministic, no statistics.
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd", write_statistics=False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self._flush(final=True)
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            # atomic_path renames the file into place on success and deletes it on error.
            self._stack.__exit__(exc_type, exc, tb)

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table | pa.RecordBatch) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.path}: write() outside the sink's `with` block")
        if isinstance(rows, (pa.Table, pa.RecordBatch)):
            self._add_table(rows)
        else:
            self._dicts.extend(rows)
            self._buffered += len(rows)
            self.rows += len(rows)
        if self._buffered >= self.batch_rows:
            self._flush(final=False)

    def _add_table(self, data: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        if table.schema.names != self.schema.names:
            raise ValueError(f"{self.path}: columns {table.schema.names} do not match the schema's {self.schema.names}")
        self._dicts_to_table()
        self._tables.append(table.cast(self.schema))
        self._buffered += table.num_rows
        self.rows += table.num_rows

    def _dicts_to_table(self) -> None:
        if self._dicts:
            try:
                self._tables.append(pa.Table.from_pylist(self._dicts, schema=self.schema))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                first = self.rows - self._buffered + sum(t.num_rows for t in self._tables)
                raise ValueError(
                    f"{self.path}: rows {first}..{first + len(self._dicts) - 1} do not fit the schema ({exc})"
                ) from exc
            self._dicts = []

    def _flush(self, final: bool) -> None:
        """Write every full row group buffered (and on `final`, the rest)."""
        assert self._writer is not None
        self._dicts_to_table()
        if not self._tables:
            if final and self.rows == 0:
                # io.write_table writes one empty row group for no rows: so do we.
                self._writer.write_table(self.schema.empty_table())
            return
        table = pa.concat_tables(self._tables).combine_chunks()
        full = table.num_rows if final else table.num_rows - table.num_rows % self.batch_rows
        for start in range(0, full, self.batch_rows):
            self._writer.write_table(
                table.slice(start, min(self.batch_rows, full - start)), row_group_size=self.batch_rows
            )
        rest = table.slice(full)
        self._tables = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
