"""The comparison report: aggregation over seeds, the verdict against the paper, the files."""

import csv
import json
from pathlib import Path

import pytest

from stages import report
from stages.lib.data.io import DataError
from stages.lib.training.cells import RunParams


def cell(run: str, seed: int, em: float, agree: float = 0.5) -> dict:
    return {
        "run": run,
        "seed": seed,
        "method": run,
        "disable": [],
        "train": {"final_loss": 1.0},
        "student": {
            "accuracy": {"exact_match": em},
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
    seeds=(1, 2), runs={"sft": RunParams("sft", ()), "kd": RunParams("kd", ()), "distillm2": RunParams("distillm2", ())}
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


def test_verdict_says_where_we_agree_and_whether_it_beats_the_spread(tmp_path: Path) -> None:
    write_cells(tmp_path)
    lines = "\n".join(report.verdict(report.aggregate(tmp_path, P), "exact_match"))
    assert "paper: kd > sft; ours: kd > sft by 0.1900 (agrees; larger than the seed spread" in lines
    assert "paper: distillm2 > kd; ours: distillm2 <= kd by 0.0100 (disagrees; within the seed spread" in lines
    assert "1 of 2 adjacent orderings agree with the paper." in lines


def test_write_produces_table_plot_and_readme(tmp_path: Path) -> None:
    write_cells(tmp_path / "cells")
    table = report.aggregate(tmp_path / "cells", P)
    ref = {"teacher": {"accuracy": {"exact_match": 0.9}}, "student_initial": {"accuracy": {"exact_match": 0.1}}}
    report.write(tmp_path / "out", tmp_path / "plot.csv", table, P, ref)
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert [r["run"] for r in rows] == ["sft", "kd", "distillm2"] and rows[1]["exact_match_mean"] == "0.510000"
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[2].startswith("| kd |") and "0.5100 ± 0.0141" in md[2]  # ranked by exact match
    assert (tmp_path / "out" / "exact_match.png").read_bytes()[:4] == b"\x89PNG"
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "teacher: exact match 0.9000" in readme and "adjacent orderings agree" in readme
    assert (tmp_path / "plot.csv").read_text().splitlines()[1].startswith("kd,0.510000")
