"""report: the method comparison's table, plot and verdict against the paper.

    python -m stages.report --params params.yaml --cells metrics/compare --reference metrics/evaluate.json \
        --out reports/comparison --plot plots/comparison.csv

Reads one metrics file per (run, seed) cell of the `compare` matrix (stages/compare.py)
and the evaluate stage's metrics (teacher and initial student, for scale). Writes, under
`--out` (committed to git, not the DVC cache): table.md and table.csv (mean and standard
deviation over seeds of every metric, per run), exact_match.png (mean with the seed
spread), and README.md, which places our ordering beside the paper's
(docs/METHOD.md) and says where they agree, per adjacent pair, and whether
the gap is larger than the spread across seeds. `--plot` is the same means as a DVC plot.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.lib.core import entry, params
from stages.lib.core.params import check
from stages.lib.data.io import DataError, atomic_dir, atomic_path
from stages.lib.training.cells import RunParams

log = logging.getLogger("report")


@dataclass(frozen=True)
class CompareParams:
    """params.yaml `compare`."""

    seeds: tuple[int, ...]  # train.seed of each repetition
    runs: dict[str, RunParams]  # name -> method and DistiLLM-2 switches disabled

    def __post_init__(self) -> None:
        check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
            "seeds",
            "list at least one seed, each once",
        )
        check(len(self.runs) >= 1, "runs", "name at least one run")


SECTIONS: dict[str, Any] = {"compare": CompareParams}
PARAMS = tuple(SECTIONS)

# (column, where it is in a cell's metrics, higher is better)
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("exact_match", ("student", "accuracy", "exact_match"), True),
    ("rouge_l_vs_teacher", ("student", "rouge_l_vs_teacher"), True),
    ("kl_teacher_student", ("student", "kl_teacher_student"), False),
    ("nll_on_teacher_responses", ("student", "nll_on_teacher_responses"), False),
    ("nll_on_own_responses", ("student", "nll_on_own_responses"), False),
    ("greedy_agreement", ("student", "greedy_agreement"), True),
    ("teacher_call_speedup", ("student", "speculative", "teacher_call_speedup"), True),
    ("mean_response_tokens", ("student", "response_tokens", "mean"), False),
    ("final_train_loss", ("train", "final_loss"), False),
]

# The paper's orderings (docs/METHOD.md), worst to best, with its figures.
PAPER = {
    "methods (instruction following, avg win rate; Qwen2-7B -> 1.5B)": [
        ("sft", 30.33),
        ("kd", 41.19),
        ("gkd", 56.14),
        ("distillm", 56.35),
        ("distillm2", 58.69),
    ],
    "ablation (Evol-Instruct win rate)": [
        ("distillm", 41.55),
        ("contrastive", 43.61),
        ("contrastive_beta", 44.80),
        ("contrastive_alpha", 45.22),
        ("distillm2", 46.50),
    ],
    "speculative decoding drafter (acceptance rate)": [
        ("sft", 0.412),
        ("gkd", 0.464),
        ("distillm", 0.469),
        ("distillm2", 0.487),
    ],
}
PAPER_METRIC = {"speculative decoding drafter (acceptance rate)": "greedy_agreement"}


def dig(node: Any, path: tuple[str, ...], where: str) -> float | None:
    """The value at `path`; None where the cell recorded null (nothing to measure)."""
    for k in path:
        if not isinstance(node, dict) or k not in node:
            raise DataError(
                f"{where}: no {'.'.join(path)} (every cell must have been evaluated the same way; rerun `dvc repro`)"
            )
        node = node[k]
    return None if node is None else float(node)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def aggregate(cells_dir: Path, p: CompareParams) -> dict[str, dict[str, tuple[float, float]]]:
    """run -> metric -> (mean, sample std over seeds); every listed cell must exist."""
    cols = [c for c, _, _ in METRICS]
    has_accuracy: bool | None = None
    out: dict[str, dict[str, tuple[float, float]]] = {}
    nulls: list[str] = []
    for run in p.runs:
        values: dict[str, list[float]] = {c: [] for c in cols}
        for seed in p.seeds:
            f = cells_dir / f"{run}-{seed}.json"
            if not f.is_file():
                raise DataError(
                    f"{f}: missing; compare.runs lists {run!r} and compare.seeds {seed}, "
                    "so `dvc repro` should have made it"
                )
            cell = json.loads(f.read_text())
            if (cell["run"], cell["seed"]) != (run, seed):
                raise DataError(f"{f}: holds run {cell['run']!r} seed {cell['seed']}, not {run!r} seed {seed}")
            acc = "accuracy" in cell["student"]
            if has_accuracy is not None and acc != has_accuracy:
                raise DataError(f"{f}: exact match is {'present' if acc else 'absent'} here but not in the other cells")
            has_accuracy = acc
            for c, path, _ in METRICS:
                if c == "exact_match" and not acc:
                    continue  # prompts without reference answers: no exact match anywhere
                if c == "teacher_call_speedup" and "speculative" not in cell["student"]:
                    continue
                v = dig(cell, path, str(f))
                if v is None:
                    nulls.append(f"{run}-{seed}: {c}")
                else:
                    values[c].append(v)
        out[run] = {c: mean_std(v) for c, v in values.items() if v}
    if nulls:
        log.warning("report: no value (null) in %d cells, left out of their means: %s", len(nulls), ", ".join(nulls))
    return out


def verdict(table: dict[str, dict[str, tuple[float, float]]], default_metric: str) -> list[str]:
    """Per paper ordering: our value for each row, and per adjacent pair whether we agree."""
    lines: list[str] = []
    for title, order in PAPER.items():
        metric = PAPER_METRIC.get(title, default_metric)
        present = [(run, fig) for run, fig in order if run in table and metric in table[run]]
        if len(present) < 2:
            continue
        lines += [f"**{title}**, ours by {metric}:", ""]
        lines += ["| run | paper | ours (mean ± std) |", "|---|---|---|"]
        lines += [
            f"| {run} | {fig} | {table[run][metric][0]:.4f} ± {table[run][metric][1]:.4f} |" for run, fig in present
        ]
        lines.append("")
        agree = 0
        for (a, _), (b, _) in zip(present, present[1:]):
            (ma, sa), (mb, sb) = table[a][metric], table[b][metric]
            diff = mb - ma
            same = diff > 0
            agree += same
            clear = abs(diff) > sa + sb
            lines.append(
                f"- paper: {b} > {a}; ours: {b} {'>' if diff > 0 else '<='} {a} by {abs(diff):.4f} "
                f"({'agrees' if same else 'disagrees'}; {'larger than' if clear else 'within'} "
                f"the seed spread {sa + sb:.4f})"
            )
        lines += ["", f"{agree} of {len(present) - 1} adjacent orderings agree with the paper.", ""]
    return lines


def write(
    out: Path, plot: Path, table: dict[str, dict[str, tuple[float, float]]], p: CompareParams, reference: dict[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c, _, _ in METRICS if any(c in v for v in table.values())]
    main = "exact_match" if "exact_match" in cols else "rouge_l_vs_teacher"
    with atomic_dir(out) as tmp:
        with (tmp / "table.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "method", "disable", "seeds", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))])
            for run, v in table.items():
                w.writerow(
                    [
                        run,
                        p.runs[run].method,
                        "+".join(p.runs[run].disable),
                        len(p.seeds),
                        *(f"{v[c][i]:.6f}" if c in v else "" for c in cols for i in (0, 1)),
                    ]
                )
        ranked = sorted(table, key=lambda r: -table[r][main][0])
        md = [f"| run | method | disabled | {' | '.join(cols)} |", "|---|---|---|" + "---|" * len(cols)]
        for run in ranked:
            v = table[run]
            md.append(
                f"| {run} | {p.runs[run].method} | {', '.join(p.runs[run].disable) or '-'} | "
                + " | ".join(f"{v[c][0]:.4f} ± {v[c][1]:.4f}" if c in v else "-" for c in cols)
                + " |"
            )
        (tmp / "table.md").write_text("\n".join(md) + "\n")
        fig, ax = plt.subplots(figsize=(9, 4))
        means, stds = [table[r][main][0] for r in ranked], [table[r][main][1] for r in ranked]
        ax.bar(ranked, means, yerr=stds, capsize=4, color="#4c72b0")
        for name, style in (("teacher", "--"), ("student_initial", ":")):
            acc = reference[name].get("accuracy")  # absent for prompts without reference answers
            if main == "exact_match" and acc is not None:
                val = acc["exact_match"]
                ax.axhline(val, linestyle=style, color="gray", label=name)
        ax.set_ylabel(f"{main} (mean ± std over {len(p.seeds)} seeds)")
        ax.tick_params(axis="x", rotation=30)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(tmp / f"{main}.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        ref_lines = []
        for name in ("teacher", "student_initial"):
            acc = reference[name].get("accuracy")
            if acc is not None:
                ref_lines.append(f"- {name}: exact match {acc['exact_match']:.4f} (metrics/evaluate.json)")
        readme = [
            "# Method comparison",
            "",
            f"{len(p.runs)} runs x {len(p.seeds)} seeds (train.seed = {list(p.seeds)}), "
            "all trained from the same initial student on the same",
            "curated pairs with the same loop; mean ± sample standard deviation over seeds. Produced by",
            "`dvc repro report` (stages compare@<run>-<seed> and report).",
            "",
            *ref_lines,
            "",
            "## Table",
            "",
            *md,
            "",
            "## Against the paper",
            "",
            *verdict(table, main),
        ]
        (tmp / "README.md").write_text("\n".join(readme))
    with atomic_path(plot) as tmp_plot, tmp_plot.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", f"{main}_mean", f"{main}_std"])
        for run in ranked:
            w.writerow([run, f"{table[run][main][0]:.6f}", f"{table[run][main][1]:.6f}"])


def main() -> None:
    args = entry.parse_paths(__doc__, "cells", "reference", "out", "plot")
    p: CompareParams = params.load_sections(args.params, SECTIONS)["compare"]
    table = aggregate(args.cells, p)
    write(args.out, args.plot, table, p, json.loads(args.reference.read_text()))
    log.info("report: %d runs x %d seeds -> %s", len(p.runs), len(p.seeds), args.out)


if __name__ == "__main__":
    entry.run_stage(main)
