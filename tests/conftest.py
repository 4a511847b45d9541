"""Shared fixtures: offline environment, tiny real models built locally."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

# No hub in tests, ever: everything is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
# The suite runs on 2 pytest-xdist workers (pyproject.toml), so two processes of 2 torch
# threads each share 2 cores. OpenMP's default spin-waiting then stalls both: a bootstrap
# step took 17x its time alone, 1.9x with passive waiting (docs/results.md, "Stages side
# by side"). Waiting changes no arithmetic.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest  # noqa: E402
import torch  # noqa: E402

from distillflow.base import models  # noqa: E402
from distillflow.training import basics

from .flowkit import Server, prefect_server

ROOT = Path(__file__).resolve().parents[1]

# The slowest modules first, so the two xdist workers (`--dist loadfile`: a module's tests
# share one worker and its module fixtures) do not finish one long module last. From
# `pytest --durations`, the seconds each module's tests took in one serial run.
SLOWEST_FIRST = (
    "test_pipeline.py",
    "test_flows.py",
    "test_ray.py",
    "test_pipeline_realarch.py",
    "test_distributed.py",
    "test_bad_input.py",
    "test_lineage.py",
    "test_compare.py",
    "test_train.py",
    "test_vllm.py",
    "test_preflight.py",
    "test_generation.py",
    "test_bootstrap.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `prefect server start` for the module's flow runs (tests/flowkit.py)."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `teacher/` and `student/`: tiny random Llamas with the toy tokenizer."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny_models")
    tok = models.build_char_tokenizer()
    for role, seed, width in (("teacher", 0, 32), ("student", 1, 16)):
        arch = models.ToyArch(hidden_size=width, num_layers=1, num_heads=2, intermediate_size=2 * width)
        model = models.build_toy_model(arch, len(tok), tok, seed=seed, max_positions=64)
        basics.save_model(model, tok, root / role)
    return root


@pytest.fixture(scope="session")
def taught_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_models, but the teacher has had 80 SFT steps on the toy task, so it is
    confident on right answers where the student is not (what adaptive alpha reacts to)."""
    from .builders import toy_bootstrap

    return toy_bootstrap(tmp_path_factory.mktemp("taught_models"), 32, 80, 64)


def copy_repo(dst: Path) -> Path:
    """The repo's tracked and untracked (not ignored) files, minus outputs, the committed
    comparison report and both pipelines' dvc.lock (they record the default params' run),
    with the smoke profile as params.yaml, committed to a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        outputs = ("data/", "metrics/", "plots/", "reports/comparison/")
        if (ROOT / f).is_file() and not f.startswith(outputs) and not f.endswith("dvc.lock"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    shutil.copy(ROOT / "profiles" / "smoke.yaml", dst / "params.yaml")
    ident = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "smoke"]):
        subprocess.run(cmd, cwd=dst, env={**os.environ, **ident}, capture_output=True, text=True, check=True)
    return dst


@pytest.fixture(scope="session")
def realarch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-architecture tiny models (tests/realarch.py), built once: `tokenizer`, `teacher`
    (Qwen2, untied, 64 padded logit rows), `student` (Llama, tied, 16 padded rows) and
    `prompts` (a local HF dataset folder); byte-level BPE, ChatML with a system turn, two eos ids."""
    from . import realarch as builder

    return builder.build(tmp_path_factory.mktemp("realarch"))
