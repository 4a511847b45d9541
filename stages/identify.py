"""identify: the identity of the configured models, so DVC sees a model folder change.

    python -m stages.identify --params params.yaml --out data/identity.json

DVC tracks the files dvc.yaml names; a model folder named in params.yaml
(`models.teacher.name: /models/qwen-7b`) is not one of them, so editing it in place (new
weights, tokenizer, chat template or generation_config) would rerun nothing. This stage
runs on every `dvc repro` (`always_changed: true` in dvc.yaml; it reads only file
digests, no model) and writes each model's fingerprint (distillflow/base/identity.py:
every file of a local folder that can change outputs; a hub id at its revision; `toy`
for the models bootstrap builds, whose identity is bootstrap's own params and code).
bootstrap depends on the file: when a folder changed, the fingerprint changes and
bootstrap, and everything downstream of it, reruns; when nothing changed the file is
byte-identical and DVC reruns nothing else.
"""

from __future__ import annotations

from typing import Any

from distillflow.base import identity, params
from distillflow.base.config import TEACHER_SECTIONS, ModelParams, teachers_of
from distillflow.base.identity import ModelRef
from distillflow.base.io import write_json
from distillflow.stagekit import entry

SECTIONS: dict[str, Any] = {**TEACHER_SECTIONS, "models.student": ModelParams}
PARAMS = tuple(SECTIONS)


def fingerprints(
    teacher: ModelParams, student: ModelParams, more: tuple[tuple[str, ModelRef], ...] = ()
) -> dict[str, dict[str, Any]]:
    """{role: {name, revision, fingerprint}}: `toy` models are built later, by bootstrap.
    `more`: (folder, ref) of every teacher past the first (models.teachers)."""
    refs = [("teacher", teacher.ref()), ("student", student.ref()), *more]
    return {
        role: {
            "name": m.name,
            "revision": m.revision,
            "fingerprint": "toy (built by bootstrap)" if m.name == "toy" else identity.fingerprint(m.name, m.revision),
        }
        for role, m in refs
    }


def main() -> None:
    args = entry.parse_paths(__doc__, "out")
    used = params.load_sections(args.params, SECTIONS)
    more = tuple((t.role, t.ref) for t in teachers_of(used).teachers[1:])
    write_json(args.out, fingerprints(used["models.teacher"], used["models.student"], more))


if __name__ == "__main__":
    entry.run_stage(main)
