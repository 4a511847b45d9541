"""The one train/eval disjointness check: no prompt that is evaluated may be trained on.

Every stage that holds training rows and eval prompts uses these two functions:
`in_eval` gives the per-row mask the quality gates' `prompt_id__in_eval` expectation
checks (seed's train prompts, curate's pairs), and `check_disjoint` raises, naming
both files, the count and an example id (for a stage that reads both sets without a
gate: evaluate; the comparison cells check through the curated-pairs gate).

    from distillflow.audit import quality
    quality.check_disjoint(train_ids, eval_ids, train_file=src, eval_file=eval_file, what="training pairs")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillflow.base.io import DataError


def _ids(values: pa.Array | pa.ChunkedArray | Iterable[str | None]) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    return pa.array(list(values), type=pa.string())


def in_eval(
    prompt_ids: pa.Array | pa.ChunkedArray | Iterable[str | None], eval_ids: pa.Array | Iterable[str]
) -> pa.Array | pa.ChunkedArray:
    """True where a row's prompt id is an eval prompt's (a null id: False)."""
    value_set = eval_ids if isinstance(eval_ids, pa.Array) else pa.array(sorted(set(eval_ids)), type=pa.string())
    return pc.fill_null(pc.is_in(_ids(prompt_ids), value_set=value_set), False)


def read_prompt_ids(path: Path) -> pa.Array:
    """The prompt_id column of a prompt (or pair) Parquet file, as one array."""
    return pq.read_table(path, columns=["prompt_id"]).column("prompt_id").combine_chunks()


def check_disjoint(
    train_ids: pa.Array | pa.ChunkedArray | Iterable[str | None],
    eval_ids: pa.Array | Iterable[str],
    *,
    train_file: Path | str,
    eval_file: Path | str,
    what: str = "training prompts",
) -> None:
    """Raise DataError if any training row's prompt id is an eval prompt id: the message
    names the eval file, the count, the training file and the first leaked id (sorted)."""
    ids = _ids(train_ids)
    leaked = sorted({v for v in ids.filter(in_eval(ids, eval_ids)).to_pylist() if v is not None})
    if leaked:
        raise DataError(
            f"{eval_file}: {len(leaked)} eval prompts are also {what} in {train_file} (e.g. {leaked[0]}); "
            "evaluation would be contaminated"
        )
