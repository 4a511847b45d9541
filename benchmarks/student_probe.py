"""The warm student alone: train bootstrap's student with some of `bootstrap.student`
changed and measure it as bootstrap does (held-out accuracy, plain and after a
corrupted prefix, and the held-out loss curve), without training the teacher.

    python benchmarks/student_probe.py NAME '{"examples": 0}' [--params params.yaml] [--out DIR]

One torch thread, so two probes run side by side on 2 cores. Writes the model to
DIR/NAME (default /tmp/student_probe) and its metrics to DIR/NAME.json, and prints the
held-out accuracy, the parameter count and the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from distillflow.base import models, params
from distillflow.base.config import BootstrapParams, TaskParams
from distillflow.stagekit import toymodels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="the probe's name: its folder and metrics file")
    ap.add_argument("changes", help="bootstrap.student fields to change, as JSON, e.g. '{\"hidden_size\": 64}'")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/student_probe"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = params.load_sections(args.params, {"task": TaskParams, "bootstrap": BootstrapParams})
    task, p = s["task"], s["bootstrap"]
    changes = json.loads(args.changes)
    mp = dataclasses.replace(p.student, **changes)
    heldout = toymodels.heldout_examples(task, p.seed * 100 + 99, p.heldout)  # bootstrap's own held-out prompts
    t0 = time.perf_counter()
    tok = models.build_char_tokenizer()
    m = toymodels.build_one("student", mp, p.seed * 100 + 1, tok, task, p, heldout, args.out / args.name)
    m |= {"wall_seconds": round(time.perf_counter() - t0, 1), "changes": changes}
    (args.out / f"{args.name}.json").write_text(json.dumps(m, indent=1))
    print(args.name, changes, m["plain"], m["parameters"], m["wall_seconds"])


if __name__ == "__main__":
    main()
