"""Where and as whom a data step writes (genstage, pairstep, curating, scorestep): the
student, teacher, pairs, curate and score stages each run one step on files; an
on-policy round (distillflow/stagekit/rounds.py) runs four of them in one process.

Each step gates what it reads and writes (distillflow/audit/quality.py: any failure
stops the step), writes its folder atomically with its manifest (audit/lineage.py) and
returns its counts (what the stage's metrics file holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import quality


@dataclass(frozen=True, kw_only=True)
class Writer:
    """Where and as whom a step writes (see the module doc). `used` may hold more
    sections than the step's; `only(keys)` keeps the step's own."""

    out: Path
    module: str
    used: dict[str, Any]
    docs: Path | None = None

    def only(self, sections: dict[str, Any]) -> dict[str, Any]:
        return {k: self.used[k] for k in sections}

    def gates(self) -> quality.StageGates:
        return quality.StageGates(self.used["quality"], self.docs)

    def is_step(self, stage: str) -> bool:
        """Whether the `stage` folder is one of several this process writes (a round's
        student, pairs, curate or score folder, written by stages/round.py or a comparison
        cell): its run record joins the process's one record (lineage.write_manifest)."""
        return self.module != stage


def ids(rows: list[dict[str, Any]], column: str) -> pa.Array:
    return pa.array([r[column] for r in rows], type=pa.string())
