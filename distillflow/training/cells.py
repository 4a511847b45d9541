"""The comparison's cells (params.yaml `compare.runs` x `compare.seeds`): what a cell
trains with. Used by stages/compare.py (one cell) and stages/report.py (the table)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from distillflow.base import params
from distillflow.base.params import check
from distillflow.training.objectives import DistiLLM2Params, Method
from distillflow.training.train_params import TrainParams

SWITCHES = ("contrastive", "beta_ramp", "adaptive_alpha")


@dataclass(frozen=True)
class RunParams:
    """One entry of params.yaml `compare.runs`: a method and, for distillm2, the
    ablation switches turned off (not named `off`: YAML 1.1 reads that key as false);
    which rounds and teacher it trains with. The controls: `rounds: stale` trains every
    round on round 1's pairs (one stale round of student samples, the same optimizer
    steps as E fresh ones); `teacher: plain` distils the teacher bootstrap trained
    without corrupted prefixes (comparison/dvc.yaml's plain_* stages)."""

    method: Method
    disable: tuple[str, ...]
    rounds: Literal["fresh", "stale"]
    teacher: Literal["default", "plain"]

    def __post_init__(self) -> None:
        for s in self.disable:
            check(s in SWITCHES, "disable", f"unknown switch {s!r}; DistiLLM-2's switches are {list(SWITCHES)}")
        check(
            not self.disable or self.method == "distillm2",
            "disable",
            f"switches belong to distillm2, not {self.method}",
        )


# The train settings a cell shares with the train stage: all but what the cell sets
# itself (method, seed, DistiLLM-2's switches); train.rounds gives the cell its E rounds.
# Listing them one by one keeps DVC from rerunning every cell when train.method changes.
OWN = ("method", "seed", "distillm2")
SHARED_TRAIN = tuple(f"train.{f.name}" for f in fields(TrainParams) if f.name not in OWN) + tuple(
    f"train.distillm2.{f.name}" for f in fields(DistiLLM2Params) if f.name not in SWITCHES
)


def cell_params(used: dict[str, Any], run: RunParams, seed: int) -> TrainParams:
    """TrainParams from the shared train settings (train.rounds included: a cell runs
    the default pipeline's E rounds) plus this cell's method, switches and seed;
    checked as strictly as the train stage's own."""
    raw: dict[str, Any] = {
        "method": run.method,
        "seed": seed,
        "distillm2": {s: s not in run.disable for s in SWITCHES},
    }
    for key in SHARED_TRAIN:
        *parents, leaf = key.split(".")[1:]
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = used[key]
    return params.build(TrainParams, raw, "train")
