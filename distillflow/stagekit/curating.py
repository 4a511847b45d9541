"""Curation of a pairs file between the quality gates (distillflow/audit/quality.py):
the curate step (distillflow/stagekit/writer.py), which the curate stage and each
on-policy round (rounds.py) run (distillflow/data/curation.py holds the filters)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import lineage, quality
from distillflow.base import quarantine as q
from distillflow.base import records
from distillflow.base.io import DataError, atomic_dir, read_table
from distillflow.base.stream import ParquetSink
from distillflow.data.curation import QUARANTINE_SCHEMA, CurateParams, Curator, pair_batches
from distillflow.stagekit.writer import Writer

CURATE_SECTIONS: dict[str, Any] = {"curate": CurateParams, "quality": quality.QualityParams}


@dataclass(frozen=True, kw_only=True)
class Curated:
    """What curate_file wrote: rows per file, the gates' report and the counts."""

    outputs: dict[str, int]
    validation: dict[str, Any]
    counts: dict[str, Any]


def curate_file(
    src: Path,
    folder: Path,
    p: CurateParams,
    qp: quality.QualityParams,
    train_ids: pa.Array,
    evals: pa.Table,
    *,
    docs: Path | None = None,
    shown: Path | None = None,
) -> Curated:
    """Stream the pairs file `src` through the input gate (kind `pair`, quarantining:
    row failures join the quarantine with `gate:<expectation>:<column>`), the filters
    and the output gate (kind `curated`, strict) into folder/curated.parquet and
    folder/quarantine.parquet. `train_ids`: the seed training prompt ids; `evals`: the
    eval prompts (their ids for the disjointness check, their text for
    decontamination); `docs`: the Data Docs folder; `shown`: the output folder as
    messages name it. Raises DataError naming the top reasons if no pair is left."""
    curator = Curator(p, evals.column("prompt").to_pylist())
    gates = quality.StageGates(qp, docs)
    eval_ids = evals.column("prompt_id").combine_chunks()
    gate_in = gates.gate("pairs", src, "pair", quarantine=True, refs={"prompt_id": train_ids, "eval": eval_ids})
    out_path = (shown or folder) / "curated.parquet"
    gate_out = gates.gate(
        "curated", out_path, "curated", quarantine=False, refs={"prompt_id": train_ids, "eval": eval_ids}
    )
    with (
        ParquetSink(folder / "curated.parquet", records.PAIR_SCHEMA, qp.batch_rows) as kept_sink,
        ParquetSink(folder / "quarantine.parquet", QUARANTINE_SCHEMA, qp.batch_rows) as bad_sink,
    ):
        for batch in pair_batches(src, qp.batch_rows):
            passed, gate_bad = gate_in.check(batch)
            kept, dropped = curator.split(passed.to_pylist())
            kept_table = pa.Table.from_pylist(kept, schema=records.PAIR_SCHEMA)
            gate_out.check(kept_table)
            kept_sink.write(kept_table)
            bad_sink.write(gate_bad + dropped)
    outputs = {"curated.parquet": kept_sink.rows, "quarantine.parquet": bad_sink.rows}
    validation = gates.finish()
    reasons = Counter(curator.reasons) + Counter(gate_in.reasons)
    counts = {
        "pairs_in": gate_in.rows_in,
        "kept": outputs["curated.parquet"],
        "quarantined": outputs["quarantine.parquet"],
        "dropped_by_reason": dict(sorted(reasons.items())),
        "gates": quality.validation_summary(validation),
    }
    if counts["kept"] + counts["quarantined"] != counts["pairs_in"]:  # the reconciliation the metrics promise
        raise AssertionError(f"curate: counts do not reconcile: {counts}")
    if not counts["kept"]:
        raise DataError(
            q.nothing_left(str(src), counts["pairs_in"], reasons, unit="pairs")
            + "; nothing to train on: relax params.yaml `curate` or fix the generations upstream"
        )
    return Curated(outputs=outputs, validation=validation, counts=counts)


def write_curated(w: Writer, src: Path, prompts_dir: Path) -> dict[str, Any]:
    """curated.parquet, quarantine.parquet and the manifest from the pairs file `src`
    (curating.curate_file: the gates and the filters), against the seed's train and
    eval prompts in `prompts_dir`."""
    files = {"pairs": src, "train_prompts": prompts_dir / "train.parquet", "eval_prompts": prompts_dir / "eval.parquet"}
    train_ids = read_table(files["train_prompts"], records.PROMPT_SCHEMA).column("prompt_id").combine_chunks()
    evals = read_table(files["eval_prompts"], records.PROMPT_SCHEMA)
    with atomic_dir(w.out) as tmp:
        c = curate_file(src, tmp, w.used["curate"], w.used["quality"], train_ids, evals, docs=w.docs, shown=w.out)
        lineage.write_manifest(
            tmp,
            "curate",
            w.only(CURATE_SECTIONS),
            inputs=files,
            outputs=c.outputs,
            counts=c.counts,
            extra={"validation": c.validation},
            module=w.module,
            step=w.is_step("curate"),
        )
    return c.counts
