"""The method comparison's analysis, as docs/comparison-plan.md fixes it (numpy and scipy only).

The data are the cells' per-prompt numbers (comparison.read_cells builds them): for
every run, bootstrap b, seed s and eval prompt i, a numerator and a denominator per
derived metric (`METRICS`), so a metric over a set of prompts is a ratio of sums and
resampling the prompts is a matrix product.

For a contrast c (a signed sum of runs, `parse_contrast`) and a metric:

- d_b = mean over seeds of sum_run c_run * metric(run, b, s), the metric over the
  prompts analysed (all eval prompts, or one skill's); D = mean over bootstraps of d_b;
- s_b² = the sample variance of the d_b (between bootstraps: bootstrap and seed variation);
- v_p = the variance of D over R paired resamples of the prompts (their groups drawn
  with replacement by a numpy Generator seeded with the resample seed, each prompt
  counted as often as its group is drawn: the phrasings of one toy-task instance are
  one draw, not two or three independent ones; the same draws for every cell, run,
  bootstrap and seed; the cells held fixed): the eval-sample variance;
- se = sqrt(s_b²/B + v_p); the interval D ± t(1 − α/2, B − 1)·se; the two-sided p from
  D/se on B − 1 degrees of freedom; TOST with margin δ: p_tost = max of the one-sided p's
  of D ≤ −δ and D ≥ +δ (t, B − 1 df), equivalent iff p_tost < α (the 1 − 2α interval
  inside (−δ, +δ)).

Where se is 0 (every d_b equal and no prompt variance: only constructed data), the t
statistic is ±infinity or, for D = 0, undefined: p is then 0 for D ≠ 0 and 1 for D = 0,
the limits of the test. A test rejects when its p is below α (strictly).

The family is corrected by Holm's step-down procedure (`holm`); a skill's analysis
(`Analysis(..., prompts=...)`) treats that skill's prompts as the eval set: they are
resampled among themselves (same seed), and its intervals are uncorrected description.
`verdict` words each result as the plan's "What may be said" allows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from distillflow.base.errors import ParamsError

# Derived metric -> (what it is, its unit). Each is a ratio of sums over prompts; per
# prompt its numerator and denominator come from the prompts file's columns (`ratio_terms`).
METRICS: dict[str, tuple[str, str]] = {
    "exact_match": ("the verifier's pass rate: 100 * sum(correct) / prompts with a reference", "points"),
    "step_share": ("share of right steps: 100 * sum(steps_right) / sum(steps)", "points"),
    "rouge_l": ("ROUGE-L of the student's greedy response against the reference teacher's, mean", ""),
    "kl_teacher_student": ("token-mean KL(teacher || student) on the reference teacher's responses", "nats"),
    "greedy_agreement": ("token share where the student's greedy token is the teacher's", ""),
    "nll_on_teacher_responses": ("student's token-mean NLL on the reference teacher's responses", "nats"),
    "nll_on_own_responses": ("student's token-mean NLL on its own greedy responses", "nats"),
    "nll_on_sampled_responses": (
        "student's token-mean NLL on its own responses sampled at the training temperature",
        "nats",
    ),
}
# metric -> (numerator column, denominator column); None: 1 per prompt
_TOKEN_RATIOS = {
    "kl_teacher_student": ("kl_sum", "teacher_tokens"),
    "greedy_agreement": ("agree_sum", "teacher_tokens"),
    "nll_on_teacher_responses": ("nll_teacher_sum", "teacher_tokens"),
    "nll_on_own_responses": ("nll_own_sum", "own_tokens"),
    "nll_on_sampled_responses": ("nll_sampled_sum", "sampled_tokens"),
}
CHUNK = 1000  # resamples drawn (and multiplied out) at a time: bounds memory for 10,000 x 2,000 prompts


def ratio_terms(metric: str, cols: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, `metric`'s numerator and denominator from the prompts file's columns
    (float arrays, a null as NaN): a null answer or step count adds nothing to either."""
    if metric == "exact_match":
        c = cols["correct"]
        known = ~np.isnan(c)
        return np.where(known, 100.0 * c, 0.0), known.astype(float)
    if metric == "step_share":
        right, steps = cols["steps_right"], cols["steps"]
        return np.nan_to_num(100.0 * right), np.nan_to_num(steps)
    if metric == "rouge_l":
        return cols["rouge_l"].astype(float), np.ones(len(cols["rouge_l"]))
    if metric not in _TOKEN_RATIOS:
        raise ValueError(f"{metric!r} is not a derived metric; one of {list(METRICS)}")
    num, den = _TOKEN_RATIOS[metric]
    return cols[num].astype(float), cols[den].astype(float)


_TERM = re.compile(r"\s*([+-])?\s*([A-Za-z_][A-Za-z0-9_]*)\s*")


def parse_contrast(text: str, runs: Iterable[str] | None, key: str) -> dict[str, float]:
    """`"a - b"`, `"a_plain - b_plain - a + b"` -> {run: coefficient}; a run named twice
    adds up. Run names are letters, digits and underscores. `runs`: the names allowed
    (None: any); errors name the params `key`."""
    out: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or m.end() == pos or (m.group(1) is None and pos > 0):
            raise ParamsError(
                f"{key}: cannot read {text!r} at character {pos + 1}: write run names joined by + and -, "
                "e.g. 'distillm2 - kd'"
            )
        sign = -1.0 if m.group(1) == "-" else 1.0
        out[m.group(2)] = out.get(m.group(2), 0.0) + sign
        pos = m.end()
    out = {r: c for r, c in out.items() if c != 0.0}
    if not out:
        raise ParamsError(f"{key}: {text!r} names no run (or every run cancels out)")
    if runs is not None:
        known = list(runs)
        unknown = [r for r in out if r not in known]
        if unknown:
            raise ParamsError(f"{key}: {text!r} names {unknown}, not in compare.runs ({known})")
    return out


def contrast_label(contrast: Mapping[str, float]) -> str:
    """The contrast as text: {"a": 1, "b": -1} -> "a - b" (a coefficient other than ±1 as "2*a")."""
    text = ""
    for run, c in contrast.items():
        term = run if abs(c) == 1 else f"{abs(c):g}*{run}"
        text += (f" {'+' if c > 0 else '-'} " if text else ("" if c > 0 else "-")) + term
    return text


@dataclass(frozen=True)
class Replicate:
    """The cells' per-prompt numbers: num[metric] and den[metric] of shape (runs,
    bootstraps, seeds, prompts); a cell where a metric has no denominator at all has it
    undefined."""

    runs: tuple[str, ...]
    bootstraps: tuple[int, ...]
    seeds: tuple[int, ...]
    categories: tuple[str | None, ...]  # per prompt
    num: dict[str, np.ndarray]
    den: dict[str, np.ndarray]
    # per prompt: its group (seed.group_by; the toy task's instance), the unit the prompt
    # resamples draw, so correlated phrasings of one instance are one draw; None: its own
    groups: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        shape = (len(self.runs), len(self.bootstraps), len(self.seeds), len(self.categories))
        if self.groups is not None and len(self.groups) != len(self.categories):
            raise ValueError(f"Replicate: {len(self.groups)} groups for {len(self.categories)} prompts")
        for metric in self.num:
            if self.num[metric].shape != shape or self.den[metric].shape != shape:
                raise ValueError(f"Replicate: {metric}: arrays of shape {self.num[metric].shape}, expected {shape}")

    def skill(self, category: str) -> np.ndarray:
        """The indices of `category`'s prompts."""
        return np.array([i for i, c in enumerate(self.categories) if c == category], dtype=np.int64)

    def group_index(self, prompts: np.ndarray) -> tuple[np.ndarray, int]:
        """(each of `prompts`' group as an index 0..G-1 in order of first appearance, G)."""
        seen: dict[object, int] = {}
        out = np.empty(len(prompts), dtype=np.int64)
        for k, i in enumerate(prompts):
            g = self.groups[i] if self.groups is not None else None
            key = ("prompt", int(i)) if g is None else ("group", g)
            out[k] = seen.setdefault(key, len(seen))
        return out, len(seen)

    def skills(self) -> list[str]:
        """The categories, sorted (prompts without one are in no skill)."""
        return sorted({c for c in self.categories if c is not None})


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """R paired resamples of n prompts or groups (indices into them, with replacement), in chunks of
    CHUNK rows, from one numpy Generator seeded with `seed`: the same draws whoever asks."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        yield rng.integers(0, n, size=(min(CHUNK, resamples - start), n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(rows, n): how often each prompt is drawn in each resample."""
    rows = idx.shape[0]
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (q = 0.975: the two-sided 95% interval's), scipy's."""
    if df < 1 or not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: need df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    return float(stats.t.ppf(q, df))


@dataclass(frozen=True)
class Estimate:
    """One contrast on one metric over one set of prompts."""

    contrast: dict[str, float]
    metric: str
    prompts: str  # which prompts: "all eval prompts" or a skill
    per_bootstrap: tuple[float, ...]  # d_b
    estimate: float  # D
    var_between: float  # s_b²
    var_prompts: float  # v_p
    alpha: float
    margin: float | None  # the TOST margin; None: no equivalence test

    @property
    def df(self) -> int:
        return len(self.per_bootstrap) - 1

    @property
    def se(self) -> float:
        return math.sqrt(self.var_between / len(self.per_bootstrap) + self.var_prompts)

    def interval(self, level: float | None = None) -> tuple[float, float]:
        """The two-sided interval at `level` (α; default the estimate's): D ± t(1 − level/2)·se."""
        half = t_quantile(1 - (self.alpha if level is None else level) / 2, self.df) * self.se
        return self.estimate - half, self.estimate + half

    def _p_above(self, x: float) -> float:
        """P(T >= x/se) on df degrees of freedom; for se = 0 its limit (0.5 at x = 0)."""
        if self.se == 0.0:
            return 0.0 if x > 0 else 1.0 if x < 0 else 0.5
        return float(stats.t.sf(x / self.se, self.df))

    @property
    def p(self) -> float:
        """Two-sided p of D = 0."""
        if self.se == 0.0:
            return 1.0 if self.estimate == 0.0 else 0.0
        return min(1.0, 2.0 * self._p_above(abs(self.estimate)))

    @property
    def p_tost(self) -> float | None:
        """TOST's p: the larger of the one-sided p's of D <= −δ and of D >= +δ."""
        if self.margin is None:
            return None
        return max(self._p_above(self.estimate + self.margin), self._p_above(self.margin - self.estimate))

    @property
    def rejects(self) -> bool:
        """The uncorrected two-sided test rejects D = 0 at α."""
        return self.p < self.alpha

    @property
    def equivalent(self) -> bool:
        """TOST rejects both |D| >= δ at α."""
        return self.p_tost is not None and self.p_tost < self.alpha


class Analysis:
    """The plan's analysis over one set of prompts (all eval prompts by default).

    Each metric's values are computed once, for every cell: the point values (runs, B, S)
    and their R resampled values, so every contrast shares the same resamples."""

    def __init__(
        self,
        rep: Replicate,
        resamples: int,
        seed: int,
        prompts: Sequence[int] | np.ndarray | None = None,
        label: str = "all eval prompts",
    ) -> None:
        if len(rep.bootstraps) < 2:
            raise ParamsError(
                f"compare.bootstraps: {len(rep.bootstraps)} bootstrap(s) {list(rep.bootstraps)}; "
                "the interval between bootstraps needs at least 2"
            )
        if resamples < 2:
            raise ParamsError(f"compare.analysis.resamples: {resamples}; a variance needs at least 2")
        self.rep, self.resamples, self.seed, self.label = rep, resamples, seed, label
        self.prompts = np.arange(len(rep.categories)) if prompts is None else np.asarray(prompts, dtype=np.int64)
        if len(self.prompts) == 0:
            raise ValueError(f"analysis over {label}: no prompts")
        self._values: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def undefined(self, metric: str, runs: Iterable[str]) -> list[str]:
        """The cells of `runs` (run-b<b>-s<s>) where `metric` has no denominator over these prompts."""
        point, _ = self.values(metric)
        out = []
        for run in runs:
            r = self.rep.runs.index(run)
            for bi, b in enumerate(self.rep.bootstraps):
                for si, s in enumerate(self.rep.seeds):
                    if np.isnan(point[r, bi, si]):
                        out.append(f"{run}-b{b}-s{s}")
        return out

    def values(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(point (runs, B, S), resampled (R, runs, B, S)) of `metric`; NaN where undefined."""
        if metric not in self._values:
            self._values[metric] = self._compute(metric)
        return self._values[metric]

    def _compute(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        if metric not in self.rep.num:
            raise ValueError(f"{metric!r} is not in the cells' metrics {list(self.rep.num)}")
        shape = self.rep.num[metric].shape[:3]
        num = self.rep.num[metric][..., self.prompts].reshape(-1, len(self.prompts)).T  # (n, K)
        den = self.rep.den[metric][..., self.prompts].reshape(-1, len(self.prompts)).T
        tot = den.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            point = np.where(tot > 0, num.sum(axis=0) / np.where(tot > 0, tot, 1.0), np.nan)
        res = np.empty((self.resamples, num.shape[1]))
        row = 0
        group, n_groups = self.rep.group_index(self.prompts)
        for idx in resample_indices(n_groups, self.resamples, self.seed):
            c = _counts(idx, n_groups)[:, group]  # a prompt is drawn as often as its group
            rn, rd = c @ num, c @ den
            empty = (rd <= 0) & (tot > 0)
            if empty.any():
                raise ValueError(
                    f"{metric} over {self.label}: a resample of its {len(self.prompts)} prompts draws none with a "
                    f"denominator ({int(empty.any(axis=1).sum())} of the first {row + len(idx)} resamples); "
                    "too few prompts carry this metric to resample them"
                )
            with np.errstate(invalid="ignore", divide="ignore"):
                res[row : row + len(idx)] = np.where(tot > 0, rn / np.where(rd > 0, rd, 1.0), np.nan)
            row += len(idx)
        return point.reshape(shape), res.reshape((self.resamples, *shape))

    def estimate(
        self, contrast: Mapping[str, float], metric: str, alpha: float, margin: float | None = None
    ) -> Estimate:
        """The contrast's D, s_b², v_p (see the module's docstring); every cell of its runs
        must have the metric defined (`undefined`)."""
        missing = [r for r in contrast if r not in self.rep.runs]
        if missing:
            raise ValueError(f"contrast {contrast_label(contrast)}: no cells for {missing}")
        bad = self.undefined(metric, contrast)
        if bad:
            raise ValueError(f"{metric} over {self.label} is undefined (no denominator) in cells {bad}")
        point, res = self.values(metric)
        d = np.zeros(len(self.rep.bootstraps))
        dres = np.zeros(self.resamples)
        for run, c in contrast.items():
            r = self.rep.runs.index(run)
            d += c * point[r].mean(axis=1)
            dres += c * res[:, r].mean(axis=(1, 2))
        return Estimate(
            contrast=dict(contrast),
            metric=metric,
            prompts=self.label,
            per_bootstrap=tuple(float(x) for x in d),
            estimate=float(d.mean()),
            var_between=float(d.var(ddof=1)),
            var_prompts=float(dres.var(ddof=1)),
            alpha=alpha,
            margin=margin,
        )


@dataclass(frozen=True)
class HolmStep:
    """One hypothesis after Holm: its adjusted p, whether it is rejected at α, and the
    level α' its Holm-adjusted interval is at."""

    p_adjusted: float
    rejected: bool
    level: float


def holm(ps: Sequence[float], alpha: float) -> list[HolmStep]:
    """Holm's step-down procedure over `ps`, in their order.

    Sorted ascending, the i-th smallest (i = 1..m) gets the adjusted p max over j <= i of
    min(1, (m − j + 1)·p_(j)) (monotone), and is rejected iff that is below α: the
    step-down stops at the first p_(k) >= α/(m − k + 1). Its interval is at level
    α/(m − min(i, k) + 1), k that first non-rejected rank (m + 1 if all are rejected):
    a rejected hypothesis's interval is at its own step's level and excludes 0; every one
    from the stopping step on stays at the stopping step's level, so its interval holds 0
    (an interval at its own, larger level could exclude 0 where Holm does not reject)."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * ps[i]))
        adjusted[i] = running
    stop = next((rank for rank, i in enumerate(order, start=1) if adjusted[i] >= alpha), m + 1)
    out = [HolmStep(0.0, False, 0.0)] * m
    for rank, i in enumerate(order, start=1):
        out[i] = HolmStep(adjusted[i], adjusted[i] < alpha, alpha / (m - min(rank, stop) + 1))
    return out


@dataclass(frozen=True)
class Tested:
    """A tested contrast: its estimate, the p and interval its claim rests on
    (uncorrected for the primary, Holm-adjusted for the family), and what may be said."""

    label: str
    estimate: Estimate
    p_claim: float  # the primary's p, or the family member's Holm-adjusted p
    level: float  # the level of `interval`
    ordered: bool  # an ordering may be said
    words: str  # verdict()

    @property
    def interval(self) -> tuple[float, float]:
        return self.estimate.interval(self.level)


def verdict(est: Estimate, ordered: bool) -> str:
    """What the plan lets us say: an ordering only where `ordered` (the primary's test,
    or Holm, rejects); "equivalent within ±δ" only where TOST rejects; otherwise "not
    measured to differ"."""
    said = []
    if ordered:
        pos = [r for r, c in est.contrast.items() if c > 0]
        neg = [r for r, c in est.contrast.items() if c < 0]
        if len(pos) == 1 and len(neg) == 1 and est.contrast[pos[0]] == -est.contrast[neg[0]]:
            a, b = pos[0], neg[0]
            said.append(f"{a} > {b}" if est.estimate > 0 else f"{a} < {b}")
        else:
            said.append(f"{contrast_label(est.contrast)} {'>' if est.estimate > 0 else '<'} 0")
    if est.equivalent:
        said.append(f"equivalent within ±{est.margin:g}")
    return "; ".join(said) if said else "not measured to differ"


def primary(
    an: Analysis, label: str, contrast: Mapping[str, float], metric: str, alpha: float, margin: float
) -> Tested:
    """The one primary test: uncorrected, at α."""
    est = an.estimate(contrast, metric, alpha, margin)
    return Tested(label, est, est.p, alpha, est.rejects, verdict(est, est.rejects))


def family(
    an: Analysis, contrasts: Sequence[tuple[str, Mapping[str, float]]], metric: str, alpha: float, margin: float
) -> list[Tested]:
    """The secondary family under Holm, in the order given: adjusted p, Holm-adjusted
    interval, an ordering only where Holm rejects (TOST at α, uncorrected, as the plan says)."""
    ests = [an.estimate(c, metric, alpha, margin) for _, c in contrasts]
    steps = holm([e.p for e in ests], alpha)
    return [
        Tested(label, e, s.p_adjusted, s.level, s.rejected, verdict(e, s.rejected))
        for (label, _), e, s in zip(contrasts, ests, steps)
    ]
