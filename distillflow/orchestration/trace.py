"""`distillflow lineage`: trace, verify and cost the pipeline's artifacts.

- `show TARGET`: from an artifact path (a stage's out folder, a file in it, e.g.
  data/train/model) or one record id (pair_id, generation_id, prompt_id) back to the
  sources: a pair to its prompt row (with source and source_ref) and both
  generations (model fingerprint, engine, sampling); an artifact through its
  manifest's inputs, recursively, with params, seeds, models and code digests.
- `verify` (distillflow/orchestration/verify.py): recompute every digest; fail on a
  file that disagrees with dvc.lock or its manifest, report the stages that never ran
  here, are not checked out or are stale.
- `cost`: the run records (distillflow/audit/lineage.py) summed per stage for one run.

Record ids are found in the Parquet files of the outs dvc.lock records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from distillflow.base.io import digest_path

# The schema name (Parquet metadata `distillflow.schema`) -> the column that is its record id.
ID_COLUMNS = {"pair": "pair_id", "pair_quarantine": "pair_id", "generation": "generation_id", "prompt": "prompt_id"}
SHORT = 12  # hex characters of a digest shown in the text tree


class LineageError(RuntimeError):
    """A target that cannot be traced; the message says why."""


# --- what dvc.lock records ---------------------------------------------------------


@dataclass(frozen=True)
class Out:
    stage: str  # the DVC stage name (train, compare@kd-1, round@r2)
    path: str  # relative to the repo root, posix
    md5: str | None
    hash_name: str | None = None  # what `md5` is: "md5" (DVC 3), absent in older lock files


def lock_outs(root: Path) -> list[Out]:
    """Every out the pipelines' lock files record: dvc.lock's, in its order, then those of
    the other pipeline files that have run (comparison/dvc.lock; their stages named
    `comparison/dvc.yaml:<stage>`, as `dvc status` names them). Paths are repo-relative
    (a lock records them relative to its stage's wdir)."""
    from distillflow.orchestration.codedeps import PIPELINES

    lock = root / "dvc.lock"
    if not lock.is_file():
        raise LineageError(f"{lock}: not found; run the pipeline (dvc repro or distillflow run) first")
    found: list[Out] = []
    for pipeline in PIPELINES:
        lock = root / pipeline.with_suffix(".lock")
        if not lock.is_file():
            continue
        spec = (yaml.safe_load((root / pipeline).read_text()) or {}).get("stages", {})
        prefix = "" if pipeline == Path("dvc.yaml") else f"{pipeline.as_posix()}:"
        for name, entry in ((yaml.safe_load(lock.read_text()) or {}).get("stages", {})).items():
            wdir = (spec.get(name.split("@", 1)[0]) or {}).get("wdir", ".")
            base = Path(os.path.normpath(pipeline.parent / wdir))
            for o in entry.get("outs", []):
                found.append(Out(prefix + name, (base / o["path"]).as_posix(), o.get("md5"), o.get("hash")))
    return found


def run_environment(root: Path, manifest: Path) -> dict[str, Any] | None:
    """The library versions (and torch's CPU capability and threads) of the run that wrote
    `manifest`: the newest run record in
    lineage/runs/history.jsonl with that manifest's sha256 (versions live in run records,
    not in manifests: docs/decisions/library-versions.md). None if no record has it."""
    history = root / "lineage" / "runs" / "history.jsonl"
    if not history.is_file() or not manifest.is_file():
        return None
    digest = digest_path(manifest)
    found = None
    for line in history.read_text().splitlines():
        record = json.loads(line)
        if record.get("manifest_sha256") == digest:
            found = record.get("environment")
    return found


def owning_out(outs: list[Out], path: str) -> Out | None:
    """The out that is `path` or holds it (the longest match)."""
    rel = Path(path).as_posix().rstrip("/")
    hits = [o for o in outs if rel == o.path or rel.startswith(o.path.rstrip("/") + "/")]
    return max(hits, key=lambda o: len(o.path)) if hits else None


def read_manifest(root: Path, out: Out) -> dict[str, Any] | None:
    file = root / out.path / "manifest.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LineageError(f"{file}: not valid JSON ({exc})") from exc


# --- show: artifacts ---------------------------------------------------------------


def artifact_tree(root: Path, path: str, outs: list[Out] | None = None, seen: set[str] | None = None) -> dict[str, Any]:
    """The lineage of the artifact at `path`: its out, manifest and inputs, recursively
    (an out already shown higher up is named, not repeated)."""
    outs = lock_outs(root) if outs is None else outs
    seen = set() if seen is None else seen
    rel = Path(os.path.relpath((root / path).resolve(), root.resolve())).as_posix()
    out = owning_out(outs, rel)
    node: dict[str, Any] = {"path": rel}
    if (root / rel).exists():
        node["sha256"] = digest_path(root / rel)
    if out is None:
        node["source"] = "not a DVC out (a source file or an input outside the pipeline)"
        return node
    node |= {"out": out.path, "stage": out.stage, "dvc_md5": out.md5}
    if out.path in seen:
        node["repeated"] = True
        return node
    seen.add(out.path)
    manifest = read_manifest(root, out)
    if manifest is None:
        return node
    node["manifest"] = f"{out.path}/manifest.json"
    node |= {k: manifest[k] for k in ("params", "seeds", "counts", "code") if k in manifest}
    env = run_environment(root, root / out.path / "manifest.json")
    if env is not None:
        node["environment"] = env
    from distillflow.audit.lineage import model_fingerprints

    node["models"] = model_fingerprints(
        {k: v for k, v in manifest.items() if k not in ("params", "code", "inputs", "outputs", "counts")}
    )
    if "validation" in manifest:
        node["validation"] = manifest["validation"]
    node["inputs"] = {}
    for name, entry in manifest.get("inputs", {}).items():
        child = artifact_tree(root, entry["path"], outs, seen)
        child["recorded_sha256"] = entry["sha256"]
        node["inputs"][name] = child
    return node


# --- show: records -----------------------------------------------------------------


def _parquet_files(root: Path, outs: list[Out]) -> list[tuple[Out, Path]]:
    files = []
    for out in outs:
        base = root / out.path
        if base.is_dir():
            files.extend((out, f) for f in sorted(base.rglob("*.parquet")))
        elif base.suffix == ".parquet" and base.is_file():
            files.append((out, base))
    return files


def find_records(root: Path, record_id: str, outs: list[Out]) -> list[dict[str, Any]]:
    """Every row whose record id is `record_id`, with its file, row number, stage and kind."""
    hits = []
    for out, file in _parquet_files(root, outs):
        schema = pq.read_schema(file)
        kind = (schema.metadata or {}).get(b"distillflow.schema", b"").decode()
        column = ID_COLUMNS.get(kind)
        if column is None:
            continue
        ids = pq.read_table(file, columns=[column]).column(column).to_pylist()
        for row, value in enumerate(ids):
            if value == record_id:
                record = pq.read_table(file).slice(row, 1).to_pylist()[0]
                hits.append(
                    {
                        "kind": kind,
                        "file": file.relative_to(root).as_posix(),
                        "row": row,
                        "stage": out.stage,
                        "record": record,
                    }
                )
    return hits


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its long text fields."""
    return {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "response")}


def _one(
    root: Path, kind: str, record_id: str, outs: list[Out], cache: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    if record_id not in cache:
        cache[record_id] = find_records(root, record_id, outs)
    hits = [h for h in cache[record_id] if h["kind"] == kind]
    if not hits:
        return {"kind": kind, "id": record_id, "missing": f"no {kind} record with this id in the outs dvc.lock records"}
    first = hits[0]
    return {
        "kind": kind,
        "id": record_id,
        "found_in": [f"{h['file']} row {h['row']} ({h['stage']})" for h in hits],
        "record": _brief(first["record"]),
    }


def record_tree(root: Path, record_id: str) -> dict[str, Any]:
    """A record and what it came from: pair -> prompt + chosen and rejected generations;
    generation -> its prompt; prompt -> its source row."""
    outs = lock_outs(root)
    cache: dict[str, list[dict[str, Any]]] = {}
    hits = find_records(root, record_id, outs)
    cache[record_id] = hits
    if not hits:
        raise LineageError(
            f"{record_id}: no pair, generation or prompt with this id in the Parquet files of the outs dvc.lock records"
        )
    kind = hits[0]["kind"]
    node = _one(root, kind, record_id, outs, cache)
    if kind == "pair_quarantine":
        node["dropped"] = hits[0]["record"]["reason"]
    if kind in ("pair", "pair_quarantine"):
        rec = hits[0]["record"]
        node["prompt"] = _one(root, "prompt", rec["prompt_id"], outs, cache)
        node["chosen"] = _generation(root, rec["chosen_id"], outs, cache)
        node["rejected"] = _generation(root, rec["rejected_id"], outs, cache)
    elif kind == "generation":
        node = _generation(root, record_id, outs, cache)
    return node


def _generation(root: Path, gid: str, outs: list[Out], cache: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    node = _one(root, "generation", gid, outs, cache)
    if "record" in node:
        rec = node["record"]
        rec["sampling"] = json.loads(rec["sampling"])
        node["prompt"] = _one(root, "prompt", rec["prompt_id"], outs, cache)
    return node


def show(root: Path, target: str) -> dict[str, Any]:
    """The lineage of `target`: a path under `root` or a record id."""
    if (root / target).exists():
        return artifact_tree(root, target)
    if all(c in "0123456789abcdef" for c in target) and len(target) >= 8:
        return record_tree(root, target)
    raise LineageError(f"{target}: neither a path under {root} nor a record id (pair_id, generation_id or prompt_id)")


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest[:SHORT]


def render(node: dict[str, Any], indent: int = 0) -> list[str]:
    """The text tree of an artifact or record node."""
    pad = "  " * indent
    if "kind" in node:
        return _render_record(node, indent)
    lines = [
        f"{pad}{node['path']}  sha256 {_short(node.get('sha256'))}"
        + (f"  [stage {node['stage']}]" if "stage" in node else f"  ({node.get('source', '')})")
    ]
    if "recorded_sha256" in node:
        same = node["recorded_sha256"] == node.get("sha256")
        lines[0] += (
            "  (matches the manifest)"
            if same
            else f"  MISMATCH: the manifest recorded {_short(node['recorded_sha256'])}"
        )
    if node.get("repeated"):
        lines.append(f"{pad}  (lineage shown above)")
        return lines
    if "manifest" in node:
        lines.append(f"{pad}  manifest: {node['manifest']}")
        lines.append(
            f"{pad}  params: {', '.join(node.get('params', {}))}; seeds: "
            f"{json.dumps(node.get('seeds', {}), sort_keys=True)}"
        )
        if node.get("models"):
            lines.append(f"{pad}  models: " + "; ".join(f"{k} {v}" for k, v in sorted(node["models"].items())))
        if node.get("environment"):
            lines.append(f"{pad}  environment: " + ", ".join(f"{k} {v}" for k, v in node["environment"].items()))
        lines.append(f"{pad}  code: " + ", ".join(f"{p} {_short(d)}" for p, d in node.get("code", {}).items()))
        lines.append(f"{pad}  counts: {json.dumps(node.get('counts', {}), sort_keys=True)}")
        if "validation" in node:
            lines.append(f"{pad}  validation: {json.dumps(node['validation'], sort_keys=True)}")
        for name, child in node.get("inputs", {}).items():
            lines.append(f"{pad}  input {name}:")
            lines.extend(render(child, indent + 2))
    return lines


def _render_record(node: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    head = f"{pad}{node['kind']} {node['id']}"
    if "missing" in node:
        return [f"{head}: {node['missing']}"]
    lines = [head, *(f"{pad}  in {where}" for where in node["found_in"])]
    rec = node["record"]
    if node["kind"] == "prompt":
        lines.append(f"{pad}  source: {rec['source']}  source_ref: {rec['source_ref']}  split: {rec['split']}")
    elif node["kind"] == "generation":
        lines.append(f"{pad}  model: {rec['model']}  engine: {rec['engine']}  sample_index: {rec['sample_index']}")
        lines.append(f"{pad}  sampling: {json.dumps(rec['sampling'], sort_keys=True)}")
        lines.append(
            f"{pad}  finish_reason: {rec['finish_reason']}  tokens: prompt {rec['prompt_tokens']}, response "
            f"{rec['response_tokens']}"
        )
    if "dropped" in node:
        lines.append(f"{pad}  dropped by curate: {node['dropped']}")
    for part in ("prompt", "chosen", "rejected"):
        if part in node:
            lines.append(f"{pad}  {part}:")
            lines.extend(_render_record(node[part], indent + 2))
    return lines


# --- cost --------------------------------------------------------------------------


COST_COLUMNS = ("wall_seconds", "cpu_seconds", "device_seconds", "peak_rss_mib", "tokens_read", "tokens_generated")


def run_records(lineage_dir: Path, run_id: str | None) -> list[dict[str, Any]]:
    """The records of run `run_id` from the history (default: the newest run there)."""
    history = lineage_dir / "runs" / "history.jsonl"
    if not history.is_file():
        raise LineageError(f"{history}: no run records yet (stages write them when they finish)")
    records = []
    for n, line in enumerate(history.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LineageError(f"{history}: line {n}: not valid JSON ({exc})") from exc
    if not records:
        raise LineageError(f"{history}: empty")
    want = run_id or records[-1]["run_id"]
    chosen = [r for r in records if r["run_id"] == want]
    if not chosen:
        raise LineageError(f"{history}: no records of run {want}")
    latest: dict[str, dict[str, Any]] = {}
    for r in chosen:  # a stage retried within a run: its last attempt
        latest[r["job"]] = r
    return list(latest.values())


def cost_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage cost and the sum over stages (peak memory: the maximum)."""
    stages = {}
    total: dict[str, float] = dict.fromkeys(COST_COLUMNS, 0)
    for r in records:
        c = r["cost"]
        row = {k: c.get(k) for k in COST_COLUMNS} | {
            "device": c.get("device"),
            "device_seconds_kind": c.get("device_seconds_kind"),
            "cache_hits": c.get("cache_hits", {}),
        }
        stages[r["job"]] = row
        for k in COST_COLUMNS:
            if isinstance(c.get(k), (int, float)):
                total[k] = max(total[k], c[k]) if k == "peak_rss_mib" else total[k] + c[k]
    return {
        "run_id": records[0]["run_id"],
        "stages": stages,
        "total": {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()},
    }


def render_cost(table: dict[str, Any]) -> list[str]:
    head = f"{'stage':<24} " + " ".join(f"{k:>16}" for k in COST_COLUMNS) + "  cache hits"
    lines = [f"run {table['run_id']}", head]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:>16.1f}" if isinstance(v, float) else f"{v:>16}"

    for job, row in table["stages"].items():
        lines.append(
            f"{job:<24} "
            + " ".join(f"{fmt(row[k]):>16}" for k in COST_COLUMNS)
            + f"  {json.dumps(row['cache_hits'], sort_keys=True)}"
        )
    lines.append(f"{'total':<24} " + " ".join(f"{fmt(table['total'][k]):>16}" for k in COST_COLUMNS))
    kinds = sorted({row["device_seconds_kind"] for row in table["stages"].values() if row["device_seconds_kind"]})
    lines.append(
        f"device_seconds: {', '.join(kinds)} (cpu_seconds: user + system CPU time; cuda_process_wall_seconds: wall "
        "time with a CUDA context)"
    )
    return lines
