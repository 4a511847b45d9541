"""Lineage manifests: what produced an output, from what, with which params and code.

Each stage writes `manifest.json` beside its outputs. Everything in it is a pure
function of the stage's inputs, params and code (no clock times, no host names), so
an unchanged stage writes the same bytes and DVC keeps it cached downstream.

"code" is the digest of the stage module and every `stages.lib` module it imports:
the same set of files dvc.yaml lists as the stage's code deps (a test checks that).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from stages.lib.io import digest_path, write_json

ROOT = Path(__file__).resolve().parents[2]


def code_files(stage: str) -> list[Path]:
    """The stage's module and the stages.lib and stage modules loaded in this process.

    Called from a stage's main() after its imports, so sys.modules holds exactly
    what the stage can execute. (Run as `python -m stages.X`, the stage module is
    `__main__`, so its file is named directly.)
    """
    files = [ROOT / "stages" / f"{stage}.py"]
    # stages.lib modules, and other stage modules a stage reuses (compare runs train's loop)
    loaded = [n for n in sys.modules if n.startswith("stages.") and n not in ("stages.lib", f"stages.{stage}")]
    for n in sorted(loaded):
        file = getattr(sys.modules[n], "__file__", None)
        if file is None:
            raise RuntimeError(f"module {n} has no file to digest")
        files.append(Path(file).resolve())
    return files


def code_digest(stage: str) -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): digest_path(p) for p in code_files(stage)}


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def write_manifest(
    out_dir: Path,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Path],
    outputs: dict[str, int],
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out_dir/manifest.json` and return it.

    outputs maps each written file (relative to out_dir) to its row count; their
    digests are taken here, after they are complete.
    """
    manifest = {
        "stage": stage,
        "code": code_digest(stage),
        "params": {k: _plain(v) for k, v in params.items()},
        "inputs": {name: {"path": str(p), "sha256": digest_path(p)} for name, p in sorted(inputs.items())},
        "outputs": {name: {"rows": rows, "sha256": digest_path(out_dir / name)} for name, rows in sorted(outputs.items())},
        "counts": counts,
        **(extra or {}),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
