"""curate: filter the pairs; every drop counted by reason and kept in quarantine
(the logic: distillflow/data/curation.py).

    python -m stages.curate --params params.yaml --pairs data/pairs --prompts data/seed \
        --out data/curate --metrics metrics/curate.json --docs reports/quality/curate

The pairs stream through in Arrow record batches (`quality.batch_rows` rows), so memory
is bounded by the batch plus the filters' state (ids seen, MinHash LSH bands).

1. The input gate (distillflow/audit/quality.py, kind `pair`): a row that fails a row-level
   expectation (null field, repeated pair id, a prompt id that is not a seed training
   prompt, ...) is quarantined with the reason `gate:<expectation>:<column>`; a
   table-level failure (eval prompts among the pairs, too many duplicates) stops the
   stage.
2. The filters, in order; each is a function of one pair (and its own state) that
   returns None to keep it or the reason to drop it; the first reason wins:
   empty and truncated responses, length bounds, the response length ratio, degenerate
   repetition (word n-gram repetition ratio of the chosen response), teacher
   correctness where the prompt has a reference answer, decontamination against the
   eval prompts (word n-gram overlap), the student-matches-teacher policy, exact
   duplicates, near duplicates (MinHash LSH, datasketch), and category balancing.
3. The output gate (kind `curated`) checks what will train; any failure stops the stage.

Outputs: curated.parquet (records.PAIR_SCHEMA), quarantine.parquet (the same columns
plus `reason`), manifest.json, and Data Docs under --docs. Counts reconcile:
pairs in = kept + quarantined.
"""

from __future__ import annotations

import logging
from typing import Any

from distillflow.base import params
from distillflow.base.io import write_json
from distillflow.data import curation
from distillflow.data.curation import CurateParams
from distillflow.stagekit import curating, entry
from distillflow.stagekit.writer import Writer

__all__ = ["SECTIONS", "PARAMS", "CurateParams", "run", "main"]

log = logging.getLogger("curate")

SECTIONS: dict[str, Any] = curating.CURATE_SECTIONS
PARAMS = tuple(SECTIONS)


def run(
    p: CurateParams, pairs: list[dict[str, Any]], eval_prompts: list[str] | None = None
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(kept, quarantined with `reason`, counts): the filters only, curation.curate."""
    return curation.curate(p, pairs, eval_prompts)


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "prompts", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    w = Writer(out=args.out, module="curate", used=used, docs=args.docs)
    counts = curating.write_curated(w, args.pairs / "pairs.parquet", args.prompts)
    write_json(args.metrics, counts)
    log.info("curate: kept %d of %d pairs; dropped %s", counts["kept"], counts["pairs_in"], counts["dropped_by_reason"])


if __name__ == "__main__":
    entry.run_stage(main)
