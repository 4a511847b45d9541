"""Lineage: what produced an output, from what, with which params, code and cost.

Two records per stage run, split by whether they may change from run to run:

- `manifest.json`, inside the stage's DVC out: a pure function of the stage's inputs,
  params and code (no clock times, no hosts, no git commit, no library versions), so
  an unchanged stage writes the same bytes and DVC keeps it cached downstream. It
  holds the stage, code digests, params, seeds, input digests (and Parquet row
  counts), output digests and row counts, counts kept/dropped by reason, and whatever
  the stage adds through `extra` (model fingerprints, sampling, `validation`, ...).
- the run record, outside DVC (`lineage/`, git-ignored; `DISTILLFLOW_LINEAGE_DIR`
  moves it): start and end time, host, git commit and dirty flag, run id, the library
  versions that ran (`environment`; docs/decisions/library-versions.md says why here),
  the validation result and the cost (tokens, wall / CPU / device seconds, peak
  memory, cache hits). Written when the manifest is:
      lineage/runs/<job>.json          the latest run of that job (DVC stage name)
      lineage/runs/history.jsonl       every run, appended, one JSON object per line
  and the run's OpenLineage 2-0-2 RunEvents (distillflow.audit.openlineage):
      lineage/openlineage/<job>/<runId>-START.json    when main() starts (entry.run_stage)
      lineage/openlineage/<job>/<runId>-COMPLETE.json when the run record is written
      lineage/openlineage/<job>/<runId>-FAIL.json     when main() raises
  (and to Marquez or any OpenLineage server when OPENLINEAGE_URL is set).
  The run id groups the stages of one pipeline run: `DISTILLFLOW_RUN_ID` from the
  environment (`distillflow run` sets it), else a fresh one per process.

"code" is the digest of the stage module and every distillflow module it loaded: files
that lie in the layers dvc.yaml lists as the stage's code deps
(distillflow/orchestration/codedeps.py writes them; a test checks they agree).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from distillflow.audit import openlineage
from distillflow.base.io import digest_path, write_json


def process_start() -> tuple[float, str]:
    """(when this process started, how that is known): from /proc on Linux, which
    counts the interpreter's start-up and imports; else this module's import time."""
    stat, uptime = Path(f"/proc/{os.getpid()}/stat"), Path("/proc/uptime")
    if stat.is_file() and uptime.is_file():
        ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = float(uptime.read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age, "process_start"
    return time.time(), "lineage_import"


# Every stage imports this module before it parses its arguments.
STARTED_AT, STARTED_FROM = process_start()
RUN_ID = os.environ.get("DISTILLFLOW_RUN_ID") or str(uuid.uuid4())

# Libraries whose version is recorded when the stage imported them: module -> distribution.
LIBRARIES = {
    "torch": "torch",
    "transformers": "transformers",
    "vllm": "vllm",
    "pyarrow": "pyarrow",
    "numpy": "numpy",
    "datasets": "datasets",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "openai": "openai",
    "great_expectations": "great-expectations",
    "datasketch": "datasketch",
    "dvclive": "dvclive",
    "openlineage": "openlineage-python",
}


PACKAGE = Path(__file__).resolve().parents[1]  # the installed (or checked-out) distillflow package


def code_files(stage: str) -> dict[str, Path]:
    """The stage's module, the stage package and every distillflow module loaded in this
    process, by the name the manifest gives them (`stages/<stage>.py`, `distillflow/...`).

    Called from a stage's main() after its imports, so sys.modules holds exactly
    what the stage can execute. (Run as `python -m stages.X`, the stage module is
    `__main__`, so its file is named directly, beside the `stages` package's.)
    """
    package = sys.modules.get("stages")
    if package is None or package.__file__ is None:
        raise RuntimeError(f"{stage}: the stages package is not loaded; run the stage as `python -m stages.{stage}`")
    here = Path(package.__file__).parent
    files = {f"stages/{stage}.py": here / f"{stage}.py", "stages/__init__.py": here / "__init__.py"}
    # every distillflow module and package loaded (distillflow/orchestration/codedeps.py
    # names the layers they lie in as the stage's code deps in dvc.yaml)
    loaded = [n for n in sys.modules if n == "distillflow" or n.startswith("distillflow.")]
    for n in sorted(loaded):
        file = getattr(sys.modules[n], "__file__", None)
        if file is None:
            raise RuntimeError(f"module {n} has no file to digest")
        files["distillflow/" + Path(file).resolve().relative_to(PACKAGE).as_posix()] = Path(file)
    return files


def code_digest(stage: str) -> dict[str, str]:
    return {name: digest_path(path) for name, path in sorted(code_files(stage).items())}


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):  # a list of dataclasses (models.teachers)
        return [_plain(v) for v in value]
    return value


def library_versions() -> dict[str, Any]:
    """Python and the versions of the recorded libraries this process imported; with
    torch, the CPU kernels it picked and its thread count (float results, so trained
    weights, differ between instruction sets and thread counts)."""
    versions: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for module, dist in LIBRARIES.items():
        if module in sys.modules:
            versions[dist] = importlib.metadata.version(dist)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        versions["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        versions["torch_threads"] = torch.get_num_threads()
    return versions


def seeds_of(value: Any, prefix: str = "") -> dict[str, int]:
    """Every `seed` key in the params, by dotted path (train.seed, teacher.seed, ...)."""
    found: dict[str, int] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k == "seed" and isinstance(v, int):
                found[key] = v
            else:
                found.update(seeds_of(v, key))
    return found


def model_fingerprints(value: Any, prefix: str = "") -> dict[str, str]:
    """Every model description (a mapping with a `fingerprint`) in `value`, by path."""
    found: dict[str, str] = {}
    if isinstance(value, dict):
        if isinstance(value.get("fingerprint"), str):
            found[prefix or "model"] = value["fingerprint"]
        for k, v in value.items():
            found.update(model_fingerprints(v, f"{prefix}.{k}" if prefix else str(k)))
    return found


def _input_entry(p: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(p), "sha256": digest_path(p)}
    if p.is_file() and p.suffix == ".parquet":
        entry["rows"] = pq.ParquetFile(p).metadata.num_rows
    return entry


def write_manifest(
    out_dir: Path,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Path],
    outputs: dict[str, int],
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    models: dict[str, Any] | None = None,
    cost: dict[str, Any] | None = None,
    module: str | None = None,
    step: bool = False,
) -> dict[str, Any]:
    """Write `out_dir/manifest.json` and this run's record (see the module doc); return the manifest.

    `module`: the stage module that ran (`stages/<module>.py`), when it is not `stage`:
    an on-policy round writes the student, pairs, curate, score and train folders from
    stages/round.py (or a comparison cell's stages/compare.py). `step`: one of several
    folders this process writes before its last one (a round's student, pairs, curate
    and score folders): its manifest is written now; its record (counts, rows, `cost`)
    joins the `steps` of the process's one run record, and its datasets the one
    OpenLineage COMPLETE event, both written with the last manifest.

    outputs maps each written file (relative to out_dir) to its row count; their
    digests are taken here, after they are complete. `models` (role -> description,
    e.g. models.describe) goes into the manifest; `cost` (tokens_read,
    tokens_generated, cache_hits, ...: what only the stage knows) into the run
    record, beside the times and memory measured here. `extra["validation"]`, when a
    stage passes one, is the validation result.
    """
    plain_params = {k: _plain(v) for k, v in params.items()}
    manifest = {
        "stage": stage,
        "code": code_digest(module or stage),
        "params": plain_params,
        "seeds": seeds_of(plain_params),
        "inputs": {name: _input_entry(p) for name, p in sorted(inputs.items())},
        "outputs": {
            name: {"rows": rows, "sha256": digest_path(out_dir / name)} for name, rows in sorted(outputs.items())
        },
        "counts": counts,
        **({"models": models} if models is not None else {}),
        **(extra or {}),
    }
    write_json(out_dir / "manifest.json", manifest)
    if step:
        _STEPS.append(_step_record(out_dir, manifest, cost or {}))
    else:
        write_run_record(out_dir, manifest, cost or {})
    return manifest


# The steps this process wrote before its last manifest (write_manifest(step=True)).
_STEPS: list[dict[str, Any]] = []


def _step_record(out_dir: Path, manifest: dict[str, Any], stage_cost: dict[str, Any]) -> dict[str, Any]:
    out = final_dir(out_dir)
    return {
        "stage": manifest["stage"],
        "out": str(out),
        "manifest_sha256": digest_path(out_dir / "manifest.json"),
        "rows_in": {k: v["rows"] for k, v in manifest["inputs"].items() if "rows" in v},
        "rows_out": {k: v["rows"] for k, v in manifest["outputs"].items()},
        "counts": manifest["counts"],
        "cost": stage_cost,
        "datasets": openlineage.datasets(out_dir, out, manifest),
    }


# --- the run record (outside DVC) -------------------------------------------------


def lineage_dir() -> Path:
    """Where run records go: DISTILLFLOW_LINEAGE_DIR, else lineage/ in the DVC repo
    the stage runs in (DVC_ROOT, which dvc repro and the flow set), else in the cwd."""
    env = os.environ.get("DISTILLFLOW_LINEAGE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("DVC_ROOT", ".")) / "lineage"


def final_dir(out_dir: Path) -> Path:
    """The out folder a stage is writing: `out_dir` itself, or the target of the
    io.atomic_dir temporary `.<name>.<random>.tmp` it is writing into."""
    m = re.fullmatch(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp", out_dir.name)
    return out_dir.with_name(m["name"]) if m else out_dir


def git_state(root: Path) -> dict[str, Any]:
    """The commit and dirty flag of the git work tree at `root`, or why there are none."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return {"commit": None, "dirty": None, "error": str(getattr(exc, "stderr", "") or exc).strip()}
    return {"commit": head, "dirty": bool(status.strip())}


def measured_cost(end: float) -> dict[str, Any]:
    """Times and memory of this process (and its waited-for children, e.g. shard workers).

    device_seconds is CPU seconds (user + system) on the CPU; on CUDA it is the
    process's wall time with a CUDA context (an upper bound; kernel time is not
    measured), and `device_seconds_kind` says which.
    """
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    cost: dict[str, Any] = {
        "wall_seconds": round(end - STARTED_AT, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mib": round(max(me.ru_maxrss, kids.ru_maxrss) / 1024, 1),  # ru_maxrss is KiB on Linux
        "device": "cpu",
        "device_seconds": round(cpu, 3),
        "device_seconds_kind": "cpu_seconds",
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        cost |= {
            "device": "cuda",
            "device_seconds": cost["wall_seconds"],
            "device_seconds_kind": "cuda_process_wall_seconds",
            "cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        }
    return cost


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_name(stage: str) -> str:
    """The DVC stage running (DVC_STAGE: train, compare@kd-1, round@r2), else the stage module."""
    return os.environ.get("DVC_STAGE") or stage


def write_run_record(out_dir: Path, manifest: dict[str, Any], stage_cost: dict[str, Any]) -> dict[str, Any]:
    """Write the run record (lineage/runs/) and complete this process's OpenLineage run."""
    ol = openlineage.current()
    end = time.time()
    out = final_dir(out_dir)
    job = job_name(manifest["stage"])
    record = {
        "run_id": RUN_ID,
        "openlineage_run_id": ol.run_id,
        "job": job,
        "stage": manifest["stage"],
        "out": str(out),
        "manifest_sha256": digest_path(out_dir / "manifest.json"),
        "started": _iso(STARTED_AT),
        "started_from": STARTED_FROM,
        "ended": _iso(end),
        "host": socket.gethostname(),
        "git": git_state(Path(os.environ.get("DVC_ROOT", "."))),
        "environment": library_versions(),
        "models": model_fingerprints(
            {k: v for k, v in manifest.items() if k not in ("params", "code", "inputs", "outputs")}
        ),
        "seeds": manifest["seeds"],
        "rows_in": {k: v["rows"] for k, v in manifest["inputs"].items() if "rows" in v},
        "rows_out": {k: v["rows"] for k, v in manifest["outputs"].items()},
        "counts": manifest["counts"],
        "validation": manifest.get("validation"),
        "cost": {**measured_cost(end), **stage_cost},
        **({"steps": [{k: v for k, v in r.items() if k != "datasets"} for r in _STEPS]} if _STEPS else {}),
    }
    runs = lineage_dir() / "runs"
    write_json(runs / f"{job}.json", record)
    _append_line(runs / "history.jsonl", json.dumps(record, sort_keys=True))
    ol.complete(record["ended"], out_dir, out, manifest, record, [r["datasets"] for r in _STEPS])
    _STEPS.clear()
    return record


def _append_line(path: Path, line: str) -> None:
    """Append one line under an exclusive lock (parallel stages share the history)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


# --- OpenLineage (distillflow.audit.openlineage builds and sends the events) --------


def start_run(stage: str) -> openlineage.StageRun:
    """Start this process's OpenLineage run of `stage` (START, dated when the process started)."""
    return openlineage.begin(job_name(stage), lineage_dir() / "openlineage", _iso(STARTED_AT), _parent_run_id())


def now() -> str:
    """The time now, as run records and events write it."""
    return _iso(time.time())


def _parent_run_id() -> str | None:
    """The pipeline run as a UUID, when a flow set DISTILLFLOW_RUN_ID (a non-UUID id is mapped by uuid5)."""
    given = os.environ.get("DISTILLFLOW_RUN_ID")
    if not given:
        return None
    try:
        return str(uuid.UUID(given))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"distillflow:{given}"))
