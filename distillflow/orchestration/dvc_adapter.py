"""The one place distillflow uses DVC's Python API (pyproject.toml pins `dvc>=3.60,<4`).

Most of what the flow needs is not DVC's public API (`dvc.api` reads data; it does not
run stages): the repo's index (stages with foreach/matrix expanded, and its graph), a
stage's deps, params and outs with their hashes, its `changed*` checks, what
`dvc repro` does after a stage ran (save, commit, dump to dvc.lock), the run-cache
restore, how DVC runs a stage command (shell, environment) and how `dvc exp run -S`
parses and applies overrides. Every such use is here, and tests/test_dvc_adapter.py
pins each behaviour it relies on, so a DVC upgrade that changes one fails there,
naming it. Nothing else in distillflow imports `dvc`.

`Project` is one opened DVC repo. A flow run opens one (`session`) and every DVC call
of the run goes through it, as `dvc repro` works with one repo: the index is built
once, DVC's repo lock (.dvc/tmp/lock) is held for the whole run, and only a stage the
flow changed (ran, committed, restored) is read again from dvc.yaml/dvc.lock the next
time it is asked about. Outside a session, `project(root)` opens one for the call.

All calls hold DVC_LOCK, one process-wide lock: DVC's in-process API is not
thread-safe, and two DVC operations on one repo at once fight over its lock and state
database (see docs/STACK.md). Stage commands run outside it.

The method comparison's second dvc.yaml, comparison/dvc.yaml, is in DVC's index too:
its stages are named `comparison/dvc.yaml:<stage>` by `stage_name` (`report` is
`comparison/dvc.yaml:report`); each stage's `dvcfile` (in `describe`) says which file
it comes from.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import Stage as DvcStage

# Serialises every in-process DVC call of this process. Reentrant so a helper holding
# it can call another.
DVC_LOCK = threading.RLock()

# root (resolved) -> the Project a flow run holds open on it
_SESSIONS: dict[Path, Project] = {}


class StageError(RuntimeError):
    """A stage could not be fingerprinted, run or recorded; the message names it."""


class OverrideError(ValueError):
    """An `-S` override DVC's Hydra code rejects; the message is DVC's."""


def stage_name(stage: DvcStage) -> str:
    """The stage's address relative to the repo root, as `dvc dag` run there prints it.

    (DVC's own `stage.addressing` is relative to the process's working directory.)
    """
    path = Path(stage.path_in_repo).as_posix()
    name = getattr(stage, "name", None)
    if name is None:  # a .dvc file (dvc add / dvc import)
        return path
    return name if path == "dvc.yaml" else f"{path}:{name}"


def _check_cwd(root: Path) -> None:
    if Path.cwd().resolve() != root:
        # DVC resolves some paths against the process's working directory, not the
        # repo (run-cache restore builds its stage from the relative "dvc.yaml").
        raise RuntimeError(f"DVC operations on {root} must run with it as the working directory (cwd is {Path.cwd()})")


class Project:
    """One DVC repo, its index and DVC's repo lock; see the module docstring."""

    def __init__(self, repo: Repo):
        self.repo = repo
        self._by_name: dict[str, DvcStage] | None = None
        self._stale: set[str] = set()

    # --- the index --------------------------------------------------------------

    def _stages(self) -> dict[str, DvcStage]:
        if self._by_name is None:
            self._by_name = {stage_name(s): s for s in self.repo.index.stages}
        return self._by_name

    def _reload(self) -> None:
        """Forget the index (as DVC's own lock cycle does) so it is read again."""
        self.repo._reset()
        self._by_name = None
        self._stale.clear()

    def stage(self, name: str) -> DvcStage:
        if name in self._stale:
            self._reload()
        stages = self._stages()
        if name not in stages:
            raise KeyError(f"DVC knows no stage {name!r} in {self.repo.root_dir}; stages: {', '.join(sorted(stages))}")
        return stages[name]

    def touched(self, name: str) -> None:
        """The flow changed this stage's record (dvc.lock, outs): read it again next time.

        Needed because a stage object keeps what it loaded (e.g. `cmd_changed`) after
        `save`/`dump`; other stages' objects stay valid (their dvc.lock entries are
        untouched and their deps are hashed afresh from the workspace each time)."""
        self._stale.add(name)

    def _rel(self, path: str) -> str:
        return Path(os.path.relpath(path, self.repo.root_dir)).as_posix()

    def describe(self) -> tuple[list[dict[str, Any]], set[tuple[str, str]]]:
        """Every stage in index order (foreach/matrix expanded) as plain data, and the
        edges (upstream, downstream) of DVC's graph, as `dvc dag` draws them."""
        from dvc.dependency.param import ParamsDependency

        stages = self._stages()
        found = []
        for name, stage in stages.items():
            found.append(
                {
                    "name": name,
                    "dvcfile": Path(stage.path_in_repo).as_posix(),
                    "cmd": stage.cmd,
                    "wdir": self._rel(stage.wdir) or ".",
                    "deps": tuple(self._rel(d.fs_path) for d in stage.deps if not isinstance(d, ParamsDependency)),
                    "params": {
                        self._rel(d.fs_path): tuple(d.params) for d in stage.deps if isinstance(d, ParamsDependency)
                    },
                    "outs": tuple(self._rel(o.fs_path) for o in stage.outs),
                    # the stage's numbers: its DVC metrics and its plain metrics/*.json outs
                    # (dvc.yaml declares as metrics only what experiments are compared on)
                    "metrics": tuple(
                        rel
                        for o, rel in ((o, self._rel(o.fs_path)) for o in stage.outs)
                        if o.metric or (rel.startswith("metrics/") and rel.endswith(".json"))
                    ),
                    "always_changed": bool(stage.always_changed),
                    "frozen": bool(stage.frozen),
                }
            )
        # DVC's graph: an edge points from a stage to a stage it depends on.
        edges = {(stage_name(up), stage_name(down)) for down, up in self.repo.index.graph.edges}
        return found, edges

    # --- what a stage's cache key is made of ---------------------------------------

    def is_source(self, name: str) -> bool:
        """A data source (.dvc file) or a frozen stage: DVC never runs it."""
        stage = self.stage(name)
        return stage.cmd is None or bool(stage.frozen)

    def always_changed(self, name: str) -> bool:
        return bool(self.stage(name).always_changed)

    def recorded_outs(self, name: str) -> list[list[str]]:
        """[path, hash name, hash value] of each out as the stage's file records it."""
        return sorted([self._rel(o.fs_path), o.hash_info.name, o.hash_info.value] for o in self.stage(name).outs)

    def param_hashes(self, name: str) -> dict[str, Any]:
        """params file -> the values of the keys the stage declares in it."""
        from dvc.dependency.param import (
            BadParamFileError,
            MissingParamsError,
            MissingParamsFile,
            ParamsDependency,
            ParamsIsADirectoryError,
        )

        params = {}
        for dep in self.stage(name).deps:
            if isinstance(dep, ParamsDependency):
                try:
                    params[self._rel(dep.fs_path)] = dep.get_hash().value
                except (MissingParamsFile, MissingParamsError, BadParamFileError, ParamsIsADirectoryError) as exc:
                    path = self._rel(dep.fs_path)
                    raise StageError(f"stage {name!r}: cannot read its params from {path}: {exc}") from exc
        return params

    def dep_hashes(self, name: str) -> list[list[str]]:
        """[path, hash name, hash value] of each (non-params) dep, hashed now as
        `dvc status` hashes it (the md5s dvc.lock records)."""
        from dvc.dependency.param import ParamsDependency

        deps = []
        for dep in self.stage(name).deps:
            if isinstance(dep, ParamsDependency):
                continue
            if not dep.exists:
                raise StageError(
                    f"stage {name!r}: dependency {self._rel(dep.fs_path)} does not exist "
                    "(is an upstream stage's output missing?)"
                )
            info = dep.get_hash()
            deps.append([self._rel(dep.fs_path), info.name, info.value])
        return sorted(deps)

    def command_parts(self, name: str) -> dict[str, Any]:
        stage = self.stage(name)
        return {
            "cmd": stage.cmd,
            "wdir": self._rel(stage.wdir),
            "outs": sorted(self._rel(o.fs_path) for o in stage.outs),
        }

    def outs_digests(self, name: str) -> dict[str, str]:
        """The stage's outs as its dvc.lock entry records them: path -> md5 (`.dir` md5
        for folders)."""
        return {self._rel(o.fs_path): str(o.hash_info.value) for o in self.stage(name).outs}

    # --- status ------------------------------------------------------------------

    def changed(self, name: str) -> bool:
        """What `dvc status` reports for the stage: command, deps, params or outs differ
        from its dvc.lock entry (or an out is not in the DVC cache)."""
        return bool(self.stage(name).changed())

    def outs_changed(self, name: str) -> bool:
        return bool(self.stage(name).changed_outs())

    def only_cache_lost(self, name: str) -> bool:
        """Command, deps and params unchanged and the workspace holds exactly what
        dvc.lock records: whatever `dvc status` still reports is the DVC cache."""
        stage = self.stage(name)
        if stage.changed_stage() or stage.changed_deps():
            return False
        return not any(out.workspace_status() for out in stage.outs)

    def status(self) -> dict[str, Any]:
        """`dvc status` (every stage): stage -> its changes; absent when all agree."""
        if self._stale:
            self._reload()
        return self.repo.status()

    # --- changing what DVC records ---------------------------------------------------

    @contextmanager
    def _changing(self, name: str) -> Iterator[DvcStage]:
        """The stage, inside DVC's git context: with `core.autostage` (this repo sets
        it) dvc.lock and .gitignore changes are staged, as after `dvc repro`."""
        stage = self.stage(name)
        try:
            with self.repo.scm_context():
                yield stage
        finally:
            self.touched(name)

    def record(self, name: str) -> None:
        """What `dvc repro` does after a stage ran: hash deps and outs, move outs into
        the cache, save the run-cache entry, write the stage's dvc.lock entry."""
        with self._changing(name) as stage:
            _record(name, stage)

    def restore_from_cache(self, name: str) -> bool:
        """Put the stage's outputs back from the DVC cache (dvc.lock's entry when its
        deps and params still match, else the run-cache entry for the current ones)
        and record them; False when DVC has no complete copy."""
        from dvc.stage.cache import RunCacheNotFoundError

        with self._changing(name) as stage:
            try:
                self.repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:
                return False
            _record(name, stage)
        return True

    def checkout(self, name: str) -> None:
        """A data source's or frozen stage's recorded outputs, from the DVC cache."""
        from dvc.exceptions import CheckoutError

        with self._changing(name) as stage:
            try:
                stage.checkout()
            except CheckoutError as exc:
                raise StageError(
                    f"stage {name!r}: cannot check out its recorded outputs from the DVC cache: {exc}"
                ) from exc

    def remove_outs(self, name: str) -> None:
        """Remove the stage's outputs before it runs, as `dvc repro` does (persist
        outs stay)."""
        with self._changing(name) as stage:
            stage.remove_outs(ignore_remove=False, force=False)

    def remove_partial_outs(self, name: str) -> list[str]:
        """Remove the (non-persist) outs a failed attempt left; returns their paths as
        dvc.yaml writes them."""
        removed = []
        with self._changing(name) as stage:
            for out in stage.outs:
                if out.persist:
                    continue
                if out.exists:
                    out.remove(ignore_remove=False)
                    removed.append(out.def_path)
        return removed


def _record(name: str, stage: DvcStage) -> None:
    from dvc.output import OutputDoesNotExistError

    # Same rule as DVC's Stage.run: a cache: false out that is not a metric or plot
    # keeps the stage out of the run-cache.
    no_cache_outs = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
    try:
        stage.save(run_cache=not no_cache_outs)
        stage.commit()
    except OutputDoesNotExistError as exc:
        raise StageError(f"stage {name!r}: an output is missing after the stage ran: {exc}") from exc
    stage.dump(update_pipeline=False)


def _open(root: Path) -> Repo:
    from dvc.repo import Repo

    _check_cwd(root)
    return Repo(str(root))


@contextmanager
def _held(repo: Repo) -> Iterator[None]:
    """DVC's repo lock, as `dvc repro` holds it (re-entered calls do not re-read)."""
    from dvc.repo import lock_repo

    with lock_repo(repo):
        yield


@contextmanager
def session(root: Path) -> Iterator[Project]:
    """One Project for a whole flow run on `root`, used by every `project(root)` call
    of this process (any thread) until the block ends. DVC_LOCK is taken only to open
    and close it: the flow's threads take it per call."""
    root = Path(root).resolve()
    stack = ExitStack()
    with DVC_LOCK:
        if root in _SESSIONS:
            raise RuntimeError(f"a DVC session on {root} is already open in this process")
        repo = _open(root)
        stack.callback(repo.close)
        try:
            stack.enter_context(_held(repo))
        except BaseException:
            stack.close()
            raise
        _SESSIONS[root] = Project(repo)
    try:
        yield _SESSIONS[root]
    finally:
        with DVC_LOCK:
            del _SESSIONS[root]
            stack.close()


@contextmanager
def project(root: Path) -> Iterator[Project]:
    """The run's Project on `root` if a session is open, else one opened (and DVC's
    repo lock held) for this block; DVC_LOCK is held throughout."""
    root = Path(root).resolve()
    with DVC_LOCK:
        if root in _SESSIONS:
            _check_cwd(root)
            yield _SESSIONS[root]
            return
        repo = _open(root)
        try:
            with _held(repo):
                yield Project(repo)
        finally:
            repo.close()


# --- running a stage command as DVC does ---------------------------------------------


def stage_env() -> dict[str, str]:
    """The environment DVC gives a stage command (its `fix_env` of this process's)."""
    from dvc.utils import fix_env

    return fix_env(None)


def command_lines(cmd: str | list[str]) -> list[str]:
    """A stage's `cmd` (one string or a list) as the commands DVC runs in turn."""
    from dvc.stage.run import _enforce_cmd_list

    return _enforce_cmd_list(cmd)


def shell_argv(line: str) -> list[str] | str:
    """What DVC hands to Popen for one command line: its shell (`$SHELL`, else
    /bin/sh) running the line."""
    from dvc.stage.run import _make_cmd, get_executable

    return _make_cmd(get_executable(), line)


# --- `-S` overrides, as `dvc exp run -S` applies them ---------------------------------


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`[file:]key=value` overrides grouped by params file (default params.yaml)."""
    from dvc.utils.cli_parse import to_path_overrides

    return to_path_overrides(overrides)


def apply_file_overrides(path: Path, overrides: list[str]) -> None:
    """Apply one file's overrides in place with DVC's Hydra code; OverrideError if DVC
    rejects one (an unknown key without `+`, bad grammar)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    try:
        dvc_apply_overrides(path, overrides)
    except InvalidArgumentError as exc:
        raise OverrideError(str(exc.__cause__ or exc)) from exc
