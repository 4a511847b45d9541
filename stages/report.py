"""report: the method comparison's analysis (docs/comparison-plan.md), tables and plot.

    python -m stages.report --params params.yaml --cells metrics/compare --out reports/comparison \
        --plot plots/comparison.csv

Reads only params.yaml `compare` and the cells folder: per (run, bootstrap, seed) cell of
the comparison matrix (stages/compare.py), `<run>-b<bootstrap>-s<seed>.json` (its
metrics, cost and how far its student moved) and `<run>-b<bootstrap>-s<seed>.prompts.parquet`
(its per-prompt scores, which also carry each bootstrap's reference teacher's and
initial student's answers, for scale). Every listed cell must exist, all scored on the
same eval prompts in the same order. Writes, under `--out` (committed to git, not the
DVC cache): README.md (the replicate, the primary test, the secondary family under
Holm, every run's means with intervals, differences and per skill exact match as
description, cost, DPKD's collapse, our verdict words beside the paper's), table.md and
table.csv (every run's mean of each metric with its 95% interval) and <metric>.png;
`--plot` is the tested metric's run means as a DVC plot.

The analysis lives in distillflow/evaluation/analysis.py, the params and cells in
distillflow/evaluation/comparison.py, the files in distillflow/evaluation/comparison_report.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillflow.base import params
from distillflow.base.io import atomic_dir, atomic_path
from distillflow.evaluation import comparison_report
from distillflow.evaluation.comparison import Cells, CompareParams, read_cells
from distillflow.stagekit import entry

# The library names besides run/main are the stage's interface to its tests (tests/test_report.py).
__all__ = ["SECTIONS", "PARAMS", "CompareParams", "read_cells", "run", "write", "main"]

log = logging.getLogger("report")

SECTIONS: dict[str, Any] = {"compare": CompareParams}
PARAMS = tuple(SECTIONS)


def run(cells: Cells, p: CompareParams) -> comparison_report.Report:
    """The report's files from the cells (`read_cells`) and params."""
    return comparison_report.render(cells, p)


def write(out: Path, plot: Path, cells: Cells, p: CompareParams) -> None:
    """The report's files under `out` and its DVC plot at `plot`, each written whole or not at all."""
    report = run(cells, p)
    with atomic_dir(out) as tmp:
        for name, content in report.files.items():
            (tmp / name).write_bytes(content)
    with atomic_path(plot) as tmp_plot:
        tmp_plot.write_bytes(report.plot)


def main() -> None:
    args = entry.parse_paths(__doc__, "cells", "out", "plot")
    p: CompareParams = params.load_sections(args.params, SECTIONS)["compare"]
    cells = read_cells(args.cells, p)
    write(args.out, args.plot, cells, p)
    log.info(
        "report: %d runs x %d bootstraps x %d seeds on %d prompts -> %s",
        len(p.runs),
        len(p.bootstraps),
        len(p.seeds),
        len(cells.prompt_ids),
        args.out,
    )


if __name__ == "__main__":
    entry.run_stage(main)
