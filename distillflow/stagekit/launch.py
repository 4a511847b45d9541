"""`train.launcher`: the train and round stages start themselves under a launcher.

dvc.yaml's commands stay `python -m stages.train ...` and `python -m stages.round ...`;
before its main() such a stage reads `train.launcher` from the params file and, unless a
launcher already started it (RANK in the environment), replaces itself with

    python -m torch.distributed.run --nproc-per-node N [--standalone] ARGS... -m stages.train ...
    accelerate launch --num_processes N [--multi_gpu] ARGS... -m stages.train ...

with the same arguments. `kind: python` (the default) runs the stage as it is. So
`dvc repro`, `distillflow run` and a hand-typed `python -m stages.train ...` launch the
same processes. torchrun gets `--standalone` (a rendezvous on a free local port) when
`args` is empty; multi-node runs name their rendezvous in `args`. accelerate gets
`--multi_gpu` (its launcher of several processes, torchrun's, which runs gloo on CPU
too) unless `args` names another mode; `--cpu` would run one process, which the
relaunched stage refuses. Each rank then trains
its share (distillflow/training/distributed.py, `train.parallel`). The process is
replaced, not wrapped: a stop of the stage (its process group) reaches every rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from distillflow.base import params
from distillflow.base.config import LauncherParams
from distillflow.base.errors import UsageError

MARK = "DISTILLFLOW_LAUNCHED"  # set in the launcher's environment: a stage relaunches once


def launched() -> bool:
    """Whether a launcher started this process (torchrun and accelerate set RANK)."""
    return "RANK" in os.environ


def command(lp: LauncherParams, module: str, argv: list[str]) -> list[str] | None:
    """The command that runs `python -m module argv` under `lp`; None for kind python."""
    if lp.kind == "python":
        return None
    n = str(lp.nproc_per_node)
    if lp.kind == "torchrun":
        standalone = [] if lp.args else ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", n, *standalone, *lp.args]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        raise UsageError(
            "train.launcher.kind accelerate: no `accelerate` command beside this Python or on PATH; "
            "pip install accelerate (the `accelerate` extra), or use kind torchrun"
        )
    # accelerate's launcher of several processes is --multi_gpu (torchrun's, gloo on CPU)
    # unless the args pick another mode
    modes = {"--multi_gpu", "--use_deepspeed", "--use_fsdp", "--cpu", "--tpu"}
    mode = ["--multi_gpu"] if lp.nproc_per_node > 1 and not modes & set(lp.args) else []
    return [accelerate, "launch", "--num_processes", n, *mode, *lp.args]


def relaunch(module: str, argv: list[str] | None = None) -> None:
    """Replace this process with `module` under `train.launcher` when that names a
    launcher and none started this process; return otherwise. A refusal ends the
    process as a stage's does (entry.run_stage): `error: <message>`, exit status 2."""
    try:
        _relaunch(module, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _relaunch(module: str, argv: list[str] | None) -> None:
    if launched():
        return
    if MARK in os.environ:  # relaunched, yet no rank: the launcher ran the stage as one process
        raise UsageError(
            f"train.launcher: {os.environ[MARK]} started this stage without RANK/WORLD_SIZE (one process, not "
            "several); check train.launcher.args (accelerate's --cpu, for one, runs a single process)"
        )
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", type=Path, required=True)
    known, _ = parser.parse_known_args(argv)
    lp: LauncherParams = params.load_sections(known.params, {"train.launcher": LauncherParams})["train.launcher"]
    cmd = command(lp, module, argv)
    if cmd is None:
        return
    cmd += ["-m", module, *argv]
    print(f"launch: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, {**os.environ, MARK: lp.kind})
