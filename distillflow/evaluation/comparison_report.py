"""The method comparison report's files, from the cells (distillflow/evaluation/comparison.py)
through the plan's analysis (distillflow/evaluation/analysis.py, docs/comparison-plan.md),
rendered into bytes; the report stage (stages/report.py) writes them.

Under the report folder: README.md (the replicate; the primary result; the secondary
family under Holm; every run's mean of each derived metric with its 95% interval, the
reference teacher and initial student for scale; every run's difference from
DistiLLM-2 and from KD on the other metrics, as description; exact match per skill;
the cost and how far each student moved; DPKD's collapse by NLL on its sampled
responses; our verdict words beside the paper's orderings), table.md and table.csv
(the run means with their intervals), <metric>.png (the tested metric's run means with
their intervals). Beside it, the DVC plot: the tested metric's run means as a CSV.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distillflow.base.errors import ParamsError
from distillflow.evaluation import analysis
from distillflow.evaluation.analysis import Estimate, Tested
from distillflow.evaluation.comparison import (
    COST,
    INITIAL,
    TEACHER,
    Cells,
    CompareParams,
    control_of,
    counterpart,
)

log = logging.getLogger("report")
PLAN = "docs/comparison-plan.md"
# The paper's orderings (docs/METHOD.md), worst to best, with its figures. Its "SFT" rows
# are the SFT student every method starts from: our initial student (INITIAL).
PAPER = {
    "methods (instruction following, avg win rate; Qwen2-7B -> 1.5B)": (
        [(INITIAL, 30.33), ("kd", 41.19), ("gkd", 56.14), ("distillm", 56.35), ("distillm2", 58.69)]
    ),
    "ablation (Evol-Instruct win rate)": (
        [("distillm", 41.55), ("contrastive", 43.61), ("contrastive_beta", 44.80), ("contrastive_alpha", 45.22)]
        + [("distillm2", 46.50)]
    ),
}


@dataclass(frozen=True)
class Results:
    """The analysis of every cell: the tests, every run's means, per skill exact match."""

    p: CompareParams
    cells: Cells
    an: analysis.Analysis
    primary: Tested
    family: list[Tested]
    metrics: list[str]  # the derived metrics defined for at least one run
    means: dict[str, dict[str, Estimate]]  # run (and the reference models) -> metric -> {run: 1}
    skills: dict[str, analysis.Analysis]  # exact match's skills with a reference answer
    left_out: list[str]  # what was left out, and why


def _defined(an: analysis.Analysis, metric: str, runs: list[str], left_out: list[str]) -> list[str]:
    """The runs with `metric` defined in all their cells; the others named in `left_out`
    (in one line where it is defined for none)."""
    bad = {run: an.undefined(metric, [run]) for run in runs}
    if all(bad.values()):
        left_out.append(f"{metric} over {an.label}: no denominator in any cell (e.g. no step skill)")
        return []
    for run, cells in bad.items():
        if cells:
            left_out.append(f"{metric} over {an.label} for {run}: no denominator in {', '.join(cells)}")
    return [run for run, cells in bad.items() if not cells]


def analyse(cells: Cells, p: CompareParams) -> Results:
    """The plan's analysis of the cells: the primary test, the Holm family, every run's
    means (and the reference models' exact match), and the per-skill analyses."""
    a = p.analysis
    rep = cells.replicate
    an = analysis.Analysis(rep, a.resamples, a.resample_seed)
    (prim_text, prim), fam = p.contrasts()
    tested = {r for _, c in [(prim_text, prim), *fam] for r in c}
    bad = an.undefined(a.metric, sorted(tested))
    if bad:
        raise ParamsError(
            f"compare.analysis.metric: {a.metric} is undefined (no denominator, e.g. no reference answers) in "
            f"cells {bad}; the tests need it in every cell of their runs"
        )
    left_out: list[str] = []
    means: dict[str, dict[str, Estimate]] = {}
    metrics = []
    for m in analysis.METRICS:
        runs = list(p.runs) + ([TEACHER, INITIAL] if m == "exact_match" else [])
        ok = _defined(an, m, runs, left_out)
        if any(r in p.runs for r in ok):
            metrics.append(m)
        for run in ok:
            means.setdefault(run, {})[m] = an.estimate({run: 1.0}, m, a.alpha)
    skills = {}
    for skill in rep.skills() if "exact_match" in metrics else []:
        sub = analysis.Analysis(rep, a.resamples, a.resample_seed, prompts=rep.skill(skill), label=f"skill {skill}")
        if len(_defined(sub, "exact_match", list(p.runs), left_out)) == len(p.runs):
            skills[skill] = sub
    for line in left_out:
        log.warning("report: left out: %s", line)
    return Results(
        p=p,
        cells=cells,
        an=an,
        primary=analysis.primary(an, prim_text, prim, a.metric, a.alpha, a.margin),
        family=analysis.family(an, fam, a.metric, a.alpha, a.margin),
        metrics=metrics,
        means=means,
        skills=skills,
        left_out=left_out,
    )


def _num(x: float) -> str:
    return f"{x:+.4f}"


def _ci(low: float, high: float) -> str:
    return f"[{low:+.4f}, {high:+.4f}]"


def _p(x: float | None) -> str:
    """A p-value; "-" where there is none (a TOST without a margin)."""
    return "-" if x is None else f"{x:.4g}"


def _mean_ci(e: Estimate) -> str:
    low, high = e.interval()
    return f"{e.estimate:.4f} [{low:.4f}, {high:.4f}]"


def _diff_ci(e: Estimate) -> str:
    return f"{_num(e.estimate)} {_ci(*e.interval())}"


def _conf(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def intro(r: Results) -> list[str]:
    """The title, the plan, the replicate and how every interval is made."""
    p, a = r.p, r.p.analysis
    b, s, n = len(p.bootstraps), len(p.seeds), len(r.cells.prompt_ids)
    unit = analysis.METRICS[a.metric][1]
    return [
        "# Method comparison",
        "",
        f"Analysed as [{PLAN}](../../{PLAN}) fixed before the run: its primary test, its secondary family",
        "under Holm, its equivalence margin and what may be said. Produced by the comparison pipeline,",
        "comparison/dvc.yaml (`distillflow run --target comparison/dvc.yaml --jobs 2`).",
        "",
        f"**The replicate.** B = {b} bootstraps (compare.bootstraps = {list(p.bootstraps)}) x S = {s} training "
        f"seeds (compare.seeds = {list(p.seeds)}) x {len(p.runs)} runs, every cell scored on the same P = {n} "
        f"eval prompts. The unit of replication is the bootstrap (its teacher, plain teacher, initial student "
        f"and teacher responses); seeds are nested in it. Every cell of bootstrap b is scored against bootstrap "
        f"b's default teacher (the reference teacher), the plain-teacher cells included.",
        "",
        f"**Every interval** is D ± t(1 − α/2, B − 1)·sqrt(s_b²/B + v_p) on B − 1 = {b - 1} degrees of freedom: "
        "d_b is the mean over seeds of the contrast in bootstrap b, D their mean, s_b² their sample variance, "
        f"v_p the variance of D over {a.resamples} paired resamples of the eval prompts (seed {a.resample_seed}, "
        "the same draws for every cell). A metric is a ratio of sums over the prompts "
        f"(distillflow/evaluation/analysis.py). {a.metric} is in {unit or 'its units'}; α = {a.alpha:g}, "
        f"TOST margin δ = {a.margin:g}.",
        "",
        f"**What may be said** ({PLAN}): an ordering only where the primary test rejects, or a family "
        f'member passes Holm; "equivalent within ±{a.margin:g}" only where TOST rejects both |D| ≥ δ; '
        'otherwise "not measured to differ". Everything else here is description: it supports no ordering.',
        "",
        *(["Left out (no value can be computed):", "", *(f"- {x}" for x in r.left_out), ""] if r.left_out else []),
    ]


def primary_lines(r: Results) -> list[str]:
    """The one primary test: D, its interval, p, TOST and the verdict."""
    t, a = r.primary, r.p.analysis
    e = t.estimate
    return [
        "## Primary result",
        "",
        f"{t.label} on {e.metric} ({e.prompts}), two-sided, uncorrected, α = {a.alpha:g}:",
        "",
        f"- D = {_num(e.estimate)}, {_conf(a.alpha)} interval {_ci(*t.interval)}, p = {_p(e.p)} "
        f"(t, {e.df} df): **{t.words}**",
        f"- per bootstrap d_b: {', '.join(_num(x) for x in e.per_bootstrap)}; s_b² = {e.var_between:.6g}, "
        f"v_p = {e.var_prompts:.6g}, se = {e.se:.6g}",
        f"- TOST (δ = {a.margin:g}): p = {_p(e.p_tost)}, "
        + ("equivalent" if e.equivalent else "equivalence not shown"),
        "",
    ]


def family_lines(r: Results) -> list[str]:
    """The secondary family: estimate, raw p, Holm-adjusted p and interval, TOST, verdict."""
    a = r.p.analysis
    if not r.family:
        return ["## Secondary family (Holm)", "", "(compare.analysis.family is empty)", ""]
    lines = [
        "## Secondary family (Holm)",
        "",
        f"On {a.metric}, two-sided; Holm's step-down over the {len(r.family)} p-values at α = {a.alpha:g}. "
        "The interval is Holm-adjusted: at the level of the comparison's step, or of the step where the",
        "procedure stopped for those after it (so it excludes 0 exactly where Holm rejects). TOST at",
        f"α = {a.alpha:g}, δ = {a.margin:g}.",
        "",
        "| # | comparison | estimate | raw p | Holm p | Holm-adjusted interval (level) | TOST p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(r.family, start=1):
        e = t.estimate
        lines.append(
            f"| F{i} | {t.label} | {_num(e.estimate)} | {_p(e.p)} | {_p(t.p_claim)} | "
            f"{_ci(*t.interval)} ({_conf(t.level)}) | {_p(e.p_tost)} | {t.words} |"
        )
    return [*lines, ""]


def _settings(r: Results, run: str) -> list[str]:
    if run not in r.p.runs:
        return [run, "-", "-", "-"]
    rp = r.p.runs[run]
    return [run, rp.label, ", ".join(rp.disable) or "-", control_of(rp) or "-"]


def means_md(r: Results) -> list[str]:
    """Every run's (and the reference models') mean of each metric, 95% interval."""
    rows = [*ranked(r), *(x for x in (TEACHER, INITIAL) if x in r.means)]
    head = ["run", "method", "disabled", "control", *r.metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in rows:
        cells = [_mean_ci(r.means[run][m]) if m in r.means.get(run, {}) else "-" for m in r.metrics]
        lines.append("| " + " | ".join([*_settings(r, run), *cells]) + " |")
    return lines


def ranked(r: Results, defined: bool = False) -> list[str]:
    """The runs, best mean on the tested metric first (ties in params order), then those
    without it (`defined`: only the runs with it)."""
    m = r.p.analysis.metric
    have = sorted((x for x in r.p.runs if m in r.means.get(x, {})), key=lambda run: -r.means[run][m].estimate)
    return have + ([] if defined else [x for x in r.p.runs if x not in have])


def differences(r: Results) -> list[str]:
    """Every run's difference from DistiLLM-2 and from KD on the metrics other than the
    tested one, with the same intervals: description, uncorrected."""
    lines: list[str] = []
    others = [m for m in r.metrics if m != r.p.analysis.metric]
    for base in ("distillm2", "kd"):
        if base not in r.p.runs or not others:
            continue
        lines += [f"Run − {base}, {_conf(r.p.analysis.alpha)} interval (description, uncorrected):", ""]
        lines += ["| run | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for run in r.p.runs:
            if run == base:
                continue
            cells = [
                _diff_ci(r.an.estimate({run: 1.0, base: -1.0}, m, r.p.analysis.alpha))
                if m in r.means.get(run, {}) and m in r.means.get(base, {})
                else "-"
                for m in others
            ]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def skill_lines(r: Results) -> list[str]:
    """Exact match per skill: every run's mean and the tested contrasts, uncorrected."""
    if not r.skills:
        return []
    a, names = r.p.analysis, list(r.skills)
    runs = [*ranked(r), *(x for x in (TEACHER, INITIAL) if "exact_match" in r.means.get(x, {}))]
    lines = [
        "## Exact match per skill (description, uncorrected)",
        "",
        "Each skill analysed as the plan's analysis with its prompts as the eval set (resampled among",
        "themselves). Never a claim.",
        "",
        "| run | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for run in runs:
        lines.append(
            f"| {run} | "
            + " | ".join(_mean_ci(r.skills[k].estimate({run: 1.0}, "exact_match", a.alpha)) for k in names)
        )
        lines[-1] += " |"
    lines += ["", "| comparison | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in [r.primary, *r.family]:
        cells = [_diff_ci(r.skills[k].estimate(t.estimate.contrast, "exact_match", a.alpha)) for k in names]
        lines.append(f"| {t.label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _cell_mean(r: Results, run: str, get: Callable[[dict[str, Any]], Any]) -> tuple[float, float]:
    """Mean and sample std over a run's cells of get(cell's metrics)."""
    xs = [float(get(m)) for (name, _, _), m in r.cells.metrics.items() if name == run]
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def cost_lines(r: Results) -> list[str]:
    """Per run: mean optimizer steps, sequences, tokens and seconds per cell; and how far
    the student moved from the initial student, fresh rounds against stale."""
    lines = [
        "## Cost",
        "",
        f"Mean per cell over its {len(r.p.bootstraps) * len(r.p.seeds)} cells: optimizer steps, and the sequences "
        "and tokens the student ran forward on (prompt + response, every response its method reads: GKD reads "
        "both and puts the loss on one per pair), all rounds; KL(initial ‖ final) is how far the "
        "student moved from the initial student (token-mean, on the reference teacher's eval responses; mean ± std "
        "over cells).",
        "",
        "| run | rounds | optimizer steps | sequences | tokens | seconds | KL(initial ‖ final) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in r.p.runs:
        cost = [_cell_mean(r, run, lambda m, k=k: m["cost"][k])[0] for k in COST]
        kl = _cell_mean(r, run, lambda m: m["student"]["kl_initial_final"])
        lines.append(
            f"| {run} | {r.p.runs[run].rounds} | {cost[0]:.0f} | {cost[1]:.0f} | {cost[2]:.0f} | {cost[3]:.1f} | "
            f"{kl[0]:.4f} ± {kl[1]:.4f} |"
        )
    lines.append("")
    for run, rp in r.p.runs.items():
        base = counterpart(r.p, run) if rp.rounds == "stale" else None
        if base is not None:
            s, f = (_cell_mean(r, x, lambda m: m["student"]["kl_initial_final"]) for x in (run, base))
            lines.append(
                f"- {run} (stale rounds) moved {s[0]:.4f} ± {s[1]:.4f} from the initial student, {base} (fresh) "
                f"{f[0]:.4f} ± {f[1]:.4f} (description)."
            )
    return [*lines, ""]


def collapse_lines(r: Results) -> list[str]:
    """DPKD's collapse, by the one measurement its paper uses: NLL on the student's own
    responses sampled at the training temperature."""
    m = "nll_on_sampled_responses"
    dpkd = [run for run, rp in r.p.runs.items() if rp.method == "dpkd" and control_of(rp) is None]
    if not dpkd or m not in r.means.get(dpkd[0], {}):
        return []
    run, alpha = dpkd[0], r.p.analysis.alpha
    others = [x for x in ("kd", "distillm2") if m in r.means.get(x, {})]
    text = f"{run}: NLL on its own responses sampled at the training temperature {_mean_ci(r.means[run][m])} nats/token"
    text += "".join(f"; {x}: {_mean_ci(r.means[x][m])}" for x in others)
    text += "".join(f"; {run} − {x} = {_diff_ci(r.an.estimate({run: 1.0, x: -1.0}, m, alpha))}" for x in others)
    return ["## DPKD's collapse (description, uncorrected)", "", text + ".", ""]


def _our_test(r: Results, a: str, b: str) -> Tested | None:
    for t in [r.primary, *r.family]:
        if t.estimate.contrast in ({a: 1.0, b: -1.0}, {b: 1.0, a: -1.0}):
            return t
    return None


def paper_lines(r: Results) -> list[str]:
    """Our verdict words beside the paper's orderings: for each run the paper ranks below
    DistiLLM-2, the plan's test of the two (where the plan has one)."""
    lines = [
        "## Against the paper",
        "",
        "The paper's orderings (docs/METHOD.md; its SFT rows are our initial student) beside our verdict",
        f"words on {r.p.analysis.metric}, from the plan's tests only; a pair the plan does not test gets no claim.",
        "",
    ]
    for title, order in PAPER.items():
        present = [(run, fig) for run, fig in order if r.p.analysis.metric in r.means.get(run, {})]
        if len(present) < 2 or "distillm2" not in dict(present):
            continue
        lines += [f"**{title}**:", "", "| run | paper | ours (mean, 95% interval) |", "|---|---|---|"]
        lines += [f"| {run} | {fig} | {_mean_ci(r.means[run][r.p.analysis.metric])} |" for run, fig in present]
        lines.append("")
        for run, _ in present:
            if run == "distillm2":
                continue
            t = _our_test(r, "distillm2", run)
            said = f"{t.words} ({'primary' if t is r.primary else 'family, Holm'})" if t else "not tested: no claim"
            lines.append(f"- paper: distillm2 > {run}; ours: {said}")
        lines.append("")
    return lines


def readme(r: Results) -> str:
    """README.md: every section, in order."""
    diffs = differences(r)
    lines = [
        *intro(r),
        *primary_lines(r),
        *family_lines(r),
        "## Every run (description)",
        "",
        f"Each run's mean of every metric, {_conf(r.p.analysis.alpha)} interval from the same analysis (the contrast "
        "{run: 1}); the reference teacher and initial student (each bootstrap's, on the same prompts) for scale.",
        "",
        *means_md(r),
        "",
        *(["## Differences (description)", "", *diffs] if diffs else []),
        *skill_lines(r),
        *cost_lines(r),
        *collapse_lines(r),
        *paper_lines(r),
    ]
    return "\n".join(lines)


def table_csv(r: Results) -> str:
    """table.csv: per run (params order) its settings, each metric's mean and interval, its mean cost."""
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = [f"{m}_{x}" for m in r.metrics for x in ("mean", "low", "high")]
    w.writerow(["run", "method", "disable", "control", "bootstraps", "seeds", *cols, *COST, "kl_initial_final"])
    for run, rp in r.p.runs.items():
        vals = []
        for m in r.metrics:
            e = r.means[run].get(m)
            vals += [f"{x:.6f}" for x in (e.estimate, *e.interval())] if e else ["", "", ""]
        cost = [f"{_cell_mean(r, run, lambda c, k=k: c['cost'][k])[0]:.6f}" for k in COST]
        kl = f"{_cell_mean(r, run, lambda c: c['student']['kl_initial_final'])[0]:.6f}"
        row = [run, rp.label, "+".join(rp.disable), control_of(rp) or "", len(r.p.bootstraps), len(r.p.seeds)]
        w.writerow([*row, *vals, *cost, kl])
    return buf.getvalue()


def figure_png(r: Results) -> bytes:
    """The tested metric's mean per run with its interval, the reference models as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = r.p.analysis.metric
    runs = ranked(r, defined=True)
    means = [r.means[x][m].estimate for x in runs]
    half = [r.means[x][m].interval()[1] - r.means[x][m].estimate for x in runs]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(runs, means, yerr=half, capsize=4, color="#4c72b0")
    for name, style in ((TEACHER, "--"), (INITIAL, ":")):
        if m in r.means.get(name, {}):
            ax.axhline(r.means[name][m].estimate, linestyle=style, color="gray", label=name)
    ax.set_ylabel(f"{m} (mean, {_conf(r.p.analysis.alpha)} interval)")
    ax.tick_params(axis="x", rotation=30)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_csv(r: Results) -> str:
    """The DVC plot: the tested metric's run means and intervals, best first."""
    m = r.p.analysis.metric
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", f"{m}_mean", f"{m}_low", f"{m}_high"])
    for run in ranked(r, defined=True):
        e = r.means[run][m]
        w.writerow([run, *(f"{x:.6f}" for x in (e.estimate, *e.interval()))])
    return buf.getvalue()


@dataclass(frozen=True)
class Report:
    """The report's files: `files` under the report folder by name, `plot` the DVC plot."""

    files: dict[str, bytes]
    plot: bytes


def render(cells: Cells, p: CompareParams) -> Report:
    """The whole report from the cells (comparison.read_cells) and params."""
    r = analyse(cells, p)
    md = means_md(r)
    files = {
        "table.csv": table_csv(r).encode(),
        "table.md": ("\n".join(md) + "\n").encode(),
        f"{p.analysis.metric}.png": figure_png(r),
        "README.md": readme(r).encode(),
    }
    return Report(files, plot_csv(r).encode())
