"""What train and the comparison cells share around the trainer: the training inputs'
strict gate (distillflow/audit/quality.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import quality
from distillflow.base import records
from distillflow.base.io import read_table
from distillflow.training.train_params import TrainParams


def gate_inputs(
    q: quality.QualityParams, src: Path, scores_dir: Path, p: TrainParams, eval_ids: pa.Array | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the curated pairs, the validation report): the pairs through the strict curated
    gate (with `eval_ids`, also disjoint from those eval prompts), and with the topk
    signal the teacher's scores file; any failure stops the stage. No Data Docs here:
    the files' Data Docs come from curate and score."""
    gates = quality.StageGates(q, None)
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict(
        "curated pairs", src, "curated", table, **({"refs": {"eval": eval_ids}} if eval_ids is not None else {})
    )
    if p.teacher_signal == "topk":  # streamed here, then read again by load_inputs
        gates.check_file("teacher top-k", scores_dir / "topk.parquet", "topk")
    return table.to_pylist(), gates.finish()
