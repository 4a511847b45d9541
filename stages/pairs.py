"""pairs: join teacher and student responses into preference pairs, on ids (distillflow/data/pairing.py).

    python -m stages.pairs --params params.yaml --prompts data/seed --teacher data/teacher \
        --student data/student --out data/pairs --metrics metrics/pairs.json

Output rows follow TRL's preference format (prompt, chosen = teacher response,
rejected = student response) plus the ids of all three parts and the facts curate
needs (finish reasons, token counts, the reference answer where there is one).

With n teacher and m student samples for a prompt, pair k (k < max(n, m)) takes teacher
sample k mod n and student sample k mod m. A prompt without a teacher or a student
response is quarantined (its prompt's columns + `reason`); a generation whose prompt
id is not among the prompts is an upstream mismatch and stops the stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillflow.base import params, records
from distillflow.base.io import read_rows, write_json
from distillflow.data import pairing
from distillflow.data.pairing import QUARANTINE_SCHEMA, PairsParams
from distillflow.stagekit import entry, pairstep
from distillflow.stagekit.writer import Writer

__all__ = ["SECTIONS", "PARAMS", "PairsParams", "QUARANTINE_SCHEMA", "run", "main"]

log = logging.getLogger("pairs")

SECTIONS: dict[str, Any] = pairstep.PAIRS_SECTIONS
PARAMS = tuple(SECTIONS)


def run(
    p: PairsParams,
    prompts: list[dict[str, Any]],
    teacher: list[dict[str, Any]],
    student: list[dict[str, Any]],
    files: tuple[Path, Path] = (Path("teacher"), Path("student")),
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(pairs, quarantine, counts): distillflow/data/pairing.py's `build`."""
    return pairing.build_pairs(p, prompts, teacher, student, files)


def main() -> None:
    args = entry.parse_paths(__doc__, "prompts", "teacher", "student", "out", "metrics", optional=("docs",))
    used = params.load_sections(args.params, SECTIONS)
    files = {
        "prompts": args.prompts / "train.parquet",
        "teacher": args.teacher / "generations.parquet",
        "student": args.student / "generations.parquet",
    }
    prompts = read_rows(files["prompts"], records.PROMPT_SCHEMA)
    teacher = read_rows(files["teacher"], records.GENERATION_SCHEMA)
    student = read_rows(files["student"], records.GENERATION_SCHEMA)
    w = Writer(out=args.out, module="pairs", used=used, docs=args.docs)
    counts = pairstep.write_pairs(w, prompts, teacher, student, files)
    write_json(args.metrics, counts)
    log.info(
        "pairs: %d pairs from %d prompts, %d prompts quarantined",
        counts["pairs"],
        counts["prompts"],
        counts["prompts_quarantined"],
    )


if __name__ == "__main__":
    entry.run_stage(main)
