"""Stage commands on a Ray cluster: `distillflow run --ray ADDRESS`.

The flow stays where it was started and does what it always does: fingerprints, cache
hits, DVC's lock, `dvc.lock`, the DVC cache. Only the command of a stage matching
`--ray-stage PATTERN` (fnmatch on its DVC name; by default the comparison's cells and
bootstrap replicates) runs elsewhere: as a Ray task that starts the command on a
worker, in the same checkout path, with the flow's environment plus the devices Ray
gave the task (`CUDA_VISIBLE_DEVICES`). The cluster's nodes must see the repo at the
same path (one machine, or a shared filesystem) in the same virtualenv; a node that
does not is an error naming it. Outputs are what the stage writes, so they equal a
one-machine run's byte for byte (tests/test_ray.py).

- A task asks for `--ray-cpus` CPUs (default 2: a stage's torch threads) and
  `--ray-gpus` GPUs (default 0); Ray places it on a node with both free.
- A worker that dies mid-stage (its node preempted, the process killed) is retried by
  Ray up to `MAX_RETRIES` times; each attempt first removes what an earlier one left
  (the stage's outs and their `.<out>.*.tmp` siblings). A stage that fails on its own
  is not retried by Ray: the flow's retries apply as to a local stage.
- The stage process dies with its Ray worker (PR_SET_PDEATHSIG), and a stop of the run
  (preempt.py) cancels the task: its stage gets SIGTERM, then the task is
  force-cancelled after the grace period.
- The stage's output comes back when it ends (its last `TAIL` lines), not line by line.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from distillflow.orchestration.dvc_adapter import StageError
from distillflow.orchestration.preempt import GRACE_S, STOP, after_grace

# Which stages go to Ray unless `--ray-stage` says otherwise: the comparison's cells
# and its bootstrap replicates (comparison/dvc.yaml), the runs that are many and alike.
DEFAULT_STAGES = ("compare@*", "boot@*", "boot_*")
MAX_RETRIES = 3  # attempts after a worker died mid-stage
TAIL = 400  # output lines a task returns
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class RayStages:
    """Where and how stages run on Ray (the flow's `ray_*` parameters)."""

    address: str
    patterns: tuple[str, ...] = DEFAULT_STAGES
    num_cpus: float = 2.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if not self.address:
            raise StageError("--ray: give the cluster's address (host:port, or auto)")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise StageError(f"--ray-cpus and --ray-gpus must be >= 0; got {self.num_cpus}, {self.num_gpus}")

    def matches(self, stage: str) -> bool:
        return any(fnmatch(stage, p) for p in self.patterns)


@contextmanager
def connected(cfg: RayStages | None) -> Iterator[None]:
    """This process connected to the cluster for the block (nothing without `cfg`)."""
    if cfg is None:
        yield
        return
    import ray

    ray.init(address=cfg.address, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _die_with_parent() -> None:
    """In the stage process before exec: SIGTERM when the Ray worker that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _clear(outs: Sequence[str]) -> None:
    """What an earlier attempt of the stage left: its outs and their temporary siblings."""
    for out in map(Path, outs):
        for left in [out, *out.parent.glob(f".{out.name}.*.tmp"), out.with_name(f".{out.name}.old")]:
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left)
            elif left.exists() or left.is_symlink():
                left.unlink()


def run_line(argv: list[str] | str, cwd: str, env: dict[str, str], outs: list[str]) -> dict[str, Any]:
    """The body of the Ray task (on a worker): one stage command line; its return code,
    last output lines and where it ran."""
    node = socket.gethostname()
    if not Path(cwd).is_dir():
        raise StageError(
            f"Ray node {node} does not see the repo at {cwd}: the cluster's nodes need the checkout at the "
            "same path (a shared filesystem)"
        )
    _clear(outs)
    env = dict(env)
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # the GPUs Ray gave this task
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        close_fds=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=TAIL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    except KeyboardInterrupt:  # ray.cancel: end the stage's process group, then let Ray finish the task
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return {"returncode": returncode, "tail": list(tail), "node": node, "worker_pid": os.getpid()}


class RayTask:
    """A stage command running as a Ray task, as preempt.STOP ends it."""

    def __init__(self, ref: Any):
        self.ref = ref

    def _wait(self, timeout: float) -> None:
        import ray

        ray.wait([self.ref], timeout=timeout)

    def terminate(self) -> None:
        import ray

        ray.cancel(self.ref)  # KeyboardInterrupt in the task: it ends its stage process group
        after_grace(self._wait, self.kill, "stop-ray-task")

    def kill(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)  # the worker process dies; the stage with it (PR_SET_PDEATHSIG)


_remote: Any = None


def run(
    cfg: RayStages,
    stage: str,
    argv: list[str] | str,
    cwd: Path,
    env: dict[str, str],
    outs: list[Path],
    log: Callable[[str], None],
) -> tuple[int, list[str]]:
    """Run one command line of `stage` as a Ray task and wait for it: (return code, last
    output lines), the lines also sent to `log`. A task cancelled by a stop returns
    -SIGTERM (the caller sees the stop)."""
    import ray

    global _remote
    if _remote is None:
        _remote = ray.remote(run_line)
    task = _remote.options(
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        max_retries=MAX_RETRIES,
        retry_exceptions=False,
        name=f"distillflow {stage}",
    )
    ref = task.remote(argv, str(cwd), env, [str(o) for o in outs])
    handle = RayTask(ref)
    STOP.register(handle)
    try:
        result = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return -signal.SIGTERM, ["(the Ray task was cancelled)"]
    except ray.exceptions.RayError as exc:
        if STOP.requested:  # force-cancelled after the grace period
            return -signal.SIGTERM, [f"(the Ray task ended: {type(exc).__name__})"]
        raise StageError(f"stage {stage!r}: its Ray task failed: {exc}") from exc
    finally:
        STOP.unregister(handle)
    log(f"(ran on Ray node {result['node']}, worker pid {result['worker_pid']})")
    for line in result["tail"]:
        log(line)
    return result["returncode"], result["tail"]
