"""What a stage's Prefect artifact says: its outcome, outputs with row counts, counts
and drops by reason, a validation summary and its metrics.

Read from what the stage itself wrote: its metrics files (the outs dvc.yaml marks as
metrics, `metrics/<stage>.json` here) and the `manifest.json` in each output folder
(see distillflow/audit/lineage.py). Nothing is invented when a stage writes neither.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from distillflow.orchestration.dag import StageSpec


def artifact_key(stage: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a stage name such
    as `round@2`; a short hash keeps two names that map alike apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")
    if slug != stage:
        slug = f"{slug}-{hashlib.sha256(stage.encode()).hexdigest()[:6]}"
    return f"stage-{slug}"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return value if isinstance(value, dict) else {"value": value}


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k in sorted(value) for item in _flatten(value[k], f"{prefix}{k}.")]
    return [(prefix[:-1], value)]


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _by_reason(metrics: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Every `*by_reason*` mapping in the metrics, as (mapping, reason, count)."""
    found = []
    for key, value in _flatten(metrics):
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if "by_reason" in part:
                found.append((".".join(parts[: i + 1]), ".".join(parts[i + 1 :]), value))
                break
    return found


def validation_lines(metrics: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for source, data in [("metrics", metrics), *manifests.items()]:
        if isinstance(data.get("validation"), dict):
            lines += [f"- {source}: `{k}` = {v}" for k, v in _flatten(data["validation"])]
    if "quarantined" in metrics and isinstance(metrics.get("dropped_by_reason"), dict):
        total = sum(metrics["dropped_by_reason"].values())
        ok = total == metrics["quarantined"]
        lines.append(
            f"- quarantined {metrics['quarantined']} = sum of drops by reason {total}: "
            f"{'reconciled' if ok else 'MISMATCH'}"
        )
    for manifest_path, manifest in manifests.items():
        outputs = manifest.get("outputs", {})
        if outputs:
            lines.append(
                f"- {manifest_path}: {len(outputs)} output file(s) with sha256 and row counts recorded; "
                "inputs passed the schema checks on read"
            )
    return lines or ["- the stage reports no validation data"]


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """`new` into `into`, nested mappings merged key by key (a later file's value wins)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def stage_markdown(root: Path, spec: StageSpec, outcome: str, record: dict[str, Any], seconds: float) -> str:
    metrics: dict[str, Any] = {}
    for rel in spec.metrics:
        data = _read_json(root / rel)
        if data is not None:
            _merge(metrics, data)  # evaluate: its summary's numbers beside the full metrics, per model
    manifests = {}
    for rel in spec.outs:
        manifest = _read_json(root / rel / "manifest.json") if (root / rel).is_dir() else None
        if manifest is not None:
            manifests[f"{rel}/manifest.json"] = manifest

    md = [f"# Stage `{spec.name}`: {outcome}", ""]
    md.append(f"- fingerprint: `{record.get('fingerprint')}`")
    md.append(f"- how: {record.get('how')}; {seconds:.1f} s in this run")
    if spec.cmd:
        md.append(f"- command: `{spec.cmd}`")
    md += ["", "## Outputs", ""]
    rows = []
    for rel in spec.outs:
        rows.append((rel, record.get("outs", {}).get(rel, ""), ""))
        manifest = manifests.get(f"{rel}/manifest.json")
        for file, info in sorted((manifest or {}).get("outputs", {}).items()):
            rows.append((f"{rel}/{file}", info.get("sha256", "")[:16], info.get("rows", "")))
    md += _table(("path", "hash", "rows"), rows)

    counts = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    drops = _by_reason(metrics)
    md += ["", "## Counts and drops by reason", ""]
    md += _table(("count", "value"), counts) if counts else ["(no counts reported)"]
    if drops:
        md += [""] + _table(("drops", "reason", "rows"), drops)
    md += ["", "## Validation", ""] + validation_lines(metrics, manifests)
    md += ["", "## Metrics", ""]
    flat = _flatten(metrics)
    md += _table(("metric", "value"), flat) if flat else ["(no metrics file)"]
    return "\n".join(md) + "\n"
