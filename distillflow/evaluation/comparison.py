"""The method comparison's numbers: every cell's metrics by run, metric and seed, their
means over seeds, and paired differences between runs with a 95% t interval.

A cell is one (run, seed) of params.yaml `compare` (stages/compare.py writes its
metrics file); the report stage (stages/report.py) reads them all through `collect`
and renders them with distillflow/evaluation/comparison_report.py. Two runs are
compared by seed (same seed: same data order and initial student), and an ordering is
claimed only where the interval of the mean difference excludes 0.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from distillflow.base.io import DataError
from distillflow.base.params import check
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

# run -> metric -> seed -> value (a metric a cell recorded as null is absent for that seed)
Values = dict[str, dict[str, dict[int, float]]]
# run -> metric -> (mean, sample std over seeds)
Table = dict[str, dict[str, tuple[float, float]]]


def dig(node: Any, path: tuple[str, ...], where: str) -> float | None:
    """The value at `path`; None where the cell recorded null (nothing to measure)."""
    for k in path:
        if not isinstance(node, dict) or k not in node:
            raise DataError(
                f"{where}: no {'.'.join(path)} (every cell must have been evaluated the same way; rerun `dvc repro`)"
            )
        node = node[k]
    return None if node is None else float(node)


def _has(node: dict[str, Any], path: tuple[str, ...]) -> bool:
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def read_cell(f: Path, run: str, seed: int) -> dict[str, Any]:
    """The metrics file `f` of the cell (run, seed), which must exist and hold that cell."""
    if not f.is_file():
        raise DataError(
            f"{f}: missing; compare.runs lists {run!r} and compare.seeds {seed}, "
            "so `dvc repro comparison/dvc.yaml` should have made it"
        )
    cell = json.loads(f.read_text())
    if (cell["run"], cell["seed"]) != (run, seed):
        raise DataError(f"{f}: holds run {cell['run']!r} seed {cell['seed']}, not {run!r} seed {seed}")
    return cell


def cell_values(cell: dict[str, Any], acc: bool, where: str, nulls: list[str]) -> dict[str, float]:
    """One cell's metrics by column (`acc`: the cells have exact match); a null value is
    left out and named in `nulls`."""
    values: dict[str, float] = {}
    for c, path, _ in METRICS:
        if c == "exact_match" and not acc:
            continue  # prompts without reference answers: no exact match anywhere
        if c in OPTIONAL and not _has(cell["student"], OPTIONAL[c]):
            continue
        v = dig(cell, path, where)
        if v is None:
            nulls.append(f"{cell['run']}-{cell['seed']}: {c}")
        else:
            values[c] = v
    if acc:
        for prefix, key in BREAKDOWNS.items():
            for name, v in sorted(cell["student"]["accuracy"].get(key, {}).items()):
                values[prefix + name] = float(v)
    if "seconds" in cell:
        values["seconds"] = float(sum(cell["seconds"].values()))
    return values


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
            cell = read_cell(f, run, seed)
            acc = "accuracy" in cell["student"]
            if has_accuracy is not None and acc != has_accuracy:
                raise DataError(f"{f}: exact match is {'present' if acc else 'absent'} here but not in the other cells")
            has_accuracy = acc
            for c, v in cell_values(cell, acc, str(f), nulls).items():
                values.setdefault(c, {})[seed] = v
        out[run] = values
    if nulls:
        log.warning("report: no value (null) in %d cells, left out of their means: %s", len(nulls), ", ".join(nulls))
    return out


def summarise(values: Values) -> Table:
    """run -> metric -> (mean, sample std over seeds)."""
    return {run: {c: mean_std(list(v.values())) for c, v in m.items() if v} for run, m in values.items()}


def aggregate(cells_dir: Path, p: CompareParams) -> Table:
    """run -> metric -> (mean, sample std over seeds); every listed cell must exist."""
    return summarise(collect(cells_dir, p))


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (e.g. q = 0.975 for a two-sided 95% interval), scipy's."""
    if df < 1 or not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: need df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    return float(stats.t.ppf(q, df))


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
