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
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.base import params
from distillflow.base.io import DataError, atomic_dir, atomic_path
from distillflow.base.params import check
from distillflow.stagekit import entry
from distillflow.training.cells import RunParams

log = logging.getLogger("report")


@dataclass(frozen=True)
class CompareParams:
    """params.yaml `compare`."""

    seeds: tuple[int, ...]  # train.seed of each repetition
    runs: dict[str, RunParams]  # name -> method and DistiLLM-2 switches disabled
    threads: int  # torch threads per cell (stages/compare.py)

    def __post_init__(self) -> None:
        check(self.threads >= 1, "threads", "must be >= 1")
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
    ("step_share", ("student", "accuracy", "step_share"), True),
    ("rouge_l_vs_teacher", ("student", "rouge_l_vs_teacher"), True),
    ("kl_teacher_student", ("student", "kl_teacher_student"), False),
    ("nll_on_teacher_responses", ("student", "nll_on_teacher_responses"), False),
    ("nll_on_own_responses", ("student", "nll_on_own_responses"), False),
    ("greedy_agreement", ("student", "greedy_agreement"), True),
    ("teacher_call_speedup", ("student", "speculative", "teacher_call_speedup"), True),
    ("mean_response_tokens", ("student", "response_tokens", "mean"), False),
    ("final_train_loss", ("train", "final_loss"), False),
]
OPTIONAL = {"step_share": ("accuracy", "step_share"), "teacher_call_speedup": ("speculative",)}
# Per-cell breakdowns: metric prefix -> where the cell keeps that dict under student.accuracy
BREAKDOWNS = {"exact_match/": "per_category", "step_share/": "step_share_per_category", "by_length/": "per_length"}
# The controls (cells.RunParams) and what each changes
CONTROLS = {
    "rounds": ("stale", "one stale round of student samples"),
    "teacher": ("plain", "a teacher trained without corrupted prefixes"),
}

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


# run -> metric -> seed -> value (a metric a cell recorded as null is absent for that seed)
Values = dict[str, dict[str, dict[int, float]]]


def collect(cells_dir: Path, p: CompareParams) -> Values:
    """Every cell's metrics by run, metric and seed; every listed cell must exist. Per
    skill exact match comes as `exact_match/<skill>`."""
    has_accuracy: bool | None = None
    out: Values = {}
    nulls: list[str] = []
    for run in p.runs:
        values: dict[str, dict[int, float]] = {}
        for seed in p.seeds:
            f = cells_dir / f"{run}-{seed}.json"
            if not f.is_file():
                raise DataError(
                    f"{f}: missing; compare.runs lists {run!r} and compare.seeds {seed}, "
                    "so `dvc repro comparison/dvc.yaml` should have made it"
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
                if c in OPTIONAL and not _has(cell["student"], OPTIONAL[c]):
                    continue
                v = dig(cell, path, str(f))
                if v is None:
                    nulls.append(f"{run}-{seed}: {c}")
                else:
                    values.setdefault(c, {})[seed] = v
            if acc:
                for prefix, key in BREAKDOWNS.items():
                    for name, v in sorted(cell["student"]["accuracy"].get(key, {}).items()):
                        values.setdefault(prefix + name, {})[seed] = float(v)
            if "seconds" in cell:
                values.setdefault("seconds", {})[seed] = float(sum(cell["seconds"].values()))
        out[run] = values
    if nulls:
        log.warning("report: no value (null) in %d cells, left out of their means: %s", len(nulls), ", ".join(nulls))
    return out


def _has(node: dict[str, Any], path: tuple[str, ...]) -> bool:
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def summarise(values: Values) -> dict[str, dict[str, tuple[float, float]]]:
    """run -> metric -> (mean, sample std over seeds)."""
    return {run: {c: mean_std(list(v.values())) for c, v in m.items() if v} for run, m in values.items()}


def aggregate(cells_dir: Path, p: CompareParams) -> dict[str, dict[str, tuple[float, float]]]:
    """run -> metric -> (mean, sample std over seeds); every listed cell must exist."""
    return summarise(collect(cells_dir, p))


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (e.g. q = 0.975 for a two-sided 95% interval): bisection on
    the CDF, which is integrated from the density (Simpson's rule, 2,000 panels on
    [0, t]). Exact to about 1e-6 for df >= 1; no scipy needed."""
    if df < 1 or not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: need df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(t: float, n: int = 2000) -> float:
        h = t / n
        odd = sum(pdf((2 * i - 1) * h) for i in range(1, n // 2 + 1))
        even = sum(pdf(2 * i * h) for i in range(1, n // 2))
        return 0.5 + h / 3 * (pdf(0.0) + 4 * odd + 2 * even + pdf(t))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """b - a over the seeds both have (same seed: same data order and initial student)."""

    mean: float
    low: float  # the 95% confidence interval of the mean difference (t, n - 1 df)
    high: float
    n: int

    @property
    def measured(self) -> bool:
        """An ordering is claimed only when the interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired(a: dict[int, float] | float, b: dict[int, float] | float) -> Paired:
    """Paired differences b - a by seed, with a 95% t interval; a float is a model that
    does not depend on the seed (the initial student). Needs two seeds or more."""
    keys = [set(x) for x in (a, b) if isinstance(x, dict)]
    seeds = sorted(set.intersection(*keys)) if keys else []
    at = lambda x, s: x[s] if isinstance(x, dict) else x  # noqa: E731
    d = [at(b, s) - at(a, s) for s in seeds]
    if len(d) < 2:
        raise ValueError(f"paired: {len(d)} common seeds; an interval needs at least 2")
    m, sd = mean_std(d)
    half = t_quantile(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return Paired(m, m - half, m + half, len(d))


def ordering(a: str, b: str, diff: Paired) -> str:
    """What a paired difference b - a lets us say."""
    if not diff.measured:
        return "no difference measured"
    return f"{b} > {a}" if diff.mean > 0 else f"{b} < {a}"


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
        at = {run: values[run][metric] for run, _ in order if run in values and metric in values[run]}
        if fixed.get(metric) is not None:
            at[INITIAL] = fixed[metric]  # type: ignore[assignment]
        present = [(run, fig) for run, fig in order if run in at]
        if len(present) < 2:
            continue
        lines += [f"**{title}**, ours by {metric}:", ""]
        lines += ["| run | paper | ours (mean ± std over seeds) |", "|---|---|---|"]
        for run, fig in present:
            v = at[run]
            ours = (
                f"{v:.4f} (one model)"
                if isinstance(v, float)
                else "{:.4f} ± {:.4f}".format(*mean_std(list(v.values())))
            )
            lines.append(f"| {run} | {fig} | {ours} |")
        lines.append("")
        same = other = none = 0
        for (a, _), (b, _) in zip(present, present[1:]):
            diff = paired(at[a], at[b])
            said = ordering(a, b, diff)
            same += said == f"{b} > {a}"
            other += said == f"{b} < {a}"
            none += not diff.measured
            tag = "agrees" if said == f"{b} > {a}" else "disagrees" if diff.measured else "no claim"
            lines.append(
                f"- paper: {b} > {a}; ours: {b} - {a} = {diff.mean:+.4f}, 95% CI [{diff.low:+.4f}, {diff.high:+.4f}] "
                f"over {diff.n} paired seeds: {said} ({tag})"
            )
        lines += [
            "",
            f"Of {len(present) - 1} adjacent orderings: {same} measured in the paper's direction, {other} measured "
            f"the other way, {none} with no difference measured (the 95% interval holds 0).",
            "",
        ]
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
            lines.append(f"| {run} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {ordering(base, run, d)} |")
        lines.append("")
    return lines


def control_of(run: RunParams) -> str | None:
    """What a control run changes ('rounds' or 'teacher'), None for a default run."""
    changed = [k for k, (value, _) in CONTROLS.items() if getattr(run, k) == value]
    return "+".join(changed) if changed else None


def counterpart(p: CompareParams, name: str) -> str | None:
    """The default run a control run differs from only by its control."""
    run = p.runs[name]
    for other, o in p.runs.items():
        if control_of(o) is None and (o.method, o.disable) == (run.method, run.disable):
            return other
    return None


def controls_table(values: Values, p: CompareParams, metric: str, explain: bool = True) -> list[str]:
    """Each control against its default run (control - default, paired by seed), and
    where both KD and DistiLLM-2 have a control of one kind, the DistiLLM-2 - KD gain
    under the control against the gain without it (a difference of paired differences).
    `explain`: say what a stale-round control checks (once per report, not per metric)."""
    lines: list[str] = []
    rows = [(name, counterpart(p, name)) for name, r in p.runs.items() if control_of(r) is not None]
    rows = [(c, d) for c, d in rows if d is not None and metric in values.get(c, {}) and metric in values.get(d, {})]
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
        lines.append(
            f"| {c} | {what} | {d} | {diff.mean:+.4f} | [{diff.low:+.4f}, {diff.high:+.4f}] | {ordering(d, c, diff)} |"
        )
    lines.append("")
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
                    f"change {diff.mean:+.4f}, 95% CI [{diff.low:+.4f}, {diff.high:+.4f}] over {diff.n} seeds: "
                    + (
                        "the gain shrinks"
                        if diff.measured and diff.mean < 0
                        else "the gain grows"
                        if diff.measured
                        else "no difference measured"
                    )
                )
    return [*lines, ""]


def breakdown(table: dict[str, dict[str, tuple[float, float]]], ranked: list[str], prefix: str) -> list[str]:
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


def cost_lines(table: dict[str, dict[str, tuple[float, float]]], ranked: list[str]) -> list[str]:
    """Seconds per cell (sampling, training and evaluation), per run."""
    have = [r for r in ranked if "seconds" in table[r]]
    if not have:
        return []
    total = sum(table[r]["seconds"][0] for r in have)
    lines = ["| run | seconds per cell (mean ± std) |", "|---|---|"]
    lines += [f"| {r} | {table[r]['seconds'][0]:.1f} ± {table[r]['seconds'][1]:.1f} |" for r in have]
    return [*lines, "", f"Mean cell: {total / len(have):.1f} s over {len(have)} runs.", ""]


def write(out: Path, plot: Path, values: Values, p: CompareParams, reference: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(values)
    cols = [c for c, _, _ in METRICS if any(c in v for v in table.values())]
    main = "exact_match" if "exact_match" in cols else "rouge_l_vs_teacher"
    with atomic_dir(out) as tmp:
        with (tmp / "table.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["run", "method", "disable", "control", "seeds", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))]
            )
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
        ranked = sorted(table, key=lambda r: -table[r][main][0])
        md = [f"| run | method | disabled | control | {' | '.join(cols)} |", "|---|---|---|---|" + "---|" * len(cols)]
        for run in ranked:
            v = table[run]
            md.append(
                f"| {run} | {p.runs[run].method} | {', '.join(p.runs[run].disable) or '-'} | "
                f"{control_of(p.runs[run]) or '-'} | "
                + " | ".join(f"{v[c][0]:.4f} ± {v[c][1]:.4f}" if c in v else "-" for c in cols)
                + " |"
            )
        (tmp / "table.md").write_text("\n".join(md) + "\n")
        per_skill = breakdown(table, ranked, "exact_match/")
        step_skill = breakdown(table, ranked, "step_share/")
        per_length = breakdown(table, ranked, "by_length/")
        cost = cost_lines(table, ranked)
        # The main metric, then the share of right steps and the KL to the teacher where cells have them
        present = {c for v in values.values() for c in v}
        paired_metrics = [main, *(m for m in ("step_share", "kl_teacher_student") if m != main and m in present)]
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
            "## Table",
            "",
            *md,
            "",
            *(["## Exact match per skill", "", *per_skill] if per_skill else []),
            *(["## Share of right steps per skill", "", *step_skill] if step_skill else []),
            *(["## Exact match by reference length (characters)", "", *per_length] if per_length else []),
            *(
                ["## Controls", ""]
                + [line for m in paired_metrics for line in controls_table(values, p, m, explain=m == main)]
                if len(p.seeds) > 1
                else []
            ),
            *(["## Cost", "", *cost] if cost else []),
            "## Paired differences",
            "",
            *(
                [line for m in paired_metrics for line in pairs_table(values, m)]
                if len(p.seeds) > 1
                else ["(one seed: no interval; list two seeds or more)", ""]
            ),
            "## Against the paper",
            "",
            *(verdict(values, main, reference) if len(p.seeds) > 1 else ["(one seed: no interval, no claim)"]),
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
    values = collect(args.cells, p)
    write(args.out, args.plot, values, p, json.loads(args.reference.read_text()))
    for run, v in summarise(values).items():
        if "seconds" in v:
            log.info("report: %s: %.1f s per cell (mean over %d seeds)", run, v["seconds"][0], len(p.seeds))
    log.info("report: %d runs x %d seeds -> %s", len(p.runs), len(p.seeds), args.out)


if __name__ == "__main__":
    entry.run_stage(main)
