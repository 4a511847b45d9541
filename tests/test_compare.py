"""The comparison cell: a method (or DistiLLM-2 ablation) and a seed, trained and evaluated."""

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distillflow.base import encoding, io, records
from distillflow.training import cells
from distillflow.training.train_params import RoundParams

from .builders import gen, load, pair, prompt, sp, tp
from .conftest import ROOT


def test_run_params_name_the_bad_switch() -> None:
    assert cells.RunParams("distillm2", ("beta_ramp",), "fresh", "default", 0).disable == ("beta_ramp",)
    with pytest.raises(ValueError, match=r"disable: unknown switch 'beta'"):
        cells.RunParams("distillm2", ("beta",), "fresh", "default", 0)
    with pytest.raises(ValueError, match="disable: switches belong to distillm2, not kd"):
        cells.RunParams("kd", ("contrastive",), "fresh", "default", 0)
    assert cells.RunParams("opd", (), "fresh", "default", 1).label == "opd (online, every 1 steps)"
    assert cells.RunParams("opd", (), "fresh", "default", 0).label == "opd"
    with pytest.raises(ValueError, match=r"online: must be >= 0"):
        cells.RunParams("opd", (), "fresh", "default", -1)


def test_cell_params_set_method_switches_and_seed_and_keep_the_rounds() -> None:
    base = tp(rounds={"r2": RoundParams("data/train")}, lr=0.02)
    used = {
        k: getattr(base, k.split(".")[1])
        if k.count(".") == 1
        else getattr(getattr(base, k.split(".")[1]), k.split(".")[2])
        for k in cells.SHARED_TRAIN
    }
    raw = lambda v: asdict(v) if is_dataclass(v) else {k: raw(x) for k, x in v.items()} if isinstance(v, dict) else v  # noqa: E731
    used = {k: raw(v) for k, v in used.items()}
    p = cells.cell_params(used, cells.RunParams("distillm2", ("beta_ramp", "adaptive_alpha"), "fresh", "default", 0), 7)
    assert (p.method, p.seed, p.rounds, p.lr) == ("distillm2", 7, {"r2": RoundParams("data/train")}, 0.02)
    assert (p.distillm2.contrastive, p.distillm2.beta_ramp, p.distillm2.adaptive_alpha) == (True, False, False)
    assert p.distillm2.beta == base.distillm2.beta and p.gkd == base.gkd
    assert "train.method" not in cells.SHARED_TRAIN and "train.distillm2.beta_ramp" not in cells.SHARED_TRAIN
    assert "train.launcher" not in cells.SHARED_TRAIN and (p.parallel, p.launcher.kind) == ("ddp", "python")
    with pytest.raises(ValueError, match="train: lr: must be > 0"):
        cells.cell_params({**used, "train.lr": 0.0}, cells.RunParams("kd", (), "fresh", "default", 0), 1)


def cell(
    tmp_path: Path, models_dir: Path, run: str, seed: int, params: dict, plain_models: Path | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run one cell; the plain-teacher control's inputs are the default ones unless
    `plain_models` is given (then its own folder holds them)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "compare" / f"{run}-b1-s{seed}"
    plain = tmp_path / "plain" if plain_models is not None else tmp_path
    controls = [
        *("--plain-teacher-gens", str(plain / "teacher")),
        *("--plain-pairs", str(plain / "curate")),
        *("--plain-scores", str(plain / "score")),
        *("--plain-models", str(plain_models or models_dir)),
    ]
    cmd = [
        sys.executable,
        "-m",
        "stages.compare",
        "--params",
        str(tmp_path / "params.yaml"),
        "--run",
        run,
        "--bootstrap",
        "1",
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
        "--teacher-gens",
        str(tmp_path / "teacher"),
        *controls,
        "--out",
        str(out),
        "--metrics",
        str(tmp_path / "metrics" / f"{run}-b1-s{seed}.json"),
        "--prompt-scores",
        str(tmp_path / "metrics" / f"{run}-b1-s{seed}.prompts.parquet"),
        "--live",
        str(tmp_path / "live" / f"{run}-{seed}"),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True), out


SPEC = {"disable": [], "rounds": "fresh", "teacher": "default", "online": 0}


def cell_inputs(tmp_path: Path, n_evals: int) -> tuple[list[dict], list[dict], dict]:
    """A cell's curated pairs (8) and eval prompts (`n_evals`) under `tmp_path`, and the
    smoke params cut to one short epoch: (pairs, eval prompts, params)."""
    train_pairs = [pair(i, chosen=str(i + 1), rejected=f"{i}y") for i in range(8)]
    io.write_table(tmp_path / "curate" / "curated.parquet", train_pairs, records.PAIR_SCHEMA)
    evals = [{**prompt(100 + i), "split": "eval"} for i in range(n_evals)]
    io.write_table(tmp_path / "seed" / "eval.parquet", evals, records.PROMPT_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["train"].update(epochs=1, batch_size=4, checkpoint_every=0)
    params["evaluate"].update(batch_size=4, max_new_tokens=4, speculative_prompts=2, draft_tokens=2)
    return train_pairs, evals, params


def test_a_cell_trains_and_evaluates_and_refuses_contaminated_eval_prompts(tmp_path: Path, taught_models: Path) -> None:
    train_pairs, evals, params = cell_inputs(tmp_path, 6)
    params["compare"]["runs"]["ablated"] = {
        "method": "distillm2",
        "disable": ["contrastive"],
        "rounds": "fresh",
        "teacher": "default",
        "online": 0,
    }
    done, out = cell(tmp_path, taught_models, "ablated", 3, params)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "metrics" / "ablated-b1-s3.json").read_text())
    assert (m["run"], m["method"], m["disable"], m["bootstrap"], m["seed"], m["train"]["steps"]) == (
        "ablated",
        "distillm2",
        ["contrastive"],
        1,
        3,
        2,
    )
    # the cost it trained with: distillm2 reads both responses of each of the 8 pairs
    assert m["cost"]["optimizer_steps"] == 2 and m["cost"]["sequences"] == 16 and m["cost"]["tokens"] > 16
    assert m["cost"]["seconds"] >= sum(m["seconds"].values()) - 1
    # one row of per-prompt scores per eval prompt; the cell's aggregates are their ratios of sums
    scores = pq.read_table(tmp_path / "metrics" / "ablated-b1-s3.prompts.parquet").to_pylist()
    assert [r["prompt_id"] for r in scores] == [e["prompt_id"] for e in evals]
    correct = [r["correct"] for r in scores]
    assert m["student"]["accuracy"]["exact_match"] == round(sum(correct) / len(correct), 4)
    tokens = sum(r["teacher_tokens"] for r in scores)
    assert abs(sum(r["kl_sum"] for r in scores) / tokens - m["student"]["kl_teacher_student"]) < 1e-5
    assert abs(sum(r["agree_sum"] for r in scores) / tokens - m["student"]["greedy_agreement"]) < 1e-5
    sampled = sum(r["sampled_tokens"] for r in scores)
    assert sampled > 0 and m["student"]["nll_on_sampled_responses"] > 0
    assert abs(sum(r["nll_sampled_sum"] for r in scores) / sampled - m["student"]["nll_on_sampled_responses"]) < 1e-5
    assert m["student"]["kl_initial_final"] > 0  # the trained student moved away from the initial one
    s = m["student"]
    assert s["accuracy"]["n"] == 6 and s["speculative"]["prompts"] == 2 and s["speculative"]["matches_greedy"] == 1.0
    assert s["kl_teacher_student"] > 0 and 0 <= s["greedy_agreement"] <= 1
    # one epoch in, the student may answer with nothing scorable: then the NLL is null, said so
    assert (s["nll_on_own_responses"] is None) == (s["own_response_tokens_scored"] == 0)
    assert pq.read_table(out / "predictions.parquet").num_rows == 6 and (out / "model" / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    # the shared trainer and evaluator are in its lineage; no other stage is
    assert {"distillflow/training/trainer.py", "distillflow/evaluation/evaluator.py"} <= set(manifest["code"])
    assert not {"stages/train.py", "stages/evaluate.py"} & set(manifest["code"])
    assert [g["artifact"] for g in manifest["validation"]["gates"]] == ["curated pairs"]  # train's input gate
    live = tmp_path / "live" / "ablated-3" / "plots" / "metrics"
    assert (live / "loss.tsv").read_text().splitlines()[0] == "step\tloss" and (live / "beta.tsv").is_file()
    assert len((live / "loss.tsv").read_text().splitlines()) == 1 + m["train"]["steps"]
    assert (
        manifest["train_params"]["method"] == "distillm2"
        and manifest["train_params"]["seed"] == records.replicate_seed(3, 1) == m["train_seed"]
        and "train.lr" in manifest["params"]
    )
    # the cell's thread count is its param, whatever runs beside it (recorded in its lineage)
    assert manifest["threads"] == params["compare"]["threads"] == 1 and "compare.threads" in manifest["params"]
    done, out = cell(tmp_path, taught_models, "ablated", 4, {**params, "compare": {**params["compare"], "threads": 0}})
    assert done.returncode == 2 and "compare.threads: must be >= 1; got 0" in done.stderr, done.stderr[-3000:]
    assert not out.exists()
    # an eval prompt among the training pairs: refused by the curated pairs' gate, nothing written
    io.write_table(tmp_path / "seed" / "eval.parquet", [*evals, {**prompt(0), "split": "eval"}], records.PROMPT_SCHEMA)
    done, out = cell(
        tmp_path,
        taught_models,
        "kd",
        1,
        {**params, "compare": {**params["compare"], "runs": {"kd": SPEC | {"method": "kd"}}}},
    )
    assert done.returncode == 2 and "curated pairs failed expectation" in done.stderr, done.stderr[-3000:]
    assert "prompt_id__in_eval" in done.stderr
    assert not out.exists()


def rounds_setup(tmp_path: Path) -> dict:
    """Train prompts with the teacher's responses, round 1's curated pairs, eval prompts,
    and smoke params with E = 2 (train.rounds r2)."""
    prompts = [prompt(i) for i in range(8)]
    io.write_table(tmp_path / "seed" / "train.parquet", prompts, records.PROMPT_SCHEMA)
    io.write_table(
        tmp_path / "seed" / "eval.parquet",
        [{**prompt(100 + i), "split": "eval"} for i in range(4)],
        records.PROMPT_SCHEMA,
    )
    teacher = [gen(pr, "teacher", 0, text=pr["reference"]) for pr in prompts]
    io.write_table(tmp_path / "teacher" / "generations.parquet", teacher, records.GENERATION_SCHEMA)
    pairs = [pair(i, chosen=str(i + 1), rejected=f"{i}y") for i in range(8)]
    io.write_table(tmp_path / "curate" / "curated.parquet", pairs, records.PAIR_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["train"].update(epochs=1, batch_size=4, checkpoint_every=0, rounds={"r2": {"previous": "data/train"}})
    params["student"].update(batch_size=4, shard_size=0, max_new_tokens=4)
    params["evaluate"].update(batch_size=4, max_new_tokens=4, speculative_prompts=0)
    params["curate"]["decontamination"]["enabled"] = False
    params["compare"]["runs"] = {
        "kd": SPEC | {"method": "kd"},
        "kd_stale": SPEC | {"method": "kd", "rounds": "stale"},
        "kd_plain": SPEC | {"method": "kd", "teacher": "plain"},
    }
    return params


def test_a_cell_runs_the_rounds_fresh_or_stale_and_the_plain_teacher(tmp_path: Path, taught_models: Path) -> None:
    params = rounds_setup(tmp_path)
    done, out = cell(tmp_path, taught_models, "kd", 1, params)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "metrics" / "kd-b1-s1.json").read_text())
    first, second = m["per_round"]
    assert (first["round"], second["round"], first["pairs"]) == (1, 2, 8)
    # round 2 sampled the student afresh on the 8 train prompts and paired it with the teacher's responses
    steps = second["steps"]
    assert second["pairs"] == 8 and steps["curate"]["pairs_in"] == 8
    assert steps["curate"]["kept"] + steps["curate"]["quarantined"] == 8 and second["seconds"]["data"] > 0
    # through the round function the round stage runs (stagekit/rounds.py): each step's folder and manifest
    r2 = out / "rounds" / "r2"
    for step, name in (("student", "generations"), ("pairs", "pairs"), ("curate", "curated"), ("score", "topk")):
        manifest = json.loads((r2 / step / "manifest.json").read_text())
        assert manifest["stage"] == step and "stages/compare.py" in manifest["code"]
        assert manifest["counts"] == steps[step] and (r2 / step / f"{name}.parquet").is_file()
    assert steps["score"]["rows"] == 0 and "online" in steps["score"]["skipped"]  # the trainer reads the teacher
    assert m["train"]["steps"] == first["train"]["steps"] + second["train"]["steps"]
    live = tmp_path / "live" / "kd-1" / "plots" / "metrics" / "loss.tsv"
    assert len(live.read_text().splitlines()) == 1 + second["train"]["steps"]  # the last round's log
    # the stale control: round 1's pairs again, the same number of optimizer steps, no sampling
    done, _ = cell(tmp_path, taught_models, "kd_stale", 1, params)
    assert done.returncode == 0, done.stderr[-3000:]
    stale = json.loads((tmp_path / "metrics" / "kd_stale-b1-s1.json").read_text())
    assert [r["pairs"] for r in stale["per_round"]] == [8, 8] and stale["per_round"][1]["steps"] == {}
    assert stale["per_round"][1]["seconds"]["sample"] == 0 and stale["rounds"] == "stale"
    assert stale["train"]["steps"] == m["train"]["steps"]
    assert stale["train_seed"] == m["train_seed"]  # runs of one (bootstrap, seed) share the training seed
    # the plain-teacher control reads the plain_* inputs: here a folder with other models
    plain = tmp_path / "plain"
    for sub in ("teacher", "curate"):
        shutil.copytree(tmp_path / sub, plain / sub)
    other = tmp_path / "other_models"
    shutil.copytree(taught_models, other)
    done, out = cell(tmp_path, taught_models, "kd_plain", 1, params, plain_models=other)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["teacher"]["path"].startswith(str(other))
    assert manifest["inputs"]["pairs"]["path"] == str(plain / "curate" / "curated.parquet")
    # ... and is scored against the reference (default) teacher, as every cell of the bootstrap is
    assert manifest["inputs"]["reference_models"]["path"].startswith(str(taught_models / "teacher"))
    plain_scores = pq.read_table(tmp_path / "metrics" / "kd_plain-b1-s1.prompts.parquet").to_pylist()
    kd_scores = pq.read_table(tmp_path / "metrics" / "kd-b1-s1.prompts.parquet").to_pylist()
    assert [r["teacher_correct"] for r in plain_scores] == [r["teacher_correct"] for r in kd_scores]
    assert [r["teacher_tokens"] for r in plain_scores] == [r["teacher_tokens"] for r in kd_scores]


def test_fresh_rounds_score_their_own_pairs_with_the_stored_topk_signal(tmp_path: Path, taught_models: Path) -> None:
    """With `teacher_signal: topk`, round 1 reads the score stage's file and each fresh
    round scores its own curated pairs with the teacher (the round's score step)."""
    from distillflow.engines import scoring
    from distillflow.stagekit import scorestep

    params = rounds_setup(tmp_path)
    params["train"]["teacher_signal"] = "topk"
    params["score"].update(k=4, batch_size=8, device="cpu")
    teacher, tok = load(taught_models / "teacher")
    pairs = io.read_rows(tmp_path / "curate" / "curated.parquet", records.PAIR_SCHEMA)
    batches = scoring.score_batches(teacher, tok, pairs, sp(4, 8, "cpu"))
    scorestep.stream_topk(tmp_path / "score" / "topk.parquet", batches, 16)
    done, out = cell(tmp_path, taught_models, "kd", 1, params)
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads((tmp_path / "metrics" / "kd-b1-s1.json").read_text())["per_round"][1]
    assert second["steps"]["score"]["k"] == 4 and second["steps"]["score"]["rows"] == 2 * second["pairs"] > 0
    manifest = json.loads((out / "rounds" / "r2" / "score" / "manifest.json").read_text())
    assert manifest["outputs"]["topk.parquet"]["rows"] == 2 * second["pairs"]


def test_an_online_opd_cell_samples_during_training_and_counts_what_it_sampled(
    tmp_path: Path, taught_models: Path
) -> None:
    """compare.runs.<run>.online: the cell trains with train.online.every set; its cost
    counts the sampled responses' tokens, not the stored ones."""
    train_pairs, _, params = cell_inputs(tmp_path, 4)
    params["compare"]["runs"]["opd_online"] = {**SPEC, "method": "opd", "online": 1}
    done, _ = cell(tmp_path, taught_models, "opd_online", 1, params)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "metrics" / "opd_online-b1-s1.json").read_text())
    assert (m["method"], m["online"], m["train"]["steps"]) == ("opd", 1, 2)
    sampled = m["train"]["sampled_tokens"]
    assert sampled > 0  # two samplings of 4 responses each
    prompts_tokens = sum(len(encoding.encode_pair(load(taught_models / "student")[1], pr)[0]) for pr in train_pairs)
    assert m["cost"]["tokens"] == prompts_tokens + sampled and m["cost"]["sequences"] == 8
