"""Whether two runs of the pipeline wrote the same outputs: the proof a refactor owes.

    python benchmarks/same_outputs.py RUN_A RUN_B

RUN_A and RUN_B are repo copies after `dvc repro` (e.g. two `benchmarks/pipelines.py
--keep DIR` runs, one before the change and one after). Every file under data/,
metrics/, plots/ and reports/ of either run is compared byte for byte, except what a
refactor may change by design: a manifest's `code` (digests of the files the stage
ran, which a refactor edits) and, in metrics files, measured times (keys ending in
`seconds`, which no two runs share). Such files are compared with those keys left out
and listed apart. Exits 1 if any other byte differs or a file is in one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FOLDERS = ("data", "metrics", "plots", "reports")


def files(run: Path) -> set[str]:
    out: set[str] = set()
    for folder in FOLDERS:
        base = run / folder
        if base.is_dir():
            out |= {
                p.relative_to(run).as_posix()
                for p in base.rglob("*")
                if p.is_file() and ".checkpoints" not in p.parts and "__pycache__" not in p.parts
            }
    return out


def without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def masked(rel: str, data: bytes) -> Any | None:
    """The comparable content of a file whose bytes may differ by design, else None."""
    if not rel.endswith(".json"):
        return None
    obj = json.loads(data)
    if rel.endswith("manifest.json") and isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "code"}
    return without_times(obj)


def compare(a: Path, b: Path) -> dict[str, list[str]]:
    fa, fb = files(a), files(b)
    result: dict[str, list[str]] = {"identical": [], "same_but_masked": [], "different": []}
    result["only_in_a"] = sorted(fa - fb)
    result["only_in_b"] = sorted(fb - fa)
    for rel in sorted(fa & fb):
        da, db = (a / rel).read_bytes(), (b / rel).read_bytes()
        if da == db:
            result["identical"].append(rel)
            continue
        ma = masked(rel, da)
        same = ma is not None and ma == masked(rel, db)
        result["same_but_masked" if same else "different"].append(rel)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    r = compare(args.run_a, args.run_b)
    print(
        f"{len(r['identical'])} files byte-identical, {len(r['same_but_masked'])} equal once code digests and "
        f"times are left out, {len(r['different'])} different, {len(r['only_in_a'])} only in {args.run_a}, "
        f"{len(r['only_in_b'])} only in {args.run_b}"
    )
    for key in ("same_but_masked", "different", "only_in_a", "only_in_b"):
        for rel in r[key]:
            print(f"  {key}: {rel}")
    return 1 if r["different"] or r["only_in_a"] or r["only_in_b"] else 0


if __name__ == "__main__":
    sys.exit(main())
