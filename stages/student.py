"""student: sample the current student's responses ("rejected") for every training prompt.

    python -m stages.student --params params.yaml --prompts data/seed --models data/bootstrap \
        --out data/student --metrics metrics/student.json

Reads `models.student`, `models.trust_remote_code`, `models.dtype` and the `student`
sampling section; writes data/student/generations.parquet and its manifest. The
shared logic lives in distillflow/stagekit/genstage.py (the teacher stage is the same with the
teacher model).
"""

from __future__ import annotations

from distillflow.stagekit import entry, genstage

SECTIONS = genstage.sections("student")
PARAMS = tuple(SECTIONS)
PARTS = True  # `distillflow run --ray-parts N` may run it in N parts (--part K/N): engines/parts.py

if __name__ == "__main__":
    entry.run_stage(lambda: genstage.main("student", __doc__))
