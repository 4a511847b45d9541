"""Whether two runs of the pipeline wrote the same outputs: the proof a refactor owes.

    python benchmarks/same_outputs.py RUN_A RUN_B

RUN_A and RUN_B are repo copies after `dvc repro` (e.g. two `benchmarks/pipelines.py
--keep DIR` runs, one before the change and one after). Every file under data/,
metrics/, plots/ and reports/ of either run is compared byte for byte, except what a
refactor may change by design, or what differs between any two runs:
- a manifest's `code` (digests of the files the stage ran, which a refactor edits) and
  the digest of an input that is a folder (another stage's output, with its manifest:
  that folder's files are compared here one by one);
- in metrics files, measured times (keys ending in `seconds`);
- in the Great Expectations Data Docs (reports/quality/), the validation times and
  context ids GX writes into pages and file names.
Such files are compared with those left out and listed apart. Exits 1 if any other
byte differs or a file is in one run only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

FOLDERS = ("data", "metrics", "plots", "reports")
DOCS = "reports/quality/"
# what GX writes per validation run: times (in pages and file names), sort keys, random ids
GX_VOLATILE = re.compile(
    r"\d{8}T\d{6}\.\d+Z|\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?(?: UTC)?|_run_time_sort\W+[\d.]+|"
    r"dataContextId=[0-9a-f-]+|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:\+00:00|Z)?|"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


def key(rel: str) -> str:
    """A file's name for pairing: Data Docs pages are named by validation time."""
    return GX_VOLATILE.sub("<time>", rel) if rel.startswith(DOCS) else rel


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


def masked(run: Path, rel: str, data: bytes) -> Any | None:
    """The comparable content of a file whose bytes may differ by design, else None."""
    if rel.startswith(DOCS):
        return GX_VOLATILE.sub("<time>", data.decode("utf-8", "replace"))
    if not rel.endswith(".json"):
        return None
    obj = json.loads(data)
    if rel.endswith("manifest.json") and isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "code"}
        inputs = obj.get("inputs", {})
        for name, entry in inputs.items():
            if isinstance(entry, dict) and (run / str(entry.get("path", ""))).is_dir():
                inputs[name] = {k: v for k, v in entry.items() if k != "sha256"}
    return without_times(obj)


def compare(a: Path, b: Path) -> dict[str, list[str]]:
    fa, fb = {key(r): r for r in files(a)}, {key(r): r for r in files(b)}
    result: dict[str, list[str]] = {"identical": [], "same_but_masked": [], "different": []}
    result["only_in_a"] = sorted(fa[k] for k in set(fa) - set(fb))
    result["only_in_b"] = sorted(fb[k] for k in set(fb) - set(fa))
    for k in sorted(set(fa) & set(fb)):
        da, db = (a / fa[k]).read_bytes(), (b / fb[k]).read_bytes()
        if da == db:
            result["identical"].append(fa[k])
            continue
        ma = masked(a, fa[k], da)
        same = ma is not None and ma == masked(b, fb[k], db)
        result["same_but_masked" if same else "different"].append(fa[k])
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
