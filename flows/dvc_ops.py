"""What the Prefect flow asks of DVC, one stage at a time.

- `fingerprint`: the stage's own cache key: its command, the values of the params
  keys it declares, the content hashes of its deps (DVC's hashing, the md5s dvc.lock
  records) and its out paths. The same inputs as DVC's run-cache key.
- `reuse`: before running anything, what DVC already has: a stage that dvc.lock says
  is up to date, or one DVC's run-cache can restore, is not run again.
- `run_command`: the stage's `cmd`, run as `dvc repro` runs it (same shell, working
  directory, DVC_ROOT/DVC_STAGE), outside any lock so independent stages overlap.
- `commit`: record the stage as `dvc repro` would after running it: deps and outs
  hashed, outs moved into the DVC cache, the run-cache entry saved, dvc.lock updated.
- `ensure`: after a Prefect cache hit, the stage's outputs are put back from the DVC
  cache if the workspace does not hold them, and dvc.lock is brought in line.
- `clean_failed`: a failed attempt leaves no partial output behind.
- `apply_overrides`: `-S key=value`, applied to the params file exactly as
  `dvc exp run -S` applies it (DVC's own Hydra override code).

All DVC API calls hold `dag.open_repo`'s lock (and DVC's repo lock); stage commands
do not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.dag import find_stage, open_repo

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import Stage as DvcStage

FINGERPRINT_VERSION = 1


class StageError(RuntimeError):
    """A stage could not be fingerprinted, run or recorded; the message names it."""


class StageCommandFailed(StageError):
    def __init__(self, stage: str, cmd: str, returncode: int, tail: list[str]):
        if returncode < 0:
            how = f"was killed by signal {-returncode}"
        elif 128 < returncode <= 128 + 64:
            # The stage shell forked the command instead of exec'ing it (which shells do
            # depends on the shell and the command), and reports a killed child as 128+N.
            how = f"exited with {returncode}: its process was killed by signal {returncode - 128}"
        else:
            how = f"exited with {returncode}"
        lines = "\n".join(tail)
        super().__init__(f"stage {stage!r}: command {how}: {cmd}\nlast output lines:\n{lines}")
        self.stage, self.cmd, self.returncode = stage, cmd, returncode


@contextmanager
def _locked(repo: Repo) -> Iterator[None]:
    """DVC's repo lock, plus its git context: with `core.autostage` (this repo sets
    it) dvc.lock and .gitignore changes are staged, as after `dvc repro`."""
    from dvc.repo import lock_repo

    with lock_repo(repo), repo.scm_context():
        yield


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """One flow run per checkout at a time (two would remove and rewrite each other's
    outputs): an exclusive lock on .dvc/tmp/distillflow-run.lock, refused at once."""
    path = Path(root) / ".dvc" / "tmp" / "distillflow-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StageError(f"another distillflow run holds {path}: one run per checkout at a time") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the fingerprint ---------------------------------------------------------------


def fingerprint_parts(root: Path, name: str) -> dict[str, Any] | None:
    """What the stage's cache key is made of; None for a stage DVC always reruns."""
    from dvc.dependency.param import (
        BadParamFileError,
        MissingParamsError,
        MissingParamsFile,
        ParamsDependency,
        ParamsIsADirectoryError,
    )

    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        if stage.always_changed:
            return None
        rel = lambda p: Path(os.path.relpath(p, repo.root_dir)).as_posix()
        if stage.cmd is None or stage.frozen:
            # A data source (.dvc file) or a frozen stage: DVC never runs it, its
            # outputs are what its file records.
            return {
                "v": FINGERPRINT_VERSION,
                "recorded_outs": sorted([rel(o.fs_path), o.hash_info.name, o.hash_info.value] for o in stage.outs),
            }
        deps, params = [], {}
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                try:
                    params[rel(dep.fs_path)] = dep.get_hash().value
                except (MissingParamsFile, MissingParamsError, BadParamFileError, ParamsIsADirectoryError) as exc:
                    raise StageError(f"stage {name!r}: cannot read its params from {rel(dep.fs_path)}: {exc}") from exc
                continue
            if not dep.exists:
                raise StageError(
                    f"stage {name!r}: dependency {rel(dep.fs_path)} does not exist (is an upstream stage's output missing?)"
                )
            info = dep.get_hash()
            deps.append([rel(dep.fs_path), info.name, info.value])
        return {
            "v": FINGERPRINT_VERSION,
            "cmd": stage.cmd,
            "wdir": rel(stage.wdir),
            "params": params,
            "deps": sorted(deps),
            "outs": sorted(rel(o.fs_path) for o in stage.outs),
        }


def fingerprint(root: Path, name: str) -> str | None:
    """sha256 of `fingerprint_parts` (canonical JSON); None: never cache this stage."""
    parts = fingerprint_parts(root, name)
    if parts is None:
        return None
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- reuse what DVC has ------------------------------------------------------------


def _record(repo: Repo, stage: DvcStage) -> None:
    """What `dvc repro` does after a stage ran: hash deps and outs, move outs into the
    cache, save the run-cache entry, write the stage's dvc.lock entry."""
    from dvc.output import OutputDoesNotExistError

    # Same rule as dvc's Stage.run: a cache: false out that is not a metric or plot
    # keeps the stage out of the run-cache.
    no_cache_outs = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
    try:
        stage.save(run_cache=not no_cache_outs)
        stage.commit()
    except OutputDoesNotExistError as exc:
        raise StageError(f"stage {stage_label(stage)!r}: an output is missing after the stage ran: {exc}") from exc
    stage.dump(update_pipeline=False)


def stage_label(stage: DvcStage) -> str:
    from flows.dag import stage_name

    return stage_name(stage)


def _restore(repo: Repo, stage: DvcStage) -> bool:
    """Put the stage's outputs back from the DVC cache (dvc.lock's entry when its deps
    and params still match, else the run-cache entry for the current ones) and record
    them. False when DVC has no complete copy."""
    from dvc.stage.cache import RunCacheNotFoundError

    try:
        repo.stage_cache.restore(stage)
    except RunCacheNotFoundError:
        return False
    _record(repo, stage)
    return True


def _recommit_if_only_cache_lost(repo: Repo, stage: DvcStage) -> bool:
    """True, after committing the outputs to the DVC cache again, when the stage is
    unchanged except that the DVC cache lost its outputs (`dvc status`: "not in
    cache") while the workspace still holds exactly what dvc.lock records."""
    if stage.changed_stage() or stage.changed_deps():
        return False
    if any(out.workspace_status() for out in stage.outs):
        return False
    _record(repo, stage)
    return True


def reuse(root: Path, name: str) -> str | None:
    """'up-to-date' when dvc.lock already matches the workspace, 'run-cache' when DVC
    restored the outputs of an earlier identical run, None when the stage must run."""
    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        if stage.cmd is None or stage.frozen:
            return "up-to-date" if not stage.changed_outs() else None
        if stage.always_changed:
            return None
        if not stage.changed() or _recommit_if_only_cache_lost(repo, stage):
            return "up-to-date"
        return "run-cache" if _restore(repo, stage) else None


def ensure(root: Path, name: str) -> str:
    """After a Prefect cache hit (or a run): 'in-sync' when dvc.lock and the workspace
    already agree with the stage's current inputs; 'restored' when its outputs were
    put back from the DVC cache and dvc.lock updated; 'missing' when DVC holds no copy
    of them (the caller then has to run the stage)."""
    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        if stage.cmd is None or stage.frozen:
            from dvc.exceptions import CheckoutError

            if not stage.changed_outs():
                return "in-sync"
            try:
                stage.checkout()
            except CheckoutError as exc:
                raise StageError(
                    f"stage {name!r}: cannot check out its recorded outputs from the DVC cache: {exc}"
                ) from exc
            return "restored"
        if not stage.changed() or _recommit_if_only_cache_lost(repo, stage):
            return "in-sync"
        if not _restore(repo, stage):
            return "missing"
    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        if stage.changed():
            raise StageError(
                f"stage {name!r}: outputs restored from the DVC cache, but `dvc status` still reports it changed"
            )
    return "restored"


def is_up_to_date(root: Path, name: str) -> bool:
    with open_repo(root) as repo, _locked(repo):
        return not find_stage(repo, name).changed()


# --- running a stage ---------------------------------------------------------------


def remove_outs(root: Path, name: str) -> None:
    """Remove the stage's outputs before it runs, as `dvc repro` does (persist outs stay)."""
    with open_repo(root) as repo, _locked(repo):
        find_stage(repo, name).remove_outs(ignore_remove=False, force=False)


def commit(root: Path, name: str) -> None:
    with open_repo(root) as repo, _locked(repo):
        _record(repo, find_stage(repo, name))


def clean_failed(root: Path, name: str, outs: tuple[str, ...]) -> list[str]:
    """Remove whatever a failed attempt left: its (partial) outs and the temporary
    siblings stages write before their atomic rename (`.<name>.*.tmp`, `.<name>.old`,
    see stages/lib/data/io.py). Returns what was removed."""
    removed = []
    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        for out in stage.outs:
            if out.persist:
                continue
            if out.exists:
                out.remove(ignore_remove=False)
                removed.append(out.def_path)
    for rel in outs:
        target = Path(root) / rel
        for left in [*target.parent.glob(f".{target.name}.*.tmp"), target.with_name(f".{target.name}.old")]:
            if left.is_dir():
                shutil.rmtree(left)
            elif left.exists():
                left.unlink()
            else:
                continue
            removed.append(left.relative_to(root).as_posix())
    return removed


def run_command(
    root: Path, name: str, cmd: str | list[str], wdir: str, log: Callable[[str], None]
) -> tuple[float, float]:
    """Run the stage's command(s) the way `dvc repro` does; stream output lines to
    `log`. Returns (start, end) wall-clock times. Raises StageCommandFailed."""
    from dvc.stage.run import _enforce_cmd_list, _make_cmd, get_executable
    from dvc.utils import fix_env

    env = fix_env(None)
    env["DVC_ROOT"] = str(root)
    env["DVC_STAGE"] = name
    # `python` in a stage command is this interpreter's, even when its virtualenv is
    # not activated (outputs do not depend on it: the command string is unchanged).
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    executable = get_executable()
    start = time.time()
    for line_cmd in _enforce_cmd_list(cmd):
        log(f"> {line_cmd}")
        tail: deque[str] = deque(maxlen=40)
        proc = subprocess.Popen(
            _make_cmd(executable, line_cmd),
            cwd=Path(root) / wdir,
            env=env,
            close_fds=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        returncode = proc.wait()
        if returncode != 0:
            raise StageCommandFailed(name, line_cmd, returncode, list(tail))
    return start, time.time()


def outs_digests(root: Path, name: str) -> dict[str, str]:
    """The stage's outs as dvc.lock records them: path -> md5 (a `.dir` md5 for folders)."""
    with open_repo(root) as repo, _locked(repo):
        stage = find_stage(repo, name)
        return {Path(os.path.relpath(o.fs_path, repo.root_dir)).as_posix(): str(o.hash_info.value) for o in stage.outs}


# --- params overrides --------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix[:-1]: value}


def apply_overrides(root: Path, overrides: list[str]) -> list[str]:
    """Apply `-S [file:]key=value` overrides to the params file(s) in place, as
    `dvc exp run -S` does (DVC's Hydra override grammar; an unknown key is an error
    unless written `+key=value`). The change stays in the workspace, like
    `dvc exp run -S`, so `dvc status`/`dvc repro` see the same params the flow used.
    Returns one line per changed key: `file: key: old -> new`."""
    import yaml
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    changes = []
    for rel, file_overrides in to_path_overrides(overrides).items():
        path = Path(root) / rel
        if not path.is_file():
            raise StageError(f"-S {' '.join(file_overrides)}: params file {rel} does not exist in {root}")
        before = _flatten(yaml.safe_load(path.read_text()) or {})
        try:
            dvc_apply_overrides(path, file_overrides)
        except InvalidArgumentError as exc:
            cause = exc.__cause__ or exc
            raise StageError(f"-S {' '.join(file_overrides)}: cannot apply to {rel}: {cause}") from exc
        after = _flatten(yaml.safe_load(path.read_text()) or {})
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                changes.append(f"{rel}: {key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return changes
