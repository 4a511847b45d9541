"""The comparison cell: a method (or DistiLLM-2 ablation) and a seed, trained and evaluated."""

import json
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.lib.data import io, records
from stages.lib.training import cells
from stages.lib.training.train_params import RoundParams

from .builders import pair, prompt, tp
from .conftest import ROOT


def test_run_params_name_the_bad_switch() -> None:
    assert cells.RunParams("distillm2", ("beta_ramp",)).disable == ("beta_ramp",)
    with pytest.raises(ValueError, match=r"disable: unknown switch 'beta'"):
        cells.RunParams("distillm2", ("beta",))
    with pytest.raises(ValueError, match="disable: switches belong to distillm2, not kd"):
        cells.RunParams("kd", ("contrastive",))


def test_cell_params_set_method_switches_and_seed_and_one_round() -> None:
    base = tp(rounds={"r2": RoundParams("data/train")}, lr=0.02)
    used = {
        k: getattr(base, k.split(".")[1]) if k.count(".") == 1 else getattr(base.distillm2, k.split(".")[2])
        for k in cells.SHARED_TRAIN
    }
    used = {k: (asdict(v) if is_dataclass(v) else v) for k, v in used.items()}
    p = cells.cell_params(used, cells.RunParams("distillm2", ("beta_ramp", "adaptive_alpha")), 7)
    assert (p.method, p.seed, p.rounds, p.lr) == ("distillm2", 7, {}, 0.02)
    assert (p.distillm2.contrastive, p.distillm2.beta_ramp, p.distillm2.adaptive_alpha) == (True, False, False)
    assert p.distillm2.beta == base.distillm2.beta and p.gkd == base.gkd
    assert "train.method" not in cells.SHARED_TRAIN and "train.distillm2.beta_ramp" not in cells.SHARED_TRAIN
    with pytest.raises(ValueError, match="train: lr: must be > 0"):
        cells.cell_params({**used, "train.lr": 0.0}, cells.RunParams("kd", ()), 1)


def cell(
    tmp_path: Path, models_dir: Path, run: str, seed: int, params: dict
) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "compare" / f"{run}-{seed}"
    cmd = [
        sys.executable,
        "-m",
        "stages.compare",
        "--params",
        str(tmp_path / "params.yaml"),
        "--run",
        run,
        "--seed",
        str(seed),
        "--pairs",
        str(tmp_path / "curate"),
        "--scores",
        str(tmp_path / "score"),
        "--models",
        str(models_dir),
        "--prompts",
        str(tmp_path / "seed"),
        "--out",
        str(out),
        "--metrics",
        str(tmp_path / "metrics" / f"{run}-{seed}.json"),
        "--live",
        str(tmp_path / "live" / f"{run}-{seed}"),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True), out


def test_a_cell_trains_and_evaluates_and_refuses_contaminated_eval_prompts(tmp_path: Path, taught_models: Path) -> None:
    train_pairs = [pair(i, chosen=str(i + 1), rejected=f"{i}y") for i in range(8)]
    io.write_table(tmp_path / "curate" / "curated.parquet", train_pairs, records.PAIR_SCHEMA)
    evals = [{**prompt(100 + i), "split": "eval"} for i in range(6)]
    io.write_table(tmp_path / "seed" / "eval.parquet", evals, records.PROMPT_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["train"].update(epochs=1, batch_size=4, checkpoint_every=0)
    params["evaluate"].update(batch_size=4, max_new_tokens=4, speculative_prompts=2, draft_tokens=2)
    params["compare"]["runs"]["ablated"] = {"method": "distillm2", "disable": ["contrastive"]}
    done, out = cell(tmp_path, taught_models, "ablated", 3, params)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "metrics" / "ablated-3.json").read_text())
    assert (m["run"], m["method"], m["disable"], m["seed"], m["train"]["steps"]) == (
        "ablated",
        "distillm2",
        ["contrastive"],
        3,
        2,
    )
    s = m["student"]
    assert s["accuracy"]["n"] == 6 and s["speculative"]["prompts"] == 2 and s["speculative"]["matches_greedy"] == 1.0
    assert s["kl_teacher_student"] > 0 and 0 <= s["greedy_agreement"] <= 1
    # one epoch in, the student may answer with nothing scorable: then the NLL is null, said so
    assert (s["nll_on_own_responses"] is None) == (s["own_response_tokens_scored"] == 0)
    assert pq.read_table(out / "predictions.parquet").num_rows == 6 and (out / "model" / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    # the shared trainer and evaluator are in its lineage; no other stage is
    assert {"stages/lib/training/trainer.py", "stages/lib/evaluation/evaluator.py"} <= set(manifest["code"])
    assert not {"stages/train.py", "stages/evaluate.py"} & set(manifest["code"])
    assert [g["artifact"] for g in manifest["validation"]["gates"]] == ["curated pairs"]  # train's input gate
    live = tmp_path / "live" / "ablated-3" / "plots" / "metrics"
    assert (live / "loss.tsv").read_text().splitlines()[0] == "step\tloss" and (live / "beta.tsv").is_file()
    assert len((live / "loss.tsv").read_text().splitlines()) == 1 + m["train"]["steps"]
    assert (
        manifest["train_params"]["method"] == "distillm2"
        and manifest["train_params"]["seed"] == 3
        and "train.lr" in manifest["params"]
    )
    # an eval prompt among the training pairs: refused by the curated pairs' gate, nothing written
    io.write_table(tmp_path / "seed" / "eval.parquet", [*evals, {**prompt(0), "split": "eval"}], records.PROMPT_SCHEMA)
    done, out = cell(
        tmp_path,
        taught_models,
        "kd",
        1,
        {**params, "compare": {**params["compare"], "runs": {"kd": {"method": "kd", "disable": []}}}},
    )
    assert done.returncode == 2 and "curated pairs failed expectation" in done.stderr, done.stderr[-3000:]
    assert "prompt_id__in_eval" in done.stderr
    assert not out.exists()
