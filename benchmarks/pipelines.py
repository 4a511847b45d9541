"""Wall time of both pipelines from a fresh copy of the repo: the default one
(`dvc repro`, bootstrap through evaluate and the on-policy rounds) and the method
comparison (`distillflow run --target comparison/dvc.yaml --jobs 2`, the README's
command: two cells at once, one torch thread each, `compare.threads`; `--jobs 1` runs
them in turn, as `dvc repro comparison/dvc.yaml` does), with each comparison stage's cost
(the bootstraps' stages, the cells, the report).

    python benchmarks/pipelines.py [--params params.yaml] [--jobs 2] [--skip-comparison] [--keep DIR]

The copy holds the repo's tracked and untracked (not ignored) files minus outputs, so
nothing is cached: what a fresh clone pays. Prints the wall time of each `dvc repro`,
the slowest stages, and per comparison cell its wall and CPU seconds (from the run
records, `distillflow lineage cost`). Torch stages use 2 threads (distillflow/stagekit/entry.py),
comparison cells `compare.threads`; time it on an otherwise idle machine: other jobs
slow 2-thread torch 10-35x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_copy(dst: Path, params: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("data/", "metrics/", "plots/", "reports/comparison/")):
            if f.endswith("dvc.lock"):
                continue
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    shutil.copy(params, dst / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark copy"]):
        subprocess.run(cmd, cwd=dst, capture_output=True, text=True, check=True, env=git_env())
    return dst


def git_env() -> dict[str, str]:
    import os

    ident = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    return {**os.environ, **ident, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}


def timed(repo: Path, *cmd: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=git_env())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_records(repo: Path) -> list[dict]:
    history = repo / "lineage" / "runs" / "history.jsonl"
    return [json.loads(line) for line in history.read_text().splitlines()] if history.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--jobs", type=int, default=2, help="comparison stages at once (distillflow run --jobs)")
    ap.add_argument("--skip-comparison", action="store_true")
    ap.add_argument("--keep", type=Path, help="run in this (empty) folder and keep it")
    args = ap.parse_args()
    where = args.keep or Path(tempfile.mkdtemp(prefix="distillflow-bench-"))
    where.mkdir(parents=True, exist_ok=True)
    repo = fresh_copy(where, args.params.resolve())
    dvc = [sys.executable, "-m", "dvc", "repro"]
    default_s = timed(repo, *dvc)
    seen = len(run_records(repo))
    print(f"default pipeline (dvc repro, fresh copy):              {default_s:8.1f} s")
    for r in sorted(run_records(repo), key=lambda r: -r["cost"]["wall_seconds"])[:5]:
        print(f"    {r['job']:<28} {r['cost']['wall_seconds']:8.1f} s wall")
    if args.skip_comparison:
        return
    flow = [sys.executable, "-m", "distillflow.cli", "run", "--target", "comparison/dvc.yaml", "--jobs", str(args.jobs)]
    comparison_s = timed(repo, *flow)
    cells = run_records(repo)[seen:]  # the bootstraps' stages, the cells and the report
    print(
        f"comparison pipeline (distillflow run --target comparison/dvc.yaml --jobs {args.jobs}): "
        f"{comparison_s:8.1f} s, {len(cells)} stage runs"
    )
    for r in cells:
        c = r["cost"]
        print(f"    {r['job']:<40} {c['wall_seconds']:8.1f} s wall {c['cpu_seconds']:8.1f} s cpu")
    if not args.keep:
        shutil.rmtree(where)


if __name__ == "__main__":
    main()
