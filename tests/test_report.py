"""The comparison report on synthetic cells (B = 3 bootstraps x S = 2 seeds, 30 prompts
over three skills): the stage's real main, its README against an analysis computed here
with loops, the Holm column, a TOST "equivalent" verdict, and the refusals."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

from distillflow.base.errors import ParamsError
from distillflow.base.io import DataError, write_table
from distillflow.base.params import build
from distillflow.evaluation import analysis
from distillflow.evaluation.comparison import PROMPT_SCORES_SCHEMA, cell_stem
from stages import report

from .conftest import ROOT

BOOTS, SEEDS, P = [1, 2, 3], [1, 2], 60
CATS = ["add", "sort", "walk"]
RUNS = {
    "kd": {"method": "kd", "disable": [], "rounds": "fresh", "teacher": "default", "online": 0},
    "distillm2": {"method": "distillm2", "disable": [], "rounds": "fresh", "teacher": "default", "online": 0},
    "distillm2_stale": {"method": "distillm2", "disable": [], "rounds": "stale", "teacher": "default", "online": 0},
    "dpkd": {"method": "dpkd", "disable": [], "rounds": "fresh", "teacher": "default", "online": 0},
}
SKILL = {"kd": 0.55, "distillm2": 0.75, "distillm2_stale": 0.75, "dpkd": 0.05}
COMPARE = {
    "threads": 1,
    "bootstraps": BOOTS,
    "seeds": SEEDS,
    "runs": RUNS,
    "analysis": {
        "metric": "exact_match",
        "primary": "distillm2 - kd",
        "family": ["distillm2 - dpkd", "distillm2 - distillm2_stale", "kd - dpkd"],
        "alpha": 0.05,
        "margin": 10.0,
        "resamples": 200,
        "resample_seed": 4,
    },
}
PARAMS = build(report.CompareParams, COMPARE, "compare")


def group_of(i: int) -> str:
    """Prompt i's instance: prompts i and i + 3 (same skill) are two phrasings of one for i < 12."""
    return f"{CATS[i % 3]}:{i // 6}" if i < 12 else f"{CATS[i % 3]}:{i}"


def prompt_rows(run: str, b: int, s: int) -> list[dict]:
    """One row per prompt. distillm2_stale is distillm2 with two answers flipped in
    bootstrap 1 (one each way, in its two seeds): an equal pair up to noise."""
    twin = "distillm2" if run == "distillm2_stale" else run
    rnd = random.Random(f"{twin}-{b}-{s}")
    ref = random.Random(f"ref-{b}")
    rows = []
    for i in range(P):
        cat = CATS[i % 3]
        known = i != 7  # prompt 7 has no reference answer
        correct = rnd.random() < SKILL[twin] + 0.05 * b - 0.3 * (cat == "walk")
        tokens = rnd.randint(4, 9)
        t_tokens = ref.randint(4, 9)  # the reference teacher's response: the same in every cell of the bootstrap
        steps = rnd.randint(2, 4) if cat == "walk" else None
        rows.append(
            {
                "prompt_id": f"p{i:02d}",
                "category": cat,
                "group": group_of(i),
                "correct": correct if known else None,
                "steps_right": (steps if correct else rnd.randint(0, steps)) if steps else None,
                "steps": steps,
                "rouge_l": rnd.uniform(0.4, 1.0),
                "kl_sum": t_tokens * rnd.uniform(0.05, 0.2),
                "agree_sum": float(rnd.randint(2, t_tokens)),
                "nll_teacher_sum": t_tokens * rnd.uniform(0.1, 0.3),
                "teacher_tokens": t_tokens,
                "nll_own_sum": tokens * rnd.uniform(0.05, 0.15),
                "own_tokens": tokens,
                "nll_sampled_sum": tokens * (rnd.uniform(2, 4) if run == "dpkd" else rnd.uniform(0.2, 0.4)),
                "sampled_tokens": tokens,
                "teacher_correct": (ref.random() < 0.95) if known else None,
                "initial_correct": (ref.random() < 0.4 + 0.1 * b) if known else None,
            }
        )
    if run == "distillm2_stale" and b == 1:
        i = next(i for i, r in enumerate(rows) if r["correct"] is (s == 1))  # seed 1: a right one, seed 2: a wrong one
        rows[i]["correct"] = not rows[i]["correct"]
    return rows


def write_cells(d: Path) -> dict:
    """Every cell's files; returns run -> b -> s -> its rows."""
    d.mkdir(parents=True, exist_ok=True)
    rows = {}
    for run, rp in RUNS.items():
        for b in BOOTS:
            for s in SEEDS:
                stem = cell_stem(run, b, s)
                cell = {"run": run, "bootstrap": b, "seed": s, **rp}
                cell["cost"] = {"optimizer_steps": 40, "sequences": 320 * (2 if run == "distillm2" else 1)}
                cell["cost"] |= {"tokens": 9000 + b, "seconds": 60.0 + s}
                cell["student"] = {"kl_initial_final": (0.2 if rp["rounds"] == "stale" else 0.3) + 0.01 * s}
                (d / f"{stem}.json").write_text(json.dumps(cell))
                rows.setdefault(run, {}).setdefault(b, {})[s] = prompt_rows(run, b, s)
                write_table(d / f"{stem}.prompts.parquet", rows[run][b][s], PROMPT_SCORES_SCHEMA)
    return rows


def exact_match(rows: list[dict], draw: list[int]) -> float:
    known = [rows[i]["correct"] for i in draw if rows[i]["correct"] is not None]
    return 100.0 * sum(known) / len(known)


def naive(rows: dict, contrast: dict, draws: list[list[int]]) -> dict:
    """D, its interval and p by loops over bootstraps, seeds, resamples and prompts."""

    def big_d(draw: list[int]) -> tuple[float, list[float]]:
        ds = [
            sum(sum(c * exact_match(rows[run][b][s], draw) for run, c in contrast.items()) for s in SEEDS) / len(SEEDS)
            for b in BOOTS
        ]
        return sum(ds) / len(ds), ds

    def var(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    D, ds = big_d(list(range(P)))
    se = math.sqrt(var(ds) / len(BOOTS) + var([big_d(d)[0] for d in draws]))
    half = stats.t.ppf(0.975, len(BOOTS) - 1) * se
    return {"D": D, "low": D - half, "high": D + half, "p": 2 * stats.t.sf(abs(D) / se, len(BOOTS) - 1)}


def draws() -> list[list[int]]:
    """The report's resamples by loops: instances (groups) drawn, each with all its prompts."""
    members: dict[str, list[int]] = {}
    for i in range(P):
        members.setdefault(group_of(i), []).append(i)
    groups = list(members.values())  # in order of first appearance, as the analysis numbers them
    assert len(groups) < P  # some instances have two phrasings
    chunks = analysis.resample_indices(len(groups), 200, 4)
    return [[i for g in row for i in groups[int(g)]] for chunk in chunks for row in chunk]


def table(readme: str, heading: str, header: bool = False) -> list[list[str]]:
    """The first Markdown table under `heading`, as rows of cells (the rule dropped, and
    the header unless `header`)."""
    block: list[str] = []
    for x in readme.split(heading, 1)[1].splitlines():
        if x.startswith("|"):
            block.append(x)
        elif block:
            break
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in block]
    return [rows[0], *rows[2:]] if header else rows[2:]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """The stage run as dvc runs it: `python -m stages.report` on the synthetic cells."""
    tmp = tmp_path_factory.mktemp("report")
    rows = write_cells(tmp / "cells")
    (tmp / "params.yaml").write_text(yaml.safe_dump({"compare": COMPARE}, sort_keys=False))
    cmd = [sys.executable, "-m", "stages.report", "--params", str(tmp / "params.yaml"), "--cells", str(tmp / "cells")]
    cmd += ["--out", str(tmp / "out"), "--plot", str(tmp / "plot.csv")]
    env = {**os.environ, "DISTILLFLOW_LINEAGE_DIR": str(tmp / "lineage"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tmp, rows, (tmp / "out" / "README.md").read_text()


def test_the_primary_line_is_the_analysis_computed_by_loops(made: tuple[Path, dict, str]) -> None:
    _, rows, readme = made
    want = naive(rows, {"distillm2": 1.0, "kd": -1.0}, draws())
    line = next(x for x in readme.splitlines() if x.startswith("- D = "))
    assert line.startswith(
        f"- D = {want['D']:+.4f}, 95% interval [{want['low']:+.4f}, {want['high']:+.4f}], p = {want['p']:.4g} (t, 2 df)"
    )
    verdict = "distillm2 > kd" if want["p"] < 0.05 else "not measured to differ"
    assert line.endswith(f"**{verdict}**")
    assert "B = 3 bootstraps" in readme and "S = 2 training seeds" in readme and f"P = {P} eval prompts" in readme
    assert "docs/comparison-plan.md" in readme and "The unit of replication is the bootstrap" in readme


def test_the_family_is_holm_corrected_and_an_equal_pair_is_equivalent(made: tuple[Path, dict, str]) -> None:
    _, rows, readme = made
    fam = table(readme, "## Secondary family (Holm)")
    assert [r[1] for r in fam] == COMPARE["analysis"]["family"]
    raw = [naive(rows, analysis.parse_contrast(c, RUNS, "f"), draws())["p"] for c in COMPARE["analysis"]["family"]]
    assert [float(r[3]) for r in fam] == pytest.approx(raw, rel=1e-3)
    # Holm by hand: sorted ascending, (m - rank + 1) * p, running maximum
    order = sorted(range(3), key=lambda i: raw[i])
    adjusted, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        adjusted[i] = running
    assert [float(r[4]) for r in fam] == pytest.approx(adjusted, rel=1e-3)
    # distillm2 - dpkd: 70 points apart, passes Holm; distillm2 - distillm2_stale: equal up to two flips
    assert fam[0][7] == "distillm2 > dpkd" and fam[2][7] == "kd > dpkd"
    assert fam[1][7] == "equivalent within ±10" and abs(float(fam[1][2])) < 1.0


def test_the_run_means_scale_skills_cost_and_collapse(made: tuple[Path, dict, str]) -> None:
    tmp, rows, readme = made
    means = {r[0]: r for r in table(readme, "## Every run (description)")}
    assert set(means) == {*RUNS, "reference teacher", "initial student"}
    em = sum(exact_match(rows["kd"][b][s], list(range(P))) for b in BOOTS for s in SEEDS) / 6
    assert means["kd"][4].startswith(f"{em:.4f} [")
    teacher = sum(exact_match([{"correct": r["teacher_correct"]} for r in rows["kd"][b][1]], range(P)) for b in BOOTS)
    assert means["reference teacher"][4].startswith(f"{teacher / 3:.4f} [") and means["reference teacher"][5] == "-"
    assert "## Exact match per skill (description, uncorrected)" in readme
    skills = table(readme, "## Exact match per skill")
    assert len(skills[0]) == 4  # run, add, sort, walk
    cost = {r[0]: r for r in table(readme, "## Cost")}
    assert cost["distillm2"][3] == "640" and cost["kd"][5] == "61.5" and cost["distillm2_stale"][6] == "0.2150 ± 0.0055"
    assert "distillm2_stale (stale rounds) moved 0.2150" in readme and "distillm2 (fresh) 0.3150" in readme
    collapse = readme.split("## DPKD's collapse")[1].split("##")[0]
    assert "NLL on its own responses sampled at the training temperature" in collapse and "dpkd − kd = +" in collapse
    assert "paper: distillm2 > kd; ours: " in readme and "(primary)" in readme
    assert "paper: distillm2 > gkd" not in readme  # gkd is not in these cells
    got = list(csv.DictReader((tmp / "out" / "table.csv").open()))
    assert [r["run"] for r in got] == list(RUNS) and got[0]["exact_match_mean"] == f"{em:.6f}"
    assert got[0]["bootstraps"] == "3" and got[0]["seeds"] == "2"
    assert (tmp / "plot.csv").read_text().splitlines()[0] == "run,exact_match_mean,exact_match_low,exact_match_high"
    assert (tmp / "out" / "exact_match.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp / "out" / "table.md").read_text().startswith("| run | method | disabled | control | exact_match |")


def copy_cells(made: tuple[Path, dict, str], tmp_path: Path) -> Path:
    d = tmp_path / "cells"
    d.mkdir()
    for f in (made[0] / "cells").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_a_missing_cell_is_refused_naming_it(made: tuple[Path, dict, str], tmp_path: Path) -> None:
    d = copy_cells(made, tmp_path)
    (d / "dpkd-b3-s2.json").unlink()
    with pytest.raises(
        DataError, match=r"dpkd-b3-s2.json: missing; .*'dpkd', compare.bootstraps 3 and compare.seeds 2"
    ):
        report.read_cells(d, PARAMS)
    (d / "dpkd-b3-s2.json").write_bytes((made[0] / "cells" / "dpkd-b3-s2.json").read_bytes())
    (d / "kd-b2-s1.prompts.parquet").unlink()
    with pytest.raises(DataError, match=r"kd-b2-s1.prompts.parquet: missing; .*dvc repro comparison/dvc.yaml"):
        report.read_cells(d, PARAMS)


def test_cells_on_other_prompts_or_references_are_refused(made: tuple[Path, dict, str], tmp_path: Path) -> None:
    d = copy_cells(made, tmp_path)
    rows = copy.deepcopy(made[1]["distillm2"][2][1])
    rows[3], rows[4] = rows[4], rows[3]
    write_table(d / "distillm2-b2-s1.prompts.parquet", rows, PROMPT_SCORES_SCHEMA)
    with pytest.raises(DataError, match=r"distillm2-b2-s1.prompts.parquet: row 3, field 'prompt_id': 'p04', but "):
        report.read_cells(d, PARAMS)
    rows[3], rows[4] = rows[4], rows[3]
    rows[0]["teacher_correct"] = not rows[0]["teacher_correct"]
    write_table(d / "distillm2-b2-s1.prompts.parquet", rows, PROMPT_SCORES_SCHEMA)
    with pytest.raises(DataError, match=r"row 0, field 'teacher_correct'.*same reference models"):
        report.read_cells(d, PARAMS)
    cell = json.loads((d / "kd-b1-s1.json").read_text()) | {"seed": 2}
    (d / "kd-b1-s1.json").write_text(json.dumps(cell))
    with pytest.raises(DataError, match="holds run 'kd' bootstrap 1 seed 2, not 'kd' bootstrap 1 seed 1"):
        report.read_cells(d, PARAMS)


def test_an_undefined_metric_is_left_out_and_the_tested_one_refused(
    made: tuple[Path, dict, str], tmp_path: Path
) -> None:
    """A cell where a metric has no denominator at all: that run's value is left out
    (named in the README and a warning), never invented; for the tested metric, a refusal."""
    d = copy_cells(made, tmp_path)
    rows = copy.deepcopy(made[1]["kd"][1][1])
    for row in rows:
        row["own_tokens"], row["nll_own_sum"] = 0, 0.0
    write_table(d / "kd-b1-s1.prompts.parquet", rows, PROMPT_SCORES_SCHEMA)
    report.write(tmp_path / "out", tmp_path / "plot.csv", report.read_cells(d, PARAMS), PARAMS)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "- nll_on_own_responses over all eval prompts for kd: no denominator in kd-b1-s1" in readme
    head, *rows_md = table(readme, "## Every run (description)", header=True)
    means = {r[0]: r for r in rows_md}
    i = head.index("nll_on_own_responses")
    assert means["kd"][i] == "-" and means["distillm2"][i] != "-"
    for row in rows:
        row["correct"] = None
    write_table(d / "kd-b1-s1.prompts.parquet", rows, PROMPT_SCORES_SCHEMA)
    with pytest.raises(ParamsError, match=r"compare.analysis.metric: exact_match is undefined .* \['kd-b1-s1'\]"):
        report.run(report.read_cells(d, PARAMS), PARAMS)


def test_params_are_refused_naming_the_key() -> None:
    bad = copy.deepcopy(COMPARE)
    bad["bootstraps"] = [1]
    with pytest.raises(ParamsError, match=r"compare: bootstraps: list at least two bootstraps"):
        build(report.CompareParams, bad, "compare")
    bad = copy.deepcopy(COMPARE)
    bad["analysis"]["family"][1] = "distillm2 - gkd"
    with pytest.raises(ParamsError, match=re.escape("compare.analysis.family[1]: 'distillm2 - gkd' names ['gkd']")):
        build(report.CompareParams, bad, "compare")
    bad = copy.deepcopy(COMPARE)
    bad["analysis"]["metric"] = "accuracy"
    with pytest.raises(ParamsError, match=r"compare.analysis: metric: 'accuracy' is not one of \['exact_match'"):
        build(report.CompareParams, bad, "compare")
