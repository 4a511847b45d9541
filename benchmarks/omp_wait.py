"""Stages side by side on a small machine: OpenMP's spin-waiting against passive waiting.

`distillflow run --jobs N` runs independent stages at once (teacher and student
generation; a comparison's bootstrap replicates), each with 2 torch threads
(distillflow/stagekit/entry.py). On 2 cores two such processes hold 4 threads, and
OpenMP's default wait policy spins a thread that waits at a barrier, taking the core
from the other process's thread that has work. With OMP_WAIT_POLICY=PASSIVE a waiting
thread sleeps. The flow sets PASSIVE for its stage processes (distillflow/orchestration/
dvc_ops.py) unless the environment sets a policy; the test suite sets it for its two
workers (tests/conftest.py). The policy changes how threads wait, not what they compute.

This times a bootstrap teacher training step (benchmarks/bootstrap_step.py, "as
bootstrap trains", 2 threads) in one process alone and in two processes at once, under
each policy, in one run: the mean ms per step of each process and the slowdown against
the process alone.

Run:
    python benchmarks/omp_wait.py              # 24 timed steps per process
    python benchmarks/omp_wait.py --quick      # 2 timed steps: a smoke test
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^\s*2\s+as bootstrap trains\s+(?:[\d.]+\s+){4}([\d.]+)", re.MULTILINE)


def step_ms(setting: str | None, processes: int, steps: int, warmup: int) -> list[float]:
    """The mean step ms of each of `processes` bootstrap_step.py runs started together,
    with `setting` (NAME=VALUE) in their environment and no other OpenMP wait setting."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if setting is not None:
        name, value = setting.split("=", 1)
        env[name] = value
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bootstrap_step.py"),
        *("--threads", "2", "--variant", "as bootstrap trains"),
        *("--steps", str(steps), "--warmup", str(warmup)),
    ]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    times = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}")
        found = STEP.search(out)
        if found is None:
            raise SystemExit(f"no step time in the output of {' '.join(cmd)}:\n{out}")
        times.append(float(found.group(1)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=10000"],
        help="NAME=VALUE settings to time beside OpenMP's defaults",
    )
    ap.add_argument("--quick", action="store_true", help="2 timed steps after 1: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    print(f"bootstrap teacher step, 2 threads per process, {os.cpu_count()} CPUs, {args.steps} timed steps")
    print(f"{'setting':<24} {'processes':>9} {'ms per step, each process':>28} {'vs default alone':>17}")
    base = None
    for setting in (None, *args.settings):
        alone = step_ms(setting, 1, args.steps, args.warmup)[0]
        base = alone if base is None else base
        for n in (1, 2):
            times = [alone] if n == 1 else step_ms(setting, n, args.steps, args.warmup)
            each = ", ".join(f"{t:.1f}" for t in times)
            print(f"{setting or 'defaults (spin)':<24} {n:>9} {each:>28} {max(times) / base:>16.2f}x")


if __name__ == "__main__":
    main()
