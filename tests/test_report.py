"""The comparison report: aggregation over seeds, the verdict against the paper, the files."""

import csv
import json
from pathlib import Path

import pytest

from distillflow.base.io import DataError
from distillflow.training.cells import RunParams
from stages import report


def cell(run: str, seed: int, em: float, agree: float = 0.5) -> dict:
    return {
        "run": run,
        "seed": seed,
        "method": run,
        "disable": [],
        "train": {"final_loss": 1.0},
        "student": {
            "accuracy": {"exact_match": em, "per_category": {"add": em / 2, "sort": 1.0}},
            "rouge_l_vs_teacher": em,
            "kl_teacher_student": 1 - em,
            "nll_on_teacher_responses": 2.0,
            "nll_on_own_responses": 1.0,
            "greedy_agreement": agree,
            "speculative": {"teacher_call_speedup": 1.2},
            "response_tokens": {"mean": 3.0},
        },
    }


P = report.CompareParams(
    seeds=(1, 2),
    runs={
        "sft": RunParams("sft", (), "fresh", "default"),
        "kd": RunParams("kd", (), "fresh", "default"),
        "distillm2": RunParams("distillm2", (), "fresh", "default"),
    },
    threads=1,
)
EMS = {"sft": (0.30, 0.34), "kd": (0.50, 0.52), "distillm2": (0.40, 0.60)}


def write_cells(d: Path, ems: dict = EMS) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for run, vals in ems.items():
        for seed, em in zip((1, 2), vals):
            (d / f"{run}-{seed}.json").write_text(json.dumps(cell(run, seed, em)))


def test_aggregate_means_and_sample_std(tmp_path: Path) -> None:
    write_cells(tmp_path)
    t = report.aggregate(tmp_path, P)
    assert t["sft"]["exact_match"] == (pytest.approx(0.32), pytest.approx(0.0282843, rel=1e-5))
    assert t["distillm2"]["kl_teacher_student"][0] == pytest.approx(0.5)


def test_missing_or_mislabelled_cells_are_refused(tmp_path: Path) -> None:
    write_cells(tmp_path)
    (tmp_path / "kd-2.json").unlink()
    with pytest.raises(DataError, match=r"kd-2.json: missing; compare.runs lists 'kd' and compare.seeds 2"):
        report.aggregate(tmp_path, P)
    (tmp_path / "kd-2.json").write_text(json.dumps(cell("sft", 2, 0.5)))
    with pytest.raises(DataError, match="holds run 'sft' seed 2, not 'kd' seed 2"):
        report.aggregate(tmp_path, P)


REF = {
    "teacher": {"accuracy": {"exact_match": 0.9}},
    "student_initial": {"accuracy": {"exact_match": 0.1}, "greedy_agreement": 0.3},
}


def test_t_quantiles_match_the_table() -> None:
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert report.t_quantile(0.975, df) == pytest.approx(want, abs=6e-4)
    with pytest.raises(ValueError):
        report.t_quantile(0.975, 0)


def test_paired_differences_by_seed_with_a_t_interval() -> None:
    d = report.paired({1: 0.30, 2: 0.34, 3: 0.20}, {1: 0.50, 2: 0.52, 3: 0.45})  # b - a: 0.20, 0.18, 0.25
    sd = ((0.01**2 + 0.03**2 + 0.04**2) / 2) ** 0.5  # deviations from the mean 0.21: -0.01, -0.03, +0.04
    half = 4.303 * sd / 3**0.5
    assert d.n == 3 and d.mean == pytest.approx(0.21) and d.high - d.mean == pytest.approx(half, rel=1e-3)
    assert d.measured and report.ordering("a", "b", d) == "b > a"
    noisy = report.paired({1: 0.40, 2: 0.60}, {1: 0.50, 2: 0.52})
    assert not noisy.measured and report.ordering("a", "b", noisy) == "no difference measured"
    fixed = report.paired(0.1, {1: 0.30, 2: 0.34, 3: 0.32})  # a model that does not depend on the seed
    assert fixed.mean == pytest.approx(0.22) and fixed.measured
    with pytest.raises(ValueError, match="at least 2"):
        report.paired({1: 0.1}, {1: 0.2})


def test_verdict_claims_an_ordering_only_where_the_interval_excludes_zero(tmp_path: Path) -> None:
    write_cells(tmp_path)
    lines = "\n".join(report.verdict(report.collect(tmp_path, P), "exact_match", REF))
    # the paper's SFT row is the initial student (0.1 here, one model), not our `sft` run (SeqKD)
    assert "| initial student | 30.33 | 0.1000 (one model) |" in lines and "| sft |" not in lines
    assert "paper: kd > initial student; ours: kd - initial student = +0.4100" in lines
    assert "over 2 paired seeds: kd > initial student (agrees)" in lines
    assert "paper: distillm2 > kd; ours: distillm2 - kd = -0.0100" in lines
    assert "no difference measured (no claim)" in lines
    assert "1 measured in the paper's direction, 0 measured the other way, 1 with no difference measured" in lines
    # drafter: the initial student's greedy agreement (0.3) against DistiLLM-2's (0.5 every seed)
    assert "distillm2 - initial student = +0.2000, 95% CI [+0.2000, +0.2000]" in lines


def test_write_produces_table_plot_and_readme(tmp_path: Path) -> None:
    write_cells(tmp_path / "cells")
    report.write(tmp_path / "out", tmp_path / "plot.csv", report.collect(tmp_path / "cells", P), P, REF)
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert [r["run"] for r in rows] == ["sft", "kd", "distillm2"] and rows[1]["exact_match_mean"] == "0.510000"
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[2].startswith("| kd |") and "0.5100 ± 0.0141" in md[2]  # ranked by exact match
    assert (tmp_path / "out" / "exact_match.png").read_bytes()[:4] == b"\x89PNG"
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "teacher: exact match 0.9000" in readme and "adjacent orderings" in readme
    assert "## Exact match per skill" in readme and "| kd | 0.2550 ± 0.0071 | 1.0000 ± 0.0000 |" in readme
    # paired differences from distillm2 (sft - distillm2: -0.10, -0.26) and from kd (-0.20, -0.18)
    assert "| sft | -0.1800 | [" in readme and "| sft | -0.1900 | [" in readme
    assert (tmp_path / "plot.csv").read_text().splitlines()[1].startswith("kd,0.510000")


def test_controls_breakdowns_and_cost_are_reported(tmp_path: Path) -> None:
    """Each control against its default run, the DistiLLM-2 - KD gain with and without
    it, per skill step shares, exact match by length, and seconds per cell."""
    runs = {
        "kd": RunParams("kd", (), "fresh", "default"),
        "distillm2": RunParams("distillm2", (), "fresh", "default"),
        "kd_stale": RunParams("kd", (), "stale", "default"),
        "distillm2_stale": RunParams("distillm2", (), "stale", "default"),
    }
    p = report.CompareParams(seeds=(1, 2, 3), runs=runs, threads=1)
    ems = {"kd": (0.40, 0.42, 0.41), "distillm2": (0.60, 0.63, 0.62), "kd_stale": (0.40, 0.41, 0.43)}
    ems["distillm2_stale"] = (0.45, 0.47, 0.46)
    d = tmp_path / "cells"
    d.mkdir()
    for run, vals in ems.items():
        for seed, em in zip(p.seeds, vals):
            c = cell(run, seed, em)
            c["student"]["accuracy"] |= {
                "step_share": em + 0.2,
                "step_share_per_category": {"walk": em},
                "per_length": {"01-10": 1.0, "18-22": em},
            }
            c["seconds"] = {"sample": 10.0, "train": 20.0 + seed, "evaluate": 5.0}
            (d / f"{run}-{seed}.json").write_text(json.dumps(c))
    values = report.collect(d, p)
    assert values["kd"]["step_share/walk"] == {1: 0.40, 2: 0.42, 3: 0.41}
    assert values["kd"]["by_length/18-22"][2] == 0.42 and values["kd"]["seconds"][3] == 38.0
    assert report.counterpart(p, "distillm2_stale") == "distillm2" and report.control_of(runs["kd"]) is None
    lines = "\n".join(report.controls_table(values, p, "exact_match"))
    assert "| distillm2_stale | one stale round of student samples | distillm2 | -0.1567 |" in lines
    assert (
        "| kd_stale | one stale round of student samples | kd | +0.0033 |" in lines
        and "no difference measured" in lines
    )
    # the gain: 0.2067 without the control, 0.0467 with it; the change is measured
    assert "DistiLLM-2 - KD with one stale round of student samples: +0.0467, without: +0.2067" in lines
    assert "the gain shrinks" in lines
    report.write(tmp_path / "out", tmp_path / "plot.csv", values, p, REF)
    text = (tmp_path / "out" / "README.md").read_text()
    for section in (
        "## Share of right steps per skill",
        "## Exact match by reference length",
        "## Controls",
        "## Cost",
    ):
        assert section in text
    assert "| kd | 37.0 ± 1.0 |" in text and "step_share" in (tmp_path / "out" / "table.md").read_text()
    # paired differences and controls on the share of right steps and the KL, not only exact match
    # (step share = exact match + 0.2 and KL = 1 - exact match in these cells: the same gaps, KL's reversed)
    for metric in ("step_share", "kl_teacher_student"):
        assert f"Paired by seed, {metric}: run - kd (95% CI)" in text
        assert f"Paired by seed, {metric}: control - its default run (95% CI)" in text
    assert text.count("A stale-round control trains on the same teacher responses") == 1  # once, not per metric
    steps = text.split("Paired by seed, step_share: run - kd")[1].split("Paired by seed")[0]
    assert "| distillm2 | +0.2067 |" in steps and "distillm2 > kd" in steps
    kl = text.split("Paired by seed, kl_teacher_student: run - kd")[1].split("Paired by seed")[0]
    assert "| distillm2 | -0.2067 |" in kl and "distillm2 < kd" in kl
