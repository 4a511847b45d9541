"""The comparison's cells (params.yaml `compare.runs` x `compare.bootstraps` x `compare.seeds`): what a cell
trains with. Used by stages/compare.py (one cell) and stages/report.py (the table)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_type_hints

from distillflow.base import params
from distillflow.base.params import check
from distillflow.training.methods import METHODS
from distillflow.training.train_params import TrainParams

# The methods with ablation switches (Method.switches: boolean fields of their params section).
ABLATABLE = {m.name: m for m in METHODS.values() if m.switches}


@dataclass(frozen=True)
class RunParams:
    """One entry of params.yaml `compare.runs`: a method and the ablation switches it
    declares (distillm2's) turned off (not named `off`: YAML 1.1 reads that key as false);
    which rounds and teacher it trains with. The controls: `rounds: stale` trains every
    round on round 1's pairs (one stale round of student samples, the same optimizer
    steps as E fresh ones); `teacher: plain` distils the teacher bootstrap trained
    without corrupted prefixes (comparison/dvc.yaml's boot_plain stage, per bootstrap)."""

    method: str  # a name in distillflow.training.methods.METHODS
    disable: tuple[str, ...]  # the method's ablation switches turned off (distillm2's); [] = the full method
    # fresh: each round samples the student again | stale: every round trains on round 1's pairs
    rounds: Literal["fresh", "stale"]
    # default: the bootstrap teacher | plain: the one trained without corrupted prefixes
    teacher: Literal["default", "plain"]
    online: int  # train.online.every for this run: K > 0 samples the student every K steps in training; 0 = off

    @property
    def label(self) -> str:
        """The run's method as the report names it: with train.online, how often it samples."""
        return f"{self.method} (online, every {self.online} steps)" if self.online else self.method

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", f"{self.method!r} is not one of {list(METHODS)}")
        check(
            not self.disable or self.method in ABLATABLE,
            "disable",
            f"switches belong to {', '.join(ABLATABLE)}, not {self.method}",
        )
        check(self.online >= 0, "online", "must be >= 0 (train.online.every; 0 = off)")
        for s in self.disable:
            switches = list(METHODS[self.method].switches)
            check(s in switches, "disable", f"unknown switch {s!r}; {self.method}'s switches are {switches}")


# The train settings a cell shares with the train stage: all but what the cell sets
# itself (method, seed, the ablation switches, and one process: a cell trains inside
# its stage, never under train.launcher); train.rounds gives the cell its E rounds.
# Listing them one by one keeps DVC from rerunning every cell when train.method changes.
SECTIONS = {m.params_section: m.switches for m in ABLATABLE.values()}  # train.<section>: its switches
ONE_PROCESS = {"parallel": "ddp", "launcher": {"kind": "python", "nproc_per_node": 1, "args": []}}
# train.online: the run sets `every` (RunParams.online), the rest is shared
PARTLY_OWN = {**SECTIONS, "online": ("every",)}
OWN = ("method", "seed", *ONE_PROCESS, *PARTLY_OWN)
SHARED_TRAIN = tuple(f"train.{f.name}" for f in fields(TrainParams) if f.name not in OWN) + tuple(
    f"train.{section}.{f.name}"
    for section, own in PARTLY_OWN.items()
    for f in fields(get_type_hints(TrainParams)[section])
    if f.name not in own
)


def cell_params(used: dict[str, Any], run: RunParams, seed: int) -> TrainParams:
    """TrainParams from the shared train settings (train.rounds included: a cell runs
    the default pipeline's E rounds) plus this cell's method, switches, online sampling
    (train.online.every) and seed;
    checked as strictly as the train stage's own."""
    raw: dict[str, Any] = {
        "method": run.method,
        "seed": seed,
        **ONE_PROCESS,  # train.parallel is unused in one process
        **{section: {s: s not in run.disable for s in switches} for section, switches in SECTIONS.items()},
        "online": {"every": run.online},
    }
    for key in SHARED_TRAIN:
        *parents, leaf = key.split(".")[1:]
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = used[key]
    return params.build(TrainParams, raw, "train")
