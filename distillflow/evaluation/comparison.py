"""The method comparison's params and cells: params.yaml `compare` and what each cell
wrote, read into the analysis's per-prompt arrays (distillflow/evaluation/analysis.py).

A cell is one (run, bootstrap, seed) of `compare.runs` x `compare.bootstraps` x
`compare.seeds`; stages/compare.py writes, in the cells folder (metrics/compare/):

- `<run>-b<bootstrap>-s<seed>.json` (`cell_stem`): the cell's metrics, with its run,
  bootstrap and seed, its `cost` (optimizer steps, sequences, tokens, seconds) and
  student.kl_initial_final (how far the student moved from the initial student);
- `<run>-b<bootstrap>-s<seed>.prompts.parquet` (`PROMPT_SCORES_SCHEMA`): one row per
  eval prompt, in the eval file's order, the same prompts in every cell.

The report stage (stages/report.py) reads them all through `read_cells` and renders them
with distillflow/evaluation/comparison_report.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillflow.base.io import DataError, read_table
from distillflow.base.params import check
from distillflow.evaluation import analysis
from distillflow.evaluation.eval_params import PROMPT_SCORES
from distillflow.training.cells import RunParams


@dataclass(frozen=True)
class AnalysisParams:
    """params.yaml `compare.analysis`: docs/comparison-plan.md's tests, fixed before the run."""

    # the metric the tests are on: exact_match, step_share, rouge_l, kl_teacher_student, greedy_agreement,
    # nll_on_teacher_responses, nll_on_own_responses or nll_on_sampled_responses (analysis.METRICS)
    metric: str
    primary: str  # the one primary test, uncorrected: a contrast, runs joined by + and - ("distillm2 - kd")
    family: tuple[str, ...]  # the secondary family, Holm-corrected: contrasts as `primary` ([]: none)
    alpha: float  # two-sided level of every test (and of TOST)
    margin: float  # TOST equivalence margin, in the metric's units (points for exact_match)
    resamples: int  # paired resamples of the eval prompts (the eval-sample variance)
    resample_seed: int  # seed of the numpy Generator drawing them

    def __post_init__(self) -> None:
        check(self.metric in analysis.METRICS, "metric", f"{self.metric!r} is not one of {list(analysis.METRICS)}")
        check(0.0 < self.alpha < 0.5, "alpha", f"must be in (0, 0.5); got {self.alpha}")
        check(self.margin > 0.0, "margin", f"must be > 0; got {self.margin}")
        check(self.resamples >= 2, "resamples", f"must be >= 2 (a variance); got {self.resamples}")
        check(self.resample_seed >= 0, "resample_seed", f"must be >= 0; got {self.resample_seed}")
        analysis.parse_contrast(self.primary, None, "primary")
        for i, c in enumerate(self.family):
            analysis.parse_contrast(c, None, f"family[{i}]")


@dataclass(frozen=True)
class CompareParams:
    """params.yaml `compare`."""

    threads: int  # torch threads per cell (stages/compare.py)
    bootstraps: tuple[int, ...]  # the bootstrap replicates (teacher, plain teacher, initial student, responses)
    seeds: tuple[int, ...]  # train.seed of each repetition within a bootstrap
    runs: dict[str, RunParams]  # name -> method and DistiLLM-2 switches disabled
    analysis: AnalysisParams  # the tests (docs/comparison-plan.md)

    def __post_init__(self) -> None:
        check(self.threads >= 1, "threads", "must be >= 1")
        check(
            len(self.bootstraps) >= 2 and len(set(self.bootstraps)) == len(self.bootstraps),
            "bootstraps",
            f"list at least two bootstraps, each once (an interval between bootstraps); got {list(self.bootstraps)}",
        )
        check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
            "seeds",
            "list at least one seed, each once",
        )
        check(len(self.runs) >= 1, "runs", "name at least one run")
        for name in (TEACHER, INITIAL):
            check(name not in self.runs, "runs", f"{name!r} is the report's name for a reference model")
        self.contrasts()  # every contrast names runs of compare.runs

    def contrasts(self) -> tuple[tuple[str, dict[str, float]], list[tuple[str, dict[str, float]]]]:
        """(the primary's (text, contrast), the family's), checked against compare.runs."""
        a = self.analysis
        prim = (a.primary, analysis.parse_contrast(a.primary, self.runs, "compare.analysis.primary"))
        fam = [
            (c, analysis.parse_contrast(c, self.runs, f"compare.analysis.family[{i}]")) for i, c in enumerate(a.family)
        ]
        return prim, fam


# The controls (cells.RunParams) and what each changes
CONTROLS = {
    "rounds": ("stale", "one stale round of student samples"),
    "teacher": ("plain", "a teacher trained without corrupted prefixes"),
}
# The reference models every cell of a bootstrap carries (teacher_correct, initial_correct)
TEACHER, INITIAL = "reference teacher", "initial student"

PROMPT_SCORES_SCHEMA = PROMPT_SCORES  # written by stages/compare.py (evaluator.prompt_scores)
COST = ("optimizer_steps", "sequences", "tokens", "seconds")


def control_of(run: RunParams) -> str | None:
    """What a control run changes ('rounds' or 'teacher'), None for a default run."""
    changed = [k for k, (value, _) in CONTROLS.items() if getattr(run, k) == value]
    return "+".join(changed) if changed else None


def counterpart(p: CompareParams, name: str) -> str | None:
    """The default run a control run differs from only by its control."""
    run = p.runs[name]
    for other, o in p.runs.items():
        if control_of(o) is None and (o.method, o.disable, o.online) == (run.method, run.disable, run.online):
            return other
    return None


def cell_stem(run: str, bootstrap: int, seed: int) -> str:
    """A cell's file name without its suffix: `<run>-b<bootstrap>-s<seed>`."""
    return f"{run}-b{bootstrap}-s{seed}"


def _missing(f: Path, run: str, bootstrap: int, seed: int) -> DataError:
    return DataError(
        f"{f}: missing; compare.runs lists {run!r}, compare.bootstraps {bootstrap} and compare.seeds {seed}: "
        "run `dvc repro comparison/dvc.yaml` (or `distillflow run --target comparison/dvc.yaml`) to make every cell"
    )


def read_cell_json(f: Path, run: str, bootstrap: int, seed: int) -> dict[str, Any]:
    """The metrics file `f` of the cell, which must exist, hold that cell, and have its
    cost and student.kl_initial_final."""
    if not f.is_file():
        raise _missing(f, run, bootstrap, seed)
    try:
        cell = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON ({exc}); rerun the cell: `dvc repro comparison/dvc.yaml`") from exc
    if not isinstance(cell, dict):
        raise DataError(f"{f}: not a JSON object")
    for k in ("run", "bootstrap", "seed", "cost", "student"):
        if k not in cell:
            raise DataError(f"{f}: no field {k!r} (rerun the cell: `dvc repro comparison/dvc.yaml`)")
    if not isinstance(cell["cost"], dict):
        raise DataError(f"{f}: field 'cost' is not an object")
    if (cell["run"], cell["bootstrap"], cell["seed"]) != (run, bootstrap, seed):
        raise DataError(
            f"{f}: holds run {cell['run']!r} bootstrap {cell['bootstrap']} seed {cell['seed']}, "
            f"not {run!r} bootstrap {bootstrap} seed {seed}"
        )
    for k in COST:
        if not isinstance(cell["cost"].get(k), int | float) or isinstance(cell["cost"].get(k), bool):
            raise DataError(f"{f}: field 'cost.{k}' missing or not a number")
    if not isinstance(cell["student"].get("kl_initial_final"), int | float):
        raise DataError(f"{f}: field 'student.kl_initial_final' missing or not a number")
    return cell


def read_prompt_scores(f: Path) -> tuple[list[str], list[str | None], list[str | None], dict[str, np.ndarray]]:
    """(prompt ids, categories, every other column as floats with nulls as NaN) of a
    cell's prompts file; refused where ids repeat or steps_right and steps disagree on null."""
    if not f.is_file():
        raise DataError(f"{f}: file not found")
    table = read_table(f, PROMPT_SCORES_SCHEMA)
    ids = table.column("prompt_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{f}: field 'prompt_id': {dup!r} appears more than once")
    cols = {
        name: np.array([np.nan if v is None else float(v) for v in table.column(name).to_pylist()])
        for name in PROMPT_SCORES_SCHEMA.names
        if name not in ("prompt_id", "category", "group")
    }
    diff = np.isnan(cols["steps_right"]) != np.isnan(cols["steps"])
    if diff.any():
        row = int(np.argmax(diff))
        raise DataError(f"{f}: row {row}, fields 'steps_right' and 'steps': one is null, the other not")
    return ids, table.column("category").to_pylist(), table.column("group").to_pylist(), cols


def _nullable(col: np.ndarray) -> list[float | None]:
    """A column's values with NaN (null) as None, for comparing."""
    return [None if np.isnan(x) else float(x) for x in col]


def _same(f: Path, what: str, got: list[Any], want: list[Any], ref: Path, why: str) -> None:
    """Refuse `f` where its column `what` differs from the reference cell's."""
    if got == want:
        return
    if len(got) != len(want):
        raise DataError(f"{f}: {len(got)} rows, {ref} has {len(want)}; {why}")
    row = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    raise DataError(f"{f}: row {row}, field {what!r}: {got[row]!r}, but {ref} has {want[row]!r}; {why}")


@dataclass(frozen=True)
class Cells:
    """Every cell's metrics file (by (run, bootstrap, seed)) and per-prompt numbers."""

    replicate: analysis.Replicate  # the runs, then the reference teacher and initial student (exact match only)
    metrics: dict[tuple[str, int, int], dict[str, Any]]
    prompt_ids: tuple[str, ...]


def read_cells(cells_dir: Path, p: CompareParams) -> Cells:
    """Every cell of compare.runs x compare.bootstraps x compare.seeds from `cells_dir`
    (`<run>-b<bootstrap>-s<seed>.json` and `.prompts.parquet`); every cell must exist,
    all on the same prompts in the same order, and every cell of a bootstrap with the
    same reference teacher's and initial student's answers."""
    runs, bs, ss = list(p.runs), list(p.bootstraps), list(p.seeds)
    metrics: dict[tuple[str, int, int], dict[str, Any]] = {}
    first: tuple[Path, list[str], list[str | None], list[str | None]] | None = None
    refs: dict[int, tuple[Path, dict[str, np.ndarray]]] = {}
    cols_of: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
    for run in runs:
        for b in bs:
            for s in ss:
                stem = cell_stem(run, b, s)
                metrics[(run, b, s)] = read_cell_json(cells_dir / f"{stem}.json", run, b, s)
                f = cells_dir / f"{stem}.prompts.parquet"
                if not f.is_file():
                    raise _missing(f, run, b, s)
                ids, cats, groups, cols = read_prompt_scores(f)
                if first is None:
                    first = (f, ids, cats, groups)
                why = "every cell is scored on the same eval prompts, in the eval file's order"
                _same(f, "prompt_id", ids, first[1], first[0], why)
                _same(f, "category", cats, first[2], first[0], why)
                _same(f, "group", groups, first[3], first[0], why)
                if b not in refs:
                    refs[b] = (f, cols)
                # the reference teacher's answers and its responses' lengths, the initial student's answers
                for k in ("teacher_correct", "teacher_tokens", "initial_correct"):
                    why = f"every cell of bootstrap {b} is scored against the same reference models"
                    _same(f, k, _nullable(cols[k]), _nullable(refs[b][1][k]), refs[b][0], why)
                cols_of[(run, b, s)] = cols
    assert first is not None  # CompareParams lists at least one run, bootstrap and seed
    return Cells(_replicate(p, cols_of, refs, first[2], first[3]), metrics, tuple(first[1]))


def _replicate(
    p: CompareParams,
    cols_of: dict[tuple[str, int, int], dict[str, np.ndarray]],
    refs: dict[int, tuple[Path, dict[str, np.ndarray]]],
    categories: list[str | None],
    groups: list[str | None],
) -> analysis.Replicate:
    """The analysis's arrays: the runs', then the reference models' (their exact match
    from each bootstrap's teacher_correct and initial_correct, the same for every seed)."""
    runs, bs, ss = list(p.runs), list(p.bootstraps), list(p.seeds)
    shape = (len(runs) + 2, len(bs), len(ss), len(categories))
    num = {m: np.zeros(shape) for m in analysis.METRICS}
    den = {m: np.zeros(shape) for m in analysis.METRICS}
    for m in analysis.METRICS:
        for r, run in enumerate(runs):
            for bi, b in enumerate(bs):
                for si, s in enumerate(ss):
                    num[m][r, bi, si], den[m][r, bi, si] = analysis.ratio_terms(m, cols_of[(run, b, s)])
    for r, col in ((len(runs), "teacher_correct"), (len(runs) + 1, "initial_correct")):
        for bi, b in enumerate(bs):
            n, d = analysis.ratio_terms("exact_match", {"correct": refs[b][1][col]})
            num["exact_match"][r, bi, :], den["exact_match"][r, bi, :] = n, d
    return analysis.Replicate(
        runs=(*runs, TEACHER, INITIAL),
        bootstraps=tuple(bs),
        seeds=tuple(ss),
        categories=tuple(categories),
        num=num,
        groups=tuple(groups),
        den=den,
    )
