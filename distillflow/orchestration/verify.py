"""`distillflow lineage verify`: recompute every digest and sort what disagrees.

The sources: DVC's own status (dvc.lock's md5s vs the workspace, the deps, params and
the DVC cache) and each out's manifest.json (its output sha256s vs the files, its input
sha256s vs the files now there and vs the upstream manifest that recorded them, its
code digests vs the code now). Per stage, three kinds of finding:

- mismatch (exit 1): a file present whose content disagrees with dvc.lock's hash or
  with its manifest; or, for a stage that is up to date, a manifest that disagrees with
  its inputs, the upstream manifest or the code. One line each, naming the path.
- never ran here / not checked out (reported): outs absent from the workspace. "Never
  ran here" when one is in neither the workspace nor the DVC cache (a stage of
  comparison/dvc.yaml on a fresh clone after `dvc repro`; or a stage with no dvc.lock
  entry); "not checked out" when what is absent is in the DVC cache or git (deleted,
  fetched but not checked out; `dvc checkout` or git restores it). An absent file
  cannot disagree with its record, so neither fails; the stage's outs that are present
  (a `cache: false` out committed to git) are still checked.
- stale (reported): outs present and as dvc.lock records them, but the deps, params or
  the stage's dvc.yaml entry changed since it ran (`dvc status`'s changed deps; e.g.
  the rounds after `dvc repro evaluate`). Its manifest is checked against its outputs
  only: what it read and its code are expected to differ from what it recorded.

An out present but missing from the DVC cache (`dvc status` then says "not in cache"
whatever the workspace holds): a file is compared with dvc.lock's md5 here, a folder
only through its manifest (a note says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillflow.base.io import digest_path
from distillflow.orchestration.trace import Out, lock_outs, read_manifest


@dataclass
class Report:
    """What `verify` found (the module docstring says how it sorts). Only mismatches fail it."""

    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    never_ran: dict[str, str] = field(default_factory=dict)  # stage -> why (what is missing)
    not_checked_out: dict[str, str] = field(default_factory=dict)  # stage -> its outs absent from the workspace
    stale: dict[str, str] = field(default_factory=dict)  # stage -> what changed since it ran
    checked: int = 0


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status` through DVC's API: stage -> its changes (empty when all agree)."""
    from distillflow.orchestration.dvc_adapter import project

    with project(root) as p:
        return p.status()


def _split_status(changes: list[Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A stage's `dvc status` entries: (its changed outs, its changed deps and params, the rest)."""
    outs: dict[str, Any] = {}
    deps: dict[str, Any] = {}
    rest: list[str] = []
    for change in changes:
        if isinstance(change, dict):
            outs |= change.get("changed outs", {})
            deps |= change.get("changed deps", {})
            rest += [f"{k}: {v}" for k, v in change.items() if k not in ("changed outs", "changed deps")]
        elif change == "changed checksum":
            rest.append("its dvc.yaml entry (command, deps, params or outs)")
        elif change != "always changed":
            rest.append(str(change))
    return outs, deps, rest


def _changed_since(deps: dict[str, Any], rest: list[str]) -> str:
    parts = []
    for path, state in deps.items():
        items = state.items() if isinstance(state, dict) else [("", state)]  # a params file: param -> state
        parts += [" ".join(filter(None, (path, key, str(s)))) for key, s in items]
    return "changed since it ran: " + ", ".join(parts + rest)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_uncached(root: Path, out: Out | None, path: str, report: Report) -> None:
    """An out in the workspace whose content the DVC cache lacks (`dvc status` then says
    "not in cache" whatever the workspace holds): a file is compared with dvc.lock's md5
    here; a folder cannot be without DVC's own hashing, so only its manifest is checked."""
    file = root / path
    if out is None or out.hash_name != "md5" or not out.md5 or out.md5.endswith(".dir") or not file.is_file():
        report.notes.append(f"{path}: not in the DVC cache, so not compared with dvc.lock (its manifest, if any, is)")
    elif (got := _file_md5(file)) != out.md5:
        report.mismatches.append(
            f"dvc.lock: stage {out.stage}: changed outs: {path}: modified (md5 {got}, dvc.lock records {out.md5}; "
            "not in the DVC cache)"
        )
    else:
        report.notes.append(f"{path}: as dvc.lock records it, but not in the DVC cache (`dvc commit {out.stage}`)")


def _classify(root: Path, name: str, changes: list[Any], outs: dict[str, Out], report: Report) -> None:
    """One stage with a dvc.lock entry, from its `dvc status`: an out present that differs
    from dvc.lock is a mismatch; the stage never ran here (an out in neither the workspace
    nor the DVC cache), is not checked out (outs absent, the cache or git holds them), is
    stale (deps, params or its dvc.yaml entry changed since it ran) or always changes."""
    changed_outs, deps, rest = _split_status(changes)
    absent, nowhere = [], []
    for path, state in changed_outs.items():
        if state == "not in cache" and (root / path).exists():
            _check_uncached(root, outs.get(path), path, report)
        elif state in ("deleted", "not in cache"):
            absent.append(path)
            nowhere += [path] if state == "not in cache" else []
        else:  # modified (or new: no hash recorded)
            report.mismatches.append(f"dvc.lock: stage {name}: changed outs: {path}: {state}")
    if nowhere:
        report.never_ran[name] = f"{', '.join(nowhere)}: in neither the workspace nor the DVC cache"
    elif absent:
        report.not_checked_out[name] = (
            f"{', '.join(absent)}: not in the workspace; `dvc checkout {name}` restores what the DVC cache holds"
        )
    elif deps or rest:
        report.stale[name] = _changed_since(deps, rest)
    elif "always changed" in changes:  # `always_changed: true` (identify): DVC reports it whatever it holds
        report.notes.append(f"stage {name}: always changed (reruns on every repro); its outputs match dvc.lock")


def check_manifest(
    root: Path,
    out: Out,
    manifest: dict[str, Any],
    recorded: dict[str, tuple[str, str]],
    report: Report,
    inputs: bool = True,
) -> None:
    """One manifest against its files and, with `inputs`, against its inputs, the upstream
    manifests and the code (not for a stage that is stale or not all here: what it read
    and its code are then expected to differ from what it recorded)."""
    mfile = f"{out.path}/manifest.json"
    for name, entry in manifest.get("outputs", {}).items():
        path = root / out.path / name
        report.checked += 1
        if not path.exists():
            report.mismatches.append(f"{out.path}/{name}: missing, but {mfile} records it (sha256 {entry['sha256']})")
        elif (got := digest_path(path)) != entry["sha256"]:
            report.mismatches.append(
                f"{out.path}/{name}: file sha256 {got} differs from {mfile}'s record {entry['sha256']}"
            )
    if not inputs:
        return
    for name, entry in manifest.get("inputs", {}).items():
        path = root / entry["path"]
        report.checked += 1
        if not path.exists():
            report.mismatches.append(f"{mfile}: input {name} {entry['path']} is missing")
            continue
        if (got := digest_path(path)) != entry["sha256"]:
            report.mismatches.append(
                f"{mfile}: input {name} {entry['path']}: the file now has sha256 {got}, the manifest recorded "
                f"{entry['sha256']}"
            )
        upstream = recorded.get(Path(entry["path"]).as_posix())
        if upstream is not None and upstream[1] != entry["sha256"]:
            report.mismatches.append(
                f"{mfile}: input {name} {entry['path']}: recorded sha256 {entry['sha256']}, but {upstream[0]} "
                f"recorded {upstream[1]} for it"
            )
    for rel, digest in manifest.get("code", {}).items():
        report.checked += 1
        if not (root / rel).is_file():
            report.mismatches.append(f"{mfile}: code {rel} no longer exists")
        elif (got := digest_path(root / rel)) != digest:
            report.mismatches.append(
                f"{mfile}: code {rel} now has sha256 {got}, the manifest recorded {digest} (changed since {out.path} "
                "was made)"
            )


def verify(root: Path) -> Report:
    """Every file that disagrees with dvc.lock or with its manifest (the mismatches), and
    the stages that never ran here, are not checked out or are stale (reported only)."""
    report = Report()
    outs = lock_outs(root)
    locked = {o.stage for o in outs}
    by_path = {o.path: o for o in outs}
    for name, changes in sorted(dvc_status(root).items()):
        if name in locked:
            _classify(root, name, changes, by_path, report)
        else:
            report.never_ran[name] = "no dvc.lock entry"
    unsettled = report.never_ran.keys() | report.not_checked_out.keys() | report.stale.keys()
    manifests = [(o, m) for o in outs if (m := read_manifest(root, o)) is not None]
    # path -> (manifest that wrote it, sha256 it recorded)
    recorded = {
        f"{o.path}/{name}": (f"{o.path}/manifest.json", e["sha256"])
        for o, m in manifests
        for name, e in m.get("outputs", {}).items()
    }
    for out, manifest in manifests:
        check_manifest(root, out, manifest, recorded, report, inputs=out.stage not in unsettled)
    report.checked += len(outs)
    return report


def render_verify(report: Report) -> list[str]:
    """`lineage verify`'s text: notes, the stages that never ran here, are not checked out
    or are stale, each mismatch, then the summary (CI greps it for " 0 mismatches")."""
    lines = [f"note: {n}" for n in report.notes]
    kinds = (("never ran here", report.never_ran), ("not checked out", report.not_checked_out), ("stale", report.stale))
    for kind, stages in kinds:
        lines += [f"{kind}: {name} ({why})" for name, why in sorted(stages.items())]
    lines += [f"MISMATCH {m}" for m in report.mismatches]
    lines.append(
        f"lineage verify: {report.checked} digests and records checked, {len(report.mismatches)} mismatches; "
        f"stages: {len(report.never_ran)} never ran here, {len(report.not_checked_out)} not checked out, "
        f"{len(report.stale)} stale"
    )
    return lines
