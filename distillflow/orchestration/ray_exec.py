"""Stage commands on a Ray cluster: `distillflow run --ray ADDRESS`.

The flow stays where it was started and does what it always does: fingerprints, cache
hits, DVC's lock, `dvc.lock`, the DVC cache. Only the command of a stage matching
`--ray-stage PATTERN` (fnmatch on its DVC name; by default the comparison's cells and
bootstrap replicates) runs elsewhere: as a Ray task that starts the command on a
worker, in the same checkout path, with the flow's environment plus the devices Ray
gave the task (`CUDA_VISIBLE_DEVICES`). The cluster's nodes must see the repo at the
same path (one machine, or a shared filesystem) in the same virtualenv; a node that
does not is an error naming it. Outputs are what the stage writes, so they equal a
one-machine run's byte for byte (tests/test_ray.py, on a local cluster).

- A task asks for `--ray-cpus` CPUs (default 2: a stage's torch threads) and
  `--ray-gpus` GPUs (default 0); Ray places it on a node with both free.
- A worker that dies mid-stage (its node preempted, the process killed) is retried by
  Ray up to `MAX_RETRIES` times; each attempt first removes what an earlier one left
  (the stage's outs and their `.<out>.*.tmp` siblings). A stage that fails on its own
  is not retried by Ray: the flow's retries apply as to a local stage.
- A stage dies with its Ray worker: each line runs under `stage_guard.py`, which gets
  SIGTERM when the worker dies (PR_SET_PDEATHSIG) and ends the line's whole process
  group (the shell, the stage, what they started), SIGKILL after the grace period.
  A stop of the run (preempt.py) cancels the
  task: the task ends its stage's process group (SIGTERM, SIGKILL after the grace
  period), and the flow force-cancels the task after twice that.
- A task asking for no GPU gets `CUDA_VISIBLE_DEVICES=""`: no GPU, not the flow's.
- The stage's output comes back when it ends (its last `TAIL` lines), not line by line.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from distillflow.orchestration.dvc_adapter import StageError
from distillflow.orchestration.preempt import GRACE_S, STOP, after_grace, leftovers

# Which stages go to Ray unless `--ray-stage` says otherwise: the comparison's cells
# and its bootstrap replicates (comparison/dvc.yaml), the runs that are many and alike.
DEFAULT_STAGES = ("compare@*", "boot@*", "boot_*")
MAX_RETRIES = 3  # attempts after a worker died mid-stage
TAIL = 400  # output lines a task returns
PR_SET_PDEATHSIG = 1  # linux/prctl.h
GUARD = Path(__file__).with_name("stage_guard.py")  # the first process of each stage line


@dataclass(frozen=True)
class RayStages:
    """Where and how stages run on Ray (the flow's `ray_*` parameters)."""

    address: str
    patterns: tuple[str, ...] = DEFAULT_STAGES
    num_cpus: float = 2.0
    num_gpus: float = 0.0
    parts: int = 0  # split each generation stage into this many Ray tasks (0: not split)
    parts_url: str | None = None  # fsspec URL where parts leave their shards (None: the shared checkout)

    def __post_init__(self) -> None:
        if not self.address:
            raise StageError("--ray: give the cluster's address (host:port, or auto)")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise StageError(f"--ray-cpus and --ray-gpus must be >= 0; got {self.num_cpus}, {self.num_gpus}")
        if self.parts < 0:
            raise StageError(f"--ray-parts must be >= 0; got {self.parts}")
        if self.parts_url is not None and not self.parts:
            raise StageError("--ray-parts-url needs --ray-parts N")

    def matches(self, stage: str) -> bool:
        return any(fnmatch(stage, p) for p in self.patterns)


@contextmanager
def connected(cfg: RayStages | None) -> Iterator[None]:
    """This process connected to the cluster for the block (nothing without `cfg`).
    ray.init installs a SIGTERM handler of its own and never restores the one before:
    this does, on the main thread."""
    if cfg is None:
        yield
        return
    try:
        import ray
    except ImportError as exc:
        raise StageError('--ray needs the ray package: pip install -c constraints/cpu.lock -e ".[ray]"') from exc
    main = threading.current_thread() is threading.main_thread()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        ray.init(address=cfg.address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as exc:
        raise StageError(f"--ray {cfg.address}: no Ray cluster answered there: {exc}") from exc
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    try:
        yield
    finally:
        ray.shutdown()


def _prctl() -> Callable[..., int]:
    """libc's prctl, looked up in the parent: the child between fork and exec must not load libraries."""
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with(prctl: Callable[..., int], parent: int) -> Callable[[], None]:
    """For the stage's guard before exec: SIGTERM when the Ray worker that started it dies
    (Linux's parent-death signal reaches this process only; the guard passes it on)."""

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the worker died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _clear(outs: Sequence[str]) -> None:
    """What an earlier attempt of the stage left: its outs and their temporary siblings."""
    for out in map(Path, outs):
        for left in [out, *leftovers(out)]:
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left)
            elif left.exists() or left.is_symlink():
                left.unlink()


def _end_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the stage's process group; SIGKILL after GRACE_S."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone: every process in it has exited


def run_lines(
    argvs: list[list[str] | str], cwd: str, env: dict[str, str], outs: list[str], num_gpus: float
) -> dict[str, Any]:
    """The body of the Ray task (on a worker): a stage's command lines in turn, after
    clearing what an earlier attempt left; the first failing line's return code (0 when
    all pass), the last output lines and where it ran."""
    node = socket.gethostname()
    if not Path(cwd).is_dir():
        raise StageError(
            f"Ray node {node} does not see the repo at {cwd}: the cluster's nodes need the checkout at the "
            "same path (a shared filesystem)"
        )
    _clear(outs)
    env = dict(env)
    if num_gpus > 0:  # the GPUs Ray gave this task
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    else:  # none: not the flow machine's, nor every GPU of the node
        env["CUDA_VISIBLE_DEVICES"] = ""
    preexec = _die_with(_prctl(), os.getpid())
    tail: deque[str] = deque(maxlen=TAIL)
    returncode = 0
    for argv in argvs:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(GUARD), *([argv] if isinstance(argv, str) else argv)],
            cwd=cwd,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=preexec,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )

        def drain(pipe: Any = proc.stdout) -> None:
            for line in pipe:
                tail.append(line.rstrip("\n"))

        # The output is read by a thread, so this one waits in short steps, where
        # ray.cancel's KeyboardInterrupt reaches it at once (not at the stage's next line).
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:  # ray.cancel: end the stage's process group, then let Ray finish the task
            _end_group(proc)
            raise
        reader.join()
        returncode = proc.returncode
        if returncode != 0:
            break
    return {"returncode": returncode, "tail": list(tail), "node": node, "worker_pid": os.getpid()}


class RayTask:
    """A stage command running as a Ray task, as preempt.STOP ends it."""

    def __init__(self, ref: Any):
        self.ref = ref

    def _wait(self, timeout: float) -> None:
        import ray

        # twice the task's own grace: it ends its stage's group (SIGTERM, SIGKILL after
        # GRACE_S) before this force-cancels it
        if ray.is_initialized():
            ray.wait([self.ref], timeout=2 * timeout)

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref)  # KeyboardInterrupt in the task: it ends its stage process group
        after_grace(self._wait, self.kill, "stop-ray-task")

    def kill(self) -> None:
        import ray

        if ray.is_initialized():  # the run may have ended and disconnected meanwhile
            ray.cancel(self.ref, force=True)  # the worker dies; the stage's own process with it


_remote: Any = None


def run(
    cfg: RayStages,
    stage: str,
    argvs: list[list[str] | str],
    cwd: Path,
    env: dict[str, str],
    outs: list[Path],
    log: Callable[[str], None],
) -> tuple[int, list[str]]:
    """Run the command lines of `stage` as one Ray task and wait for it: (return code,
    last output lines), the lines also sent to `log`. A task cancelled by a stop
    returns -SIGTERM (the caller sees the stop)."""
    return run_tasks(cfg, [(stage, argvs, outs)], cwd, env, log)[0]


def run_tasks(
    cfg: RayStages,
    tasks: Sequence[tuple[str, list[list[str] | str], list[Path]]],
    cwd: Path,
    env: dict[str, str],
    log: Callable[[str], None],
) -> list[tuple[int, list[str]]]:
    """Each (name, command lines, outs) as a Ray task, all at once, and wait for all:
    (return code, last output lines) of each, in order. The first task that fails (its
    command, or Ray) ends the others (ray.cancel: each ends its process group; forced
    after twice the grace period), so none outlives the call; a Ray error then raises."""
    import ray

    global _remote
    if _remote is None:
        _remote = ray.remote(run_lines)
    refs = []
    for name, argvs, outs in tasks:
        task = _remote.options(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            max_retries=MAX_RETRIES,
            retry_exceptions=False,
            name=f"distillflow {name}",
        )
        refs.append(task.remote(argvs, str(cwd), env, [str(o) for o in outs], cfg.num_gpus))
    handles = [RayTask(ref) for ref in refs]
    for handle in handles:
        STOP.register(handle)
    names = [name for name, _, _ in tasks]
    results: dict[int, tuple[int, list[str]]] = {}
    pending = list(refs)
    try:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            k = refs.index(ref)
            try:
                results[k] = _result(names[k], ref, len(refs), log)
            finally:
                if pending and (k not in results or results[k][0] != 0):
                    _end(pending)
        return [results[k] for k in range(len(refs))]
    finally:
        for handle in handles:
            STOP.unregister(handle)


def _end(refs: list[Any]) -> None:
    """Cancel the tasks (each ends its stage's process group) and wait for them; force
    the ones still running after twice the grace period."""
    import ray

    for ref in refs:
        ray.cancel(ref)
    _, still = ray.wait(refs, num_returns=len(refs), timeout=2 * GRACE_S)
    for ref in still:
        ray.cancel(ref, force=True)


def _result(name: str, ref: Any, tasks: int, log: Callable[[str], None]) -> tuple[int, list[str]]:
    import ray

    try:
        result = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return -signal.SIGTERM, ["(the Ray task was cancelled)"]
    except ray.exceptions.RayError as exc:
        if STOP.requested:  # force-cancelled after the grace period
            return -signal.SIGTERM, [f"(the Ray task ended: {type(exc).__name__})"]
        raise StageError(f"stage {name!r}: its Ray task failed: {exc}") from exc
    who = "" if tasks == 1 else f"{name}: "
    log(f"({who}ran on Ray node {result['node']}, worker pid {result['worker_pid']})")
    for line in result["tail"]:
        log(line)
    return result["returncode"], result["tail"]
