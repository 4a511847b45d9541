"""report: the method comparison's table, plot and verdict against the paper.

    python -m stages.report --params params.yaml --cells metrics/compare --reference metrics/evaluate.json \
        --out reports/comparison --plot plots/comparison.csv

Reads one metrics file per (run, seed) cell of the `compare` matrix (stages/compare.py)
and the evaluate stage's metrics (teacher and initial student, for scale). Writes, under
`--out` (committed to git, not the DVC cache): table.md and table.csv (mean and standard
deviation over seeds of every metric, per run), exact_match.png (mean with the seed
spread), and README.md: exact match per skill, every run's paired difference (by seed)
from DistiLLM-2 and from KD with a 95% interval, and our ordering beside the paper's
(docs/METHOD.md), per adjacent pair, claimed only where the interval excludes 0 ("no
difference measured" otherwise). `--plot` is the same means as a DVC plot.

The numbers live in distillflow/evaluation/comparison.py (cells, means, paired
differences), the files in distillflow/evaluation/comparison_report.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distillflow.base import params
from distillflow.base.io import atomic_dir, atomic_path
from distillflow.evaluation import comparison_report
from distillflow.evaluation.comparison import (
    CompareParams,
    Values,
    aggregate,
    collect,
    control_of,
    counterpart,
    ordering,
    paired,
    summarise,
    t_quantile,
)
from distillflow.evaluation.comparison_report import controls_table, verdict
from distillflow.stagekit import entry

# The library names besides run/main are the stage's interface to its tests (tests/test_report.py).
__all__ = [
    "SECTIONS",
    "PARAMS",
    "CompareParams",
    "aggregate",
    "collect",
    "control_of",
    "controls_table",
    "counterpart",
    "ordering",
    "paired",
    "t_quantile",
    "verdict",
    "run",
    "write",
    "main",
]

log = logging.getLogger("report")

SECTIONS: dict[str, Any] = {"compare": CompareParams}
PARAMS = tuple(SECTIONS)


def run(values: Values, p: CompareParams, reference: dict[str, Any]) -> comparison_report.Report:
    """The report's files from the cells' values (`collect`) and metrics/evaluate.json."""
    return comparison_report.render(values, p, reference)


def write(out: Path, plot: Path, values: Values, p: CompareParams, reference: dict[str, Any]) -> None:
    """The report's files under `out` and its DVC plot at `plot`, each written whole or not at all."""
    report = run(values, p, reference)
    with atomic_dir(out) as tmp:
        for name, content in report.files.items():
            (tmp / name).write_bytes(content)
    with atomic_path(plot) as tmp_plot:
        tmp_plot.write_bytes(report.plot)


def main() -> None:
    args = entry.parse_paths(__doc__, "cells", "reference", "out", "plot")
    p: CompareParams = params.load_sections(args.params, SECTIONS)["compare"]
    values = collect(args.cells, p)
    write(args.out, args.plot, values, p, json.loads(args.reference.read_text()))
    for run_name, v in summarise(values).items():
        if "seconds" in v:
            log.info("report: %s: %.1f s per cell (mean over %d seeds)", run_name, v["seconds"][0], len(p.seeds))
    log.info("report: %d runs x %d seeds -> %s", len(p.runs), len(p.seeds), args.out)


if __name__ == "__main__":
    entry.run_stage(main)
