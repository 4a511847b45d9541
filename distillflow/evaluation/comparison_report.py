"""The method comparison report's files, rendered from the cells' metrics
(distillflow/evaluation/comparison.py) into bytes; the report stage (stages/report.py)
writes them.

Under the report folder: table.md and table.csv (mean and standard deviation over seeds
of every metric, per run), <metric>.png (the main metric's mean with the seed spread),
and README.md: exact match per skill, every run's paired difference (by seed) from
DistiLLM-2 and from KD with a 95% interval, the controls against their default runs, and
our ordering beside the paper's (docs/METHOD.md), per adjacent pair, claimed only where
the interval excludes 0 ("no difference measured" otherwise). Beside it, the DVC plot:
the main metric's means as a CSV.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from distillflow.evaluation.comparison import (
    CONTROLS,
    METRICS,
    CompareParams,
    Paired,
    Table,
    Values,
    control_of,
    counterpart,
    mean_std,
    ordering,
    paired,
    summarise,
)

# The paper's orderings (docs/METHOD.md), worst to best, with its figures. The paper's
# "SFT" rows are the SFT *student* every method starts from: here the initial student
# (INITIAL, metrics/evaluate.json), not our `sft` run (SeqKD: NLL on the teacher's
# responses), for which the paper reports no row; SeqKD is in the table only.
INITIAL = "initial student"
PAPER = {
    "methods (instruction following, avg win rate; Qwen2-7B -> 1.5B)": [
        (INITIAL, 30.33),
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
        (INITIAL, 0.412),
        ("gkd", 0.464),
        ("distillm", 0.469),
        ("distillm2", 0.487),
    ],
}
PAPER_METRIC = {"speculative decoding drafter (acceptance rate)": "greedy_agreement"}


def _ci(diff: Paired) -> str:
    return f"[{diff.low:+.4f}, {diff.high:+.4f}]"


def _paper_rows(present: list[tuple[str, float]], at: dict[str, Any]) -> list[str]:
    """Our value beside the paper's figure, per row of one of its orderings."""
    lines = ["| run | paper | ours (mean ± std over seeds) |", "|---|---|---|"]
    for run, fig in present:
        v = at[run]
        ours = f"{v:.4f} (one model)" if isinstance(v, float) else "{:.4f} ± {:.4f}".format(*mean_std(list(v.values())))
        lines.append(f"| {run} | {fig} | {ours} |")
    return [*lines, ""]


def _paper_pairs(present: list[tuple[str, float]], at: dict[str, Any]) -> list[str]:
    """Per adjacent pair of one of the paper's orderings, our paired difference and what it lets us say."""
    lines: list[str] = []
    same = other = none = 0
    for (a, _), (b, _) in zip(present, present[1:]):
        diff = paired(at[a], at[b])
        said = ordering(a, b, diff)
        same += said == f"{b} > {a}"
        other += said == f"{b} < {a}"
        none += not diff.measured
        tag = "agrees" if said == f"{b} > {a}" else "disagrees" if diff.measured else "no claim"
        lines.append(
            f"- paper: {b} > {a}; ours: {b} - {a} = {diff.mean:+.4f}, 95% CI {_ci(diff)} "
            f"over {diff.n} paired seeds: {said} ({tag})"
        )
    return [
        *lines,
        "",
        f"Of {len(present) - 1} adjacent orderings: {same} measured in the paper's direction, {other} measured "
        f"the other way, {none} with no difference measured (the 95% interval holds 0).",
        "",
    ]


def verdict(values: Values, default_metric: str, reference: dict[str, Any]) -> list[str]:
    """Per paper ordering: our value for each row, and per adjacent pair the paired
    difference over seeds with its 95% interval; an ordering is claimed only where the
    interval excludes 0 ("no difference measured" otherwise). The paper's SFT rows are
    the initial student (`reference`: metrics/evaluate.json), one model for every seed."""
    initial = reference.get("student_initial", {})
    fixed = {"exact_match": (initial.get("accuracy") or {}).get("exact_match")}
    fixed |= {c: initial.get(c) for c in ("greedy_agreement", "rouge_l_vs_teacher", "kl_teacher_student")}
    lines: list[str] = []
    for title, order in PAPER.items():
        metric = PAPER_METRIC.get(title, default_metric)
        at: dict[str, Any] = {run: values[run][metric] for run, _ in order if run in values and metric in values[run]}
        if fixed.get(metric) is not None:
            at[INITIAL] = fixed[metric]
        present = [(run, fig) for run, fig in order if run in at]
        if len(present) < 2:
            continue
        lines += [f"**{title}**, ours by {metric}:", ""]
        lines += _paper_rows(present, at)
        lines += _paper_pairs(present, at)
    return lines


def pairs_table(values: Values, metric: str, against: tuple[str, ...] = ("distillm2", "kd")) -> list[str]:
    """Every run's paired difference from each of `against` on `metric`."""
    lines: list[str] = []
    for base in against:
        if base not in values or metric not in values[base]:
            continue
        lines += [
            f"Paired by seed, {metric}: run - {base} (95% CI)",
            "",
            "| run | difference | 95% CI | |",
            "|---|---|---|---|",
        ]
        for run in values:
            if run == base or metric not in values[run]:
                continue
            d = paired(values[base][metric], values[run][metric])
            lines.append(f"| {run} | {d.mean:+.4f} | {_ci(d)} | {ordering(base, run, d)} |")
        lines.append("")
    return lines


def _gain_lines(values: Values, p: CompareParams, metric: str, rows: list[tuple[str, str]]) -> list[str]:
    """Where both KD and DistiLLM-2 have a control of one kind: the DistiLLM-2 - KD gain
    under the control against the gain without it (a difference of paired differences)."""
    lines: list[str] = []
    by_kind: dict[str, dict[str, str]] = {}
    for c, d in rows:
        by_kind.setdefault(control_of(p.runs[c]) or "", {})[p.runs[d].method if not p.runs[d].disable else ""] = c
    for kind, runs in by_kind.items():
        if {"kd", "distillm2"} <= set(runs) and "kd" in values and "distillm2" in values:
            k, m = runs["kd"], runs["distillm2"]
            seeds = set(values[k][metric]) & set(values[m][metric]) & set(values["kd"][metric])
            seeds &= set(values["distillm2"][metric])
            gain = {s: values["distillm2"][metric][s] - values["kd"][metric][s] for s in seeds}
            under = {s: values[m][metric][s] - values[k][metric][s] for s in seeds}
            if len(seeds) >= 2:
                diff = paired(gain, under)
                lines.append(
                    f"- DistiLLM-2 - KD with {', '.join(CONTROLS[x][1] for x in kind.split('+'))}: "
                    f"{mean_std(list(under.values()))[0]:+.4f}, without: {mean_std(list(gain.values()))[0]:+.4f}; "
                    f"change {diff.mean:+.4f}, 95% CI {_ci(diff)} over {diff.n} seeds: "
                    + (
                        "the gain shrinks"
                        if diff.measured and diff.mean < 0
                        else "the gain grows"
                        if diff.measured
                        else "no difference measured"
                    )
                )
    return lines


def controls_table(values: Values, p: CompareParams, metric: str, explain: bool = True) -> list[str]:
    """Each control against its default run (control - default, paired by seed), and
    where both KD and DistiLLM-2 have a control of one kind, the DistiLLM-2 - KD gain
    under the control against the gain without it (a difference of paired differences).
    `explain`: say what a stale-round control checks (once per report, not per metric)."""
    lines: list[str] = []
    found = [(name, counterpart(p, name)) for name, r in p.runs.items() if control_of(r) is not None]
    rows = [(c, d) for c, d in found if d is not None and metric in values.get(c, {}) and metric in values.get(d, {})]
    if not rows:
        return lines
    lines += [f"Paired by seed, {metric}: control - its default run (95% CI)", ""]
    if explain and any(p.runs[c].rounds == "stale" for c, _ in rows):
        lines += [
            "A stale-round control trains on the same teacher responses as its default run for a method that",
            "reads no student samples (sft, kd), so no difference should be measured there: a check of the",
            "control itself; it tests on-policy sampling for the methods that read student samples.",
            "",
        ]
    lines += ["| control | changes | default run | difference | 95% CI | |", "|---|---|---|---|---|---|"]
    for c, d in rows:
        diff = paired(values[d][metric], values[c][metric])
        what = ", ".join(CONTROLS[k][1] for k in control_of(p.runs[c]).split("+"))  # type: ignore[union-attr]
        lines.append(f"| {c} | {what} | {d} | {diff.mean:+.4f} | {_ci(diff)} | {ordering(d, c, diff)} |")
    lines.append("")
    return [*lines, *_gain_lines(values, p, metric, rows), ""]


def breakdown(table: Table, ranked: list[str], prefix: str) -> list[str]:
    """One row per run, one column per `prefix`<name> metric (mean ± std over seeds)."""
    cols = sorted({c for v in table.values() for c in v if c.startswith(prefix)})
    if not cols:
        return []
    lines = ["| run | " + " | ".join(c[len(prefix) :] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for run in ranked:
        v = table[run]
        lines.append(
            f"| {run} | " + " | ".join(f"{v[c][0]:.4f} ± {v[c][1]:.4f}" if c in v else "-" for c in cols) + " |"
        )
    return [*lines, ""]


def cost_lines(table: Table, ranked: list[str]) -> list[str]:
    """Seconds per cell (sampling, training and evaluation), per run."""
    have = [r for r in ranked if "seconds" in table[r]]
    if not have:
        return []
    total = sum(table[r]["seconds"][0] for r in have)
    lines = ["| run | seconds per cell (mean ± std) |", "|---|---|"]
    lines += [f"| {r} | {table[r]['seconds'][0]:.1f} ± {table[r]['seconds'][1]:.1f} |" for r in have]
    return [*lines, "", f"Mean cell: {total / len(have):.1f} s over {len(have)} runs.", ""]


def ranked_runs(table: Table, main: str) -> list[str]:
    """The runs, best mean on `main` first (ties in params order)."""
    return sorted(table, key=lambda r: -table[r][main][0])


def table_csv(table: Table, cols: list[str], p: CompareParams) -> str:
    """table.csv: per run (in params order) its settings and every metric's mean and std."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "method", "disable", "control", "seeds", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))])
    for run, v in table.items():
        w.writerow(
            [
                run,
                p.runs[run].method,
                "+".join(p.runs[run].disable),
                control_of(p.runs[run]) or "",
                len(p.seeds),
                *(f"{v[c][i]:.6f}" if c in v else "" for c in cols for i in (0, 1)),
            ]
        )
    return buf.getvalue()


def table_md(table: Table, ranked: list[str], cols: list[str], p: CompareParams) -> list[str]:
    """table.md's lines: per run (best first) its settings and every metric's mean ± std."""
    md = [f"| run | method | disabled | control | {' | '.join(cols)} |", "|---|---|---|---|" + "---|" * len(cols)]
    for run in ranked:
        v = table[run]
        md.append(
            f"| {run} | {p.runs[run].method} | {', '.join(p.runs[run].disable) or '-'} | "
            f"{control_of(p.runs[run]) or '-'} | "
            + " | ".join(f"{v[c][0]:.4f} ± {v[c][1]:.4f}" if c in v else "-" for c in cols)
            + " |"
        )
    return md


def figure_png(table: Table, ranked: list[str], main: str, reference: dict[str, Any], seeds: int) -> bytes:
    """The main metric's mean per run with the spread over seeds (and the teacher's and
    initial student's exact match as lines), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    means, stds = [table[r][main][0] for r in ranked], [table[r][main][1] for r in ranked]
    ax.bar(ranked, means, yerr=stds, capsize=4, color="#4c72b0")
    for name, style in (("teacher", "--"), ("student_initial", ":")):
        acc = reference[name].get("accuracy")  # absent for prompts without reference answers
        if main == "exact_match" and acc is not None:
            val = acc["exact_match"]
            ax.axhline(val, linestyle=style, color="gray", label=name)
    ax.set_ylabel(f"{main} (mean ± std over {seeds} seeds)")
    ax.tick_params(axis="x", rotation=30)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def readme_intro(p: CompareParams, reference: dict[str, Any]) -> list[str]:
    """README.md's title, what the comparison is and how it was made, and the reference models."""
    ref_lines = []
    for name in ("teacher", "student_initial"):
        acc = reference[name].get("accuracy")
        if acc is not None:
            ref_lines.append(f"- {name}: exact match {acc['exact_match']:.4f} (metrics/evaluate.json)")
    return [
        "# Method comparison",
        "",
        f"{len(p.runs)} runs x {len(p.seeds)} seeds (train.seed = {list(p.seeds)}), "
        "all trained from the same initial student with the same",
        "loop and rounds (round 1 on the same curated pairs; later rounds on fresh student samples,",
        "except the stale-round controls); mean ± sample standard deviation over seeds. Produced by",
        "the comparison pipeline, comparison/dvc.yaml (`distillflow run --target comparison/dvc.yaml",
        "--jobs 2`, or `dvc repro comparison/dvc.yaml`: stages compare@<run>-<seed> and report).",
        "Differences between runs (exact match, share of right steps, KL to the teacher) are paired",
        "by seed (same seed: same data order from the same initial student) with a 95% t interval;",
        "an ordering is claimed only where the interval excludes 0. The paper's SFT rows",
        "are the SFT student the methods start from: our initial student. Our `sft` run is SeqKD",
        "(NLL on the teacher's responses), which the paper has no row for. exact_match is the",
        "verifier's pass rate (walk: any walk by its steps to its goal); step_share the share of steps",
        "right by the rule from what the student wrote.",
        "",
        *ref_lines,
        "",
    ]


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *lines] if lines else []


def readme(
    values: Values,
    table: Table,
    ranked: list[str],
    md: list[str],
    main: str,
    p: CompareParams,
    reference: dict[str, Any],
) -> str:
    """README.md: the intro, the table (`md`), the breakdowns, controls, cost, paired
    differences on `main` (and the share of right steps and the KL to the teacher where
    cells have them), and the verdict against the paper. Intervals need two seeds."""
    present = {c for v in values.values() for c in v}
    paired_metrics = [main, *(m for m in ("step_share", "kl_teacher_student") if m != main and m in present)]
    several = len(p.seeds) > 1
    controls = (
        [line for m in paired_metrics for line in controls_table(values, p, m, explain=m == main)] if several else []
    )
    lines = [
        *readme_intro(p, reference),
        "## Table",
        "",
        *md,
        "",
        *_section("Exact match per skill", breakdown(table, ranked, "exact_match/")),
        *_section("Share of right steps per skill", breakdown(table, ranked, "step_share/")),
        *_section("Exact match by reference length (characters)", breakdown(table, ranked, "by_length/")),
        *(["## Controls", "", *controls] if several else []),
        *_section("Cost", cost_lines(table, ranked)),
        "## Paired differences",
        "",
        *(
            [line for m in paired_metrics for line in pairs_table(values, m)]
            if several
            else ["(one seed: no interval; list two seeds or more)", ""]
        ),
        "## Against the paper",
        "",
        *(verdict(values, main, reference) if several else ["(one seed: no interval, no claim)"]),
    ]
    return "\n".join(lines)


def plot_csv(table: Table, ranked: list[str], main: str) -> str:
    """The DVC plot: the main metric's mean and std per run, best first."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", f"{main}_mean", f"{main}_std"])
    for run in ranked:
        w.writerow([run, f"{table[run][main][0]:.6f}", f"{table[run][main][1]:.6f}"])
    return buf.getvalue()


@dataclass(frozen=True)
class Report:
    """The report's files: `files` under the report folder by name, `plot` the DVC plot."""

    files: dict[str, bytes]
    plot: bytes


def render(values: Values, p: CompareParams, reference: dict[str, Any]) -> Report:
    """The whole report from the cells' values (comparison.collect) and the evaluate
    stage's metrics (`reference`: teacher and initial student). The main metric is exact
    match where the cells have it, ROUGE-L against the teacher otherwise."""
    table = summarise(values)
    cols = [c for c, _, _ in METRICS if any(c in v for v in table.values())]
    main = "exact_match" if "exact_match" in cols else "rouge_l_vs_teacher"
    ranked = ranked_runs(table, main)
    md = table_md(table, ranked, cols, p)
    files = {
        "table.csv": table_csv(table, cols, p).encode(),
        "table.md": ("\n".join(md) + "\n").encode(),
        f"{main}.png": figure_png(table, ranked, main, reference, len(p.seeds)),
        "README.md": readme(values, table, ranked, md, main, p, reference).encode(),
    }
    return Report(files, plot_csv(table, ranked, main).encode())
