"""bootstrap: build the embedded default's models, or fingerprint real ones.

    python -m stages.bootstrap --params params.yaml --identity data/identity.json --out data/bootstrap \
        --metrics metrics/bootstrap.json

With `models.teacher.name: toy` and `models.student.name: toy` it builds a character
tokenizer (the `tokenizers` library, saved as a transformers tokenizer folder with a
chat template) and trains two Llama models by supervised fine-tuning on the embedded
task (distillflow/tasks/):
- the teacher, on fresh draws of every non-eval prompt; a share of its sequences
  (`corrupt_share`) has one wrong step, masked out of the loss, followed by the steps
  the rule gives from the written prefix, so its next-token distribution after a
  student's mistake means something (where the skew reverse KL learns);
- the student (the paper's warm "SFT student" every method starts from), on a fixed
  set of `examples` prompts from the bucket seed keeps out of the distillation prompts
  (`task.sft_fraction`), epoch after epoch until the held-out loss is flat; its size
  and that data size set where it starts.
Toy teachers past the first of `models.teachers` are trained like the teacher, each from
a seed of its own, into out/teacher-<label>, and each passes the pre-flight gate.
With `--replicate B` (comparison/dvc.yaml's bootstraps) the models come from replicate
B's seed (records.replicate_seed of bootstrap.seed), recorded in the manifest.
With `--student-from DIR` (comparison/dvc.yaml's boot_plain, a control) it trains
only the teacher, with corrupt_share 0, and copies DIR/student: the teacher without
corrupted prefixes, beside the same warm student.
Both are saved with save_pretrained (safetensors) in out/teacher and out/student. The
metrics file records, per model, the held-out SFT loss curve and greedy accuracy on
`heldout` eval-split prompts, plain (verifier pass rate) and after a fresh corrupted
prefix (the prefix ends with the wrong step, as in training; the continuation follows
the rule from the written prefix to the right end), with the failures counted by kind.

With real models (a local folder or a hub id at a revision) it trains nothing.

Either way it is the pre-flight gate (models.preflight), the first stage that sees
both models: one tokenizer (vocabulary, merges and special tokens digest; different
tokenizers are refused while `models.cross_tokenizer` is none), a chat template, eos
and pad ids, logit widths covering the tokenizer (each may be padded past it, by
different amounts), safetensors weights. A refusal stops the run here, before any
generation, with `error:` and exit 2 naming both models and what differs. The findings
(fingerprints, widths, eos ids, max positions, ...) go into the manifest. --identity is
the identify stage's file (stages/identify.py): through it DVC reruns bootstrap, and
all that depends on it, when a local model folder changes in place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from distillflow.audit import lineage
from distillflow.base import models, params, records
from distillflow.base.config import BootstrapParams, ModelsParams, TaskParams
from distillflow.base.errors import ModelError, ParamsError
from distillflow.base.io import atomic_dir, write_json
from distillflow.stagekit import entry

SECTIONS: dict[str, type] = {"models": ModelsParams, "task": TaskParams, "bootstrap": BootstrapParams}
PARAMS = tuple(SECTIONS)


def run(
    models_p: ModelsParams, task: TaskParams, p: BootstrapParams, out: Path, student_from: Path | None = None
) -> dict[str, Any]:
    """Build the toy models into `out` (nothing for real models); returns metrics.

    Real models are only described (fingerprint, architecture), in the manifest.
    `student_from` (the comparison's control): train only the teacher, with
    corrupt_share 0 (no corrupted prefixes), and copy the student from that folder.
    """
    extra = models_p.teacher_set().teachers[1:]
    toy = [m.name == "toy" for m in (models_p.teacher, models_p.student, *(t.ref for t in extra))]
    if any(toy) and not all(toy):
        raise ModelError(
            "models: teacher and student (and every models.teachers entry) must all be `toy` or all be real models; "
            "the toy tokenizer fits nothing else"
        )
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    if all(toy):
        from distillflow.stagekit import toymodels  # only for toy models: a real run never loads the toy task

        metrics = toymodels.build(task, p, out, student_from, tuple(t.role for t in extra))
    elif student_from is not None:
        raise ModelError("bootstrap --student-from: the plain-teacher control trains a toy teacher; models are not toy")
    return metrics


def main() -> None:
    args = entry.parse_paths(
        __doc__, "identity", "out", "metrics", optional=("student_from",), optional_values={"replicate": int}
    )
    sections = params.load_sections(args.params, SECTIONS)
    if (args.replicate is not None or args.student_from is not None) and sections["models"].teacher_set().several:
        raise ParamsError("models.teachers: the comparison distils from models.teacher alone; set models.teachers: []")
    if args.replicate is not None:  # a comparison bootstrap: the models from that replicate's seed
        b: BootstrapParams = sections["bootstrap"]
        sections["bootstrap"] = dataclasses.replace(b, seed=records.replicate_seed(b.seed, args.replicate))
    with atomic_dir(args.out) as tmp:
        m: ModelsParams = sections["models"]
        metrics = run(m, sections["task"], sections["bootstrap"], tmp, args.student_from)
        # The pre-flight gate, before any stage generates: its findings go into the manifest.
        gate = models.preflight(m.teacher.ref(), m.student.ref(), tmp, m.trust_remote_code, m.cross_tokenizer)
        for t in m.teacher_set().teachers[1:]:  # every further teacher against the student too
            found = models.preflight(t.ref, m.student.ref(), tmp, m.trust_remote_code, m.cross_tokenizer, t.role)
            gate.setdefault("teachers", {})[t.label] = found["teacher"]
        lineage.write_manifest(
            tmp,
            "bootstrap",
            sections,
            inputs={
                "identity": args.identity,
                **({"student": args.student_from / "student"} if args.student_from else {}),
            },
            outputs={},
            counts={},
            extra={"models": gate},
        )
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    entry.run_stage(main)
