"""teacher: sample the teacher's responses ("chosen") for every training prompt.

    python -m stages.teacher --params params.yaml --prompts data/seed --models data/bootstrap \
        --out data/teacher --metrics metrics/teacher.json

Reads `models.teacher`, `models.trust_remote_code`, `models.dtype` and the `teacher`
sampling section; writes data/teacher/generations.parquet and its manifest. With
several teachers (`models.teachers`, `models.routing`: docs/training.md) each samples
its prompts (all of them under mix, its routed ones under route) and each record names
its teacher in the `teacher` column. The
shared logic lives in distillflow/stagekit/genstage.py (the student stage is the same with the
student model).
"""

from __future__ import annotations

from distillflow.stagekit import entry, genstage

SECTIONS = genstage.sections("teacher")
PARAMS = tuple(SECTIONS)
PARTS = True  # `distillflow run --ray-parts N` may run it in N parts (--part K/N): engines/parts.py

if __name__ == "__main__":
    entry.run_stage(lambda: genstage.main("teacher", __doc__))
