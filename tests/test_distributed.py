"""Data-parallel training on CPU (gloo, 2 processes) through the real entry points:
`python -m stages.train` and `python -m stages.round` with `train.launcher` naming
torchrun, as dvc.yaml runs them. DDP and FSDP2 give the single-process run's per-step
loss and final weights for the same global batch; a killed 2-process run resumes from
its checkpoint (sharded under FSDP2) to the uninterrupted run's weights; a round under
torchrun writes the one-process round's data and trains to its weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distillflow.base import io, records
from distillflow.base.config import LauncherParams
from distillflow.stagekit import launch

from .builders import gen, live_rows, pair, prompt
from .conftest import ROOT

PY = sys.executable
ONE = {"kind": "python", "nproc_per_node": 1, "args": []}
TWO = {"kind": "torchrun", "nproc_per_node": 2, "args": []}
TWO_ACCELERATE = {"kind": "accelerate", "nproc_per_node": 2, "args": []}


def setup_run(tmp_path: Path, n_pairs: int, **train: object) -> None:
    """tmp_path/curate (n_pairs pairs) and the smoke profile with `train` overrides."""
    pairs = [pair(i, chosen=str(i + 1), rejected=f"{i}y", rf="length" if i % 3 else "stop") for i in range(n_pairs)]
    io.write_table(tmp_path / "curate" / "curated.parquet", pairs, records.PAIR_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["train"].update(epochs=2, batch_size=4, grad_accum_steps=2, checkpoint_every=0, chunk_size=8)
    params["train"]["distillm2"]["reference_batches"] = 1
    params["train"]["gkd"]["lmbda"] = 0.5
    params["train"].update(train)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def params_file(folder: Path, name: str, **train: object) -> str:
    """folder/<name>.yaml: folder/params.yaml with these `train` overrides; its path."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"].update(train)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(params))
    return str(folder / f"{name}.yaml")


def train_cmd(tmp_path: Path, models_dir: Path, name: str, launcher: dict, parallel: str) -> list[str]:
    """`python -m stages.train ...` as dvc.yaml writes it, on a params file of its own."""
    out = tmp_path / name
    return [
        *(PY, "-m", "stages.train", "--params", params_file(tmp_path, name, launcher=launcher, parallel=parallel)),
        *("--pairs", str(tmp_path / "curate"), "--scores", str(tmp_path / "score")),
        *("--models", str(models_dir), "--out", str(out / "train")),
        *("--metrics", str(out / "m.json"), "--live", str(out / "live")),
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / name / "train" / "model" / "model.safetensors")


@dataclass(frozen=True)
class Runs:
    """The module's runs of one configuration: `folder/<name>/` each."""

    folder: Path
    models: Path

    def cmd(self, name: str, launcher: dict, parallel: str) -> list[str]:
        return train_cmd(self.folder, self.models, name, launcher, parallel)


@pytest.fixture(scope="module")
def runs(taught_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """One configuration: 64 pairs, 3 epochs of 4-pair micro-batches, 2 a step (24 steps,
    so DDP's no_sync and FSDP2's deferred reduce-scatter are used), a checkpoint every 4
    steps; run in one process and under FSDP2 on 2 (torchrun, launched by train.launcher)."""
    r = Runs(tmp_path_factory.mktemp("distributed"), taught_models)
    setup_run(r.folder, 64, epochs=3, checkpoint_every=4)
    run(r.cmd("single", ONE, "ddp"))  # one process: train.parallel is not used
    done = run(r.cmd("fsdp", TWO, "fsdp"))
    assert "torch.distributed.run --nproc-per-node 2 --standalone -m stages.train" in done.stderr
    return r


def test_ddp_and_fsdp2_on_two_processes_give_the_single_process_run(runs: Runs) -> None:
    """Same global batch: per-step loss, the adaptive alpha and the final weights within
    1e-5 relative of one process, under FSDP2 and DDP launched by torchrun and DDP
    launched by accelerate."""
    done = run(runs.cmd("ddp", TWO, "ddp"))
    assert "torch.distributed.run --nproc-per-node 2 --standalone -m stages.train" in done.stderr
    done = run(runs.cmd("accelerate", TWO_ACCELERATE, "ddp"))
    assert "accelerate launch --num_processes 2 --multi_gpu -m stages.train" in done.stderr
    single, w1 = live_rows(runs.folder / "single" / "live"), weights(runs.folder, "single")
    assert len(single) == 24
    for name in ("fsdp", "ddp", "accelerate"):
        two = live_rows(runs.folder / name / "live")
        assert len(two) == 24
        for a, b in zip(single, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["alpha_t_mean"] == pytest.approx(a["alpha_t_mean"], rel=1e-5), name
        w2 = weights(runs.folder, name)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")
        assert json.loads((runs.folder / name / "m.json").read_text())["steps"] == 24


def round_cmd(folder: Path, models_dir: Path, name: str, launcher: dict) -> list[str]:
    """`python -m stages.round ...` as dvc.yaml writes it: round 2 after the module's
    one-process train run (its --previous), on a params file of its own."""
    previous = folder / "single" / "train"
    rounds = {"r2": {"previous": str(previous)}}
    out = folder / name
    return [
        *(
            PY,
            "-m",
            "stages.round",
            "--params",
            params_file(folder, name, launcher=launcher, parallel="ddp", rounds=rounds),
        ),
        *("--prompts", str(folder / "seed"), "--teacher", str(folder / "teacher"), "--models", str(models_dir)),
        *("--previous", str(previous), "--out", str(out / "round"), "--metrics", str(out / "m.json")),
        *("--live", str(out / "live")),
    ]


def test_the_round_stage_under_torchrun_gives_the_one_process_round(runs: Runs) -> None:
    """Round 2 after the module's one-process train, run in one process and under
    torchrun (2 processes, DDP): rank 0 alone samples, pairs, curates and scores, so
    those folders' tables are the one-process round's bytes (the samples' log-probs to
    float rounding: rank 0 runs another thread count); both ranks then train on them, to
    the one-process round's per-step losses and weights within 1e-5 relative."""
    f = runs.folder
    prompts = [prompt(i) for i in range(64)]  # the module's pairs' prompts (builders.pair)
    io.write_table(f / "seed" / "train.parquet", prompts, records.PROMPT_SCHEMA)
    io.write_table(f / "seed" / "eval.parquet", [prompt(1000)], records.PROMPT_SCHEMA)
    teacher = [gen(pr, "teacher", 0, text=pr["reference"]) for pr in prompts]  # right answers: curate keeps them
    io.write_table(f / "teacher" / "generations.parquet", teacher, records.GENERATION_SCHEMA)
    run(round_cmd(f, runs.models, "round-one", ONE))
    done = run(round_cmd(f, runs.models, "round-two", TWO))
    assert "torch.distributed.run --nproc-per-node 2 --standalone -m stages.round" in done.stderr
    one, two = f / "round-one" / "round", f / "round-two" / "round"
    tables = sorted(p.relative_to(one) for p in one.rglob("*.parquet") if p.parts[-3:-1] != ("train", "model"))
    assert {t.parts[0] for t in tables} >= {"student", "pairs", "curate", "score"}, tables
    assert tables == sorted(p.relative_to(two) for p in two.rglob("*.parquet") if p.parts[-3:-1] != ("train", "model"))
    for t in tables:
        if t == Path("student", "generations.parquet"):
            a, b = (io.read_rows(d / t, records.GENERATION_SCHEMA) for d in (one, two))
            assert [{**r, "token_logprobs": None} for r in b] == [{**r, "token_logprobs": None} for r in a]
            lps = [torch.tensor(r["token_logprobs"]) for r in (*a, *b)]
            torch.testing.assert_close(torch.cat(lps[len(a) :]), torch.cat(lps[: len(a)]), atol=1e-5, rtol=0)
            continue
        assert (two / t).read_bytes() == (one / t).read_bytes(), t
    steps = json.loads((f / "round-one" / "m.json").read_text())["train"]["steps"]
    assert steps > 1 and json.loads((f / "round-two" / "m.json").read_text())["train"]["steps"] == steps
    a, b = live_rows(f / "round-one" / "live"), live_rows(f / "round-two" / "live")
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    w1 = load_file(one / "train" / "model" / "model.safetensors")
    w2 = load_file(two / "train" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-7, msg=k)


def kill_after_checkpoint(cmd: list[str], ckpt: Path) -> str:
    """Start `cmd` in a process group of its own; SIGKILL the launcher and its ranks
    once a checkpoint is written. Its output."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (ckpt / "state.pt").is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own: kill them, then the launcher
    ranks = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for rank in ranks:
        os.killpg(rank, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert len(ranks) == 2, out[-3000:]
    return out


def test_a_killed_fsdp2_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(runs: Runs) -> None:
    """The FSDP2 run again, killed (launcher and ranks) once its first sharded checkpoint
    (one file per rank) is written; the rerun resumes from it and ends with the
    uninterrupted run's weights and log, bit for bit. (DDP's checkpoint is the
    one-process file: rank 0 writes it, every rank loads it into the module DDP wraps;
    tests/test_train.py resumes that file in one process.)"""
    cmd = runs.cmd("killed", TWO, "fsdp")
    ckpt = runs.folder / "killed" / "train.checkpoints"
    kill_after_checkpoint(cmd, ckpt)
    saved = torch.load(ckpt / "state.pt", weights_only=True)
    assert 4 <= saved["step"] < 24
    assert "student" not in saved and len(list((ckpt / saved["shards"]).glob("*.distcp"))) == 2
    done = run(cmd)
    assert f"resuming at step {saved['step']} of 24" in done.stderr
    assert not ckpt.exists()  # cleared once complete
    straight, resumed = weights(runs.folder, "fsdp"), weights(runs.folder, "killed")
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    assert live_rows(runs.folder / "killed" / "live") == live_rows(runs.folder / "fsdp" / "live")


def test_launcher_commands() -> None:
    """What train.launcher turns `python -m stages.train ARGS` into (no process started)."""
    lp = LauncherParams(kind="torchrun", nproc_per_node=4, args=("--nnodes=2", "--rdzv-endpoint=h:29500"))
    cmd = launch.command(lp, "stages.train", [])
    assert cmd == [PY, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes=2", "--rdzv-endpoint=h:29500"]
    assert launch.command(LauncherParams(kind="python", nproc_per_node=1, args=()), "stages.train", []) is None
    with pytest.raises(ValueError, match="kind python runs one process"):
        LauncherParams(kind="python", nproc_per_node=2, args=())
    accel = launch.command(LauncherParams(kind="accelerate", nproc_per_node=2, args=("--use_fsdp",)), "m", [])
    assert accel is not None and accel[1:] == [
        "launch",
        "--num_processes",
        "2",
        "--use_fsdp",
    ]  # its mode, no --multi_gpu


def test_a_launcher_that_starts_one_process_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate with --cpu runs the stage as one plain process (no RANK): the stage,
    already relaunched once (the mark in its environment), refuses rather than train
    alone or relaunch itself again."""
    setup_run(tmp_path, 8)
    argv = train_cmd(
        tmp_path, Path("models"), "one", {"kind": "accelerate", "nproc_per_node": 2, "args": ["--cpu"]}, "ddp"
    )
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv(launch.MARK, "accelerate")
    with pytest.raises(SystemExit) as stop:
        launch.relaunch("stages.train", argv[3:])
    assert stop.value.code == 2
    monkeypatch.setenv("RANK", "0")  # started by a launcher: the stage runs
    launch.relaunch("stages.train", argv[3:])
