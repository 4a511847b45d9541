"""What the Prefect flow asks of DVC, one stage at a time.

- `fingerprint`: the stage's own cache key: its command, the values of the params
  keys it declares, the content hashes of its deps (DVC's hashing, the md5s dvc.lock
  records) and its out paths. The same inputs as DVC's run-cache key.
- `reuse`: before running anything, what DVC already has: a stage that dvc.lock says
  is up to date, or one DVC's run-cache can restore, is not run again.
- `run_command`: the stage's `cmd`, run as `dvc repro` runs it (same shell, working
  directory, DVC_ROOT/DVC_STAGE), outside the process's DVC lock so independent
  stages overlap.
- `commit`: record the stage as `dvc repro` would after running it: deps and outs
  hashed, outs moved into the DVC cache, the run-cache entry saved, dvc.lock updated.
- `ensure`: after a Prefect cache hit, the stage's outputs are put back from the DVC
  cache if the workspace does not hold them, and dvc.lock is brought in line.
- `clean_failed`: a failed attempt leaves no partial output behind.
- `apply_overrides`: `-S key=value`, applied to the params file exactly as
  `dvc exp run -S` applies it (DVC's own Hydra override code).

Every DVC call goes through distillflow/orchestration/dvc_adapter.py: during a flow run, one opened repo
and index for the whole run (`dvc_adapter.session`), DVC's repo lock held as
`dvc repro` holds it; stage commands run outside the process's DVC lock, so
independent stages overlap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillflow.engines import parts
from distillflow.orchestration import ray_exec
from distillflow.orchestration.dvc_adapter import (
    OverrideError,
    Project,
    StageError,
    apply_file_overrides,
    project,
    shell_argv,
    split_overrides,
    stage_env,
)
from distillflow.orchestration.dvc_adapter import command_lines as dvc_command_lines
from distillflow.orchestration.preempt import STOP, ProcessGroup, leftovers
from distillflow.orchestration.ray_exec import RayStages

__all__ = ["StageError", "StageCommandFailed", "StageStopped"]

FINGERPRINT_VERSION = 1


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


class StageStopped(StageError):
    """The run was stopped (SIGTERM or SIGINT to the flow: orchestration/preempt.py)
    before or while this stage ran; not retried."""

    def __init__(self, stage: str, signum: int):
        super().__init__(f"stage {stage!r}: stopped by {signal.Signals(signum).name} to the run")
        self.stage, self.signum = stage, signum


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
    with project(root) as p:
        if p.always_changed(name):
            return None
        if p.is_source(name):
            # A data source (.dvc file) or a frozen stage: DVC never runs it, its
            # outputs are what its file records.
            return {"v": FINGERPRINT_VERSION, "recorded_outs": p.recorded_outs(name)}
        parts = p.command_parts(name)
        return {
            "v": FINGERPRINT_VERSION,
            "cmd": parts["cmd"],
            "wdir": parts["wdir"],
            "params": p.param_hashes(name),
            "deps": p.dep_hashes(name),
            "outs": parts["outs"],
        }


def stage_fingerprint(root: Path, name: str) -> str | None:
    """sha256 of `fingerprint_parts` (canonical JSON); None: never cache this stage."""
    parts = fingerprint_parts(root, name)
    if parts is None:
        return None
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- reuse what DVC has ------------------------------------------------------------


def reuse(root: Path, name: str) -> str | None:
    """'up-to-date' when dvc.lock already matches the workspace, 'run-cache' when DVC
    restored the outputs of an earlier identical run, None when the stage must run."""
    with project(root) as p:
        if p.is_source(name):
            return "up-to-date" if not p.outs_changed(name) else None
        if p.always_changed(name):
            return None
        if not p.changed(name) or _recommit_if_only_cache_lost(p, name):
            return "up-to-date"
        return "run-cache" if p.restore_from_cache(name) else None


def _recommit_if_only_cache_lost(p: Project, name: str) -> bool:
    """True, after committing the outputs to the DVC cache again, when the stage is
    unchanged except that the DVC cache lost its outputs (`dvc status`: "not in
    cache") while the workspace still holds exactly what dvc.lock records."""
    if not p.only_cache_lost(name):
        return False
    p.record(name)
    return True


def ensure(root: Path, name: str) -> str:
    """After a Prefect cache hit (or a run): 'in-sync' when dvc.lock and the workspace
    already agree with the stage's current inputs; 'restored' when its outputs were
    put back from the DVC cache and dvc.lock updated; 'missing' when DVC holds no copy
    of them (the caller then has to run the stage)."""
    with project(root) as p:
        if p.is_source(name):
            if not p.outs_changed(name):
                return "in-sync"
            p.checkout(name)
            return "restored"
        if p.always_changed(name):
            # DVC reports such a stage changed whatever it holds; it just ran (it is
            # never a cache hit), so what counts is that its outputs are the recorded ones.
            return "missing" if p.outs_changed(name) else "in-sync"
        if not p.changed(name) or _recommit_if_only_cache_lost(p, name):
            return "in-sync"
        if not p.restore_from_cache(name):
            return "missing"
        if p.changed(name):  # read again from dvc.lock and the workspace
            raise StageError(
                f"stage {name!r}: outputs restored from the DVC cache, but `dvc status` still reports it changed"
            )
    return "restored"


# --- running a stage ---------------------------------------------------------------


def remove_outs(root: Path, name: str) -> None:
    """Remove the stage's outputs before it runs, as `dvc repro` does (persist outs stay)."""
    with project(root) as p:
        p.remove_outs(name)


def commit(root: Path, name: str) -> None:
    with project(root) as p:
        p.record(name)


def clean_failed(root: Path, name: str, outs: tuple[str, ...]) -> list[str]:
    """Remove whatever a failed attempt left: its (partial) outs and the temporary
    siblings stages write before their atomic rename (`.<name>.*.tmp`, `.<name>.old`,
    see distillflow/base/io.py). Returns what was removed."""
    with project(root) as p:
        removed = p.remove_partial_outs(name)
    for rel in outs:
        for left in leftovers(Path(root) / rel):
            if left.is_dir():
                shutil.rmtree(left)
            elif left.exists():
                left.unlink()
            else:
                continue
            removed.append(left.relative_to(root).as_posix())
    return removed


def run_command(
    root: Path,
    name: str,
    cmd: str | list[str],
    wdir: str,
    log: Callable[[str], None],
    outs: Sequence[str] = (),
    ray: RayStages | None = None,
    passive_threads: bool = False,
    split: bool = False,
) -> tuple[float, float]:
    """Run the stage's command(s) the way `dvc repro` does, here or, when the stage
    matches `ray`'s patterns, as a Ray task (ray_exec.py; `outs`: what a retried task
    clears first); `split`: in `ray.parts` parts on Ray first (_run_parts). Output
    lines go to `log`. `passive_threads`: the stage may run beside others (OMP_WAIT_POLICY below).
    Returns (start, end) wall-clock times. Raises StageCommandFailed, or StageStopped
    when the run is being stopped."""
    env = stage_env()
    env["DVC_ROOT"] = str(root)
    env["DVC_STAGE"] = name
    whole = ray is not None and ray.matches(name)
    lines = dvc_command_lines(cmd)
    start = time.time()
    if split:  # parts are Ray tasks, with their CPUs to themselves: no passive waiting
        assert ray is not None
        _run_parts(ray, root, name, lines, wdir, _with_python_first(env), log)
    if passive_threads and not whole:  # a Ray task has its CPUs to itself
        # This stage may run beside others, 2 torch threads each: with OpenMP's default
        # spin-waiting, two such on 2 cores each ran 17x slower than one alone; passive
        # waiting, 1.9x (benchmarks/omp_wait.py). Alone it costs 1.36x, so only stages
        # that can overlap get it. It changes how threads wait, not what they compute;
        # a policy the user set wins.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env = _with_python_first(env)
    if whole:
        assert ray is not None
        _run_on_ray(ray, root, name, lines, wdir, env, outs, log)
        return start, time.time()
    for line_cmd in lines:
        if STOP.signum is not None:
            raise StageStopped(name, STOP.signum)
        log(f"> {line_cmd}")
        tail: deque[str] = deque(maxlen=40)
        # A process group of its own while the flow handles signals, so a stop
        # (preempt.py) reaches every process the stage starts (its shell, generation
        # and bootstrap workers) and nothing else.
        proc = subprocess.Popen(
            shell_argv(line_cmd),
            cwd=Path(root) / wdir,
            env=env,
            close_fds=True,
            start_new_session=STOP.own_groups,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        group = ProcessGroup(proc)
        STOP.register(group)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            returncode = proc.wait()
        finally:
            STOP.unregister(group)
        if returncode != 0 and STOP.signum is not None:
            raise StageStopped(name, STOP.signum)
        if returncode != 0:
            raise StageCommandFailed(name, line_cmd, returncode, list(tail))
    return start, time.time()


def _run_on_ray(
    ray: RayStages,
    root: Path,
    name: str,
    lines: list[str],
    wdir: str,
    env: dict[str, str],
    outs: Sequence[str],
    log: Callable[[str], None],
) -> None:
    """The stage's command lines as one Ray task (a retried task starts the stage over)."""
    if STOP.signum is not None:
        raise StageStopped(name, STOP.signum)
    for line_cmd in lines:
        log(f"> {line_cmd} (on Ray)")
    argvs = [shell_argv(line_cmd) for line_cmd in lines]
    returncode, tail = ray_exec.run(ray, name, argvs, Path(root) / wdir, env, [Path(root) / o for o in outs], log)
    if returncode != 0 and STOP.signum is not None:
        raise StageStopped(name, STOP.signum)
    if returncode != 0:
        raise StageCommandFailed(name, " && ".join(lines), returncode, tail[-40:])


def _with_python_first(env: dict[str, str]) -> dict[str, str]:
    """`python` in a stage command is this interpreter's, even when its virtualenv is
    not activated (outputs do not depend on it: the command string is unchanged)."""
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] == bindir:
        return env
    return {**env, "PATH": bindir + os.pathsep + env.get("PATH", "")}


def _out_arg(name: str, line: str) -> Path:
    """The `--out` of a generation stage's command: where its shards go."""
    argv = shlex.split(line)
    if "--out" not in argv[:-1]:
        raise StageError(f"stage {name!r}: --ray-parts needs its command's --out, and it has none: {line}")
    return Path(argv[argv.index("--out") + 1])


def _run_parts(
    ray: RayStages,
    root: Path,
    name: str,
    lines: list[str],
    wdir: str,
    env: dict[str, str],
    log: Callable[[str], None],
) -> None:
    """A generation stage's shards in `ray.parts` Ray tasks at once, each its command
    with `--part K/N` (genstage.generate_part), then moved into the stage's work folder
    (downloaded first from `ray.parts_url`), where the stage finds them done and only
    gathers (distillflow/engines/parts.py). A part whose worker dies is retried by Ray
    and resumes from its finished shards; a part that fails fails the stage."""
    if len(lines) != 1:
        raise StageError(f"stage {name!r}: --ray-parts splits a one-line command; it has {len(lines)}")
    if STOP.signum is not None:
        raise StageStopped(name, STOP.signum)
    n, url = ray.parts, ray.parts_url
    extra = "" if url is None else f" --parts-url {shlex.quote(url)}"
    part_lines = [f"{lines[0]} --part {k}/{n}{extra}" for k in range(n)]
    for line in part_lines:
        log(f"> {line} (on Ray)")
    tasks = [(f"{name} part {k}/{n}", [shell_argv(line)], []) for k, line in enumerate(part_lines)]
    results = ray_exec.run_tasks(ray, tasks, Path(root) / wdir, env, log)
    if STOP.signum is not None:
        raise StageStopped(name, STOP.signum)
    failed = [(line, rc, tail) for line, (rc, tail) in zip(part_lines, results, strict=True) if rc != 0]
    if failed:  # the part that failed, not one it ended (cancelled: -SIGTERM)
        line, returncode, tail = min(failed, key=lambda f: f[1] == -signal.SIGTERM)
        raise StageCommandFailed(name, line, returncode, tail[-40:])
    out = _out_arg(name, lines[0])
    work = parts.work_dir(Path(root) / wdir / out)
    if url is not None:
        for k in range(n):
            parts.download(parts.part_url(url, out, k, n), parts.part_dir(work, k, n))
    log(f"{name}: {parts.merge(work, n)} shards from {n} parts on Ray, in {work}; the stage gathers them")


def outs_digests(root: Path, name: str) -> dict[str, str]:
    """The stage's outs as dvc.lock records them: path -> md5 (a `.dir` md5 for folders)."""
    with project(root) as p:
        return p.outs_digests(name)


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

    changes = []
    for rel, file_overrides in split_overrides(overrides).items():
        path = Path(root) / rel
        if not path.is_file():
            raise StageError(f"-S {' '.join(file_overrides)}: params file {rel} does not exist in {root}")
        before = _flatten(yaml.safe_load(path.read_text()) or {})
        try:
            apply_file_overrides(path, file_overrides)
        except OverrideError as exc:
            raise StageError(f"-S {' '.join(file_overrides)}: cannot apply to {rel}: {exc}") from exc
        after = _flatten(yaml.safe_load(path.read_text()) or {})
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                changes.append(f"{rel}: {key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return changes
