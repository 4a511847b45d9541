"""Preemption, as clusters do it: SIGTERM (or SIGINT, SIGHUP) to a flow run stops it cleanly.

A scheduler that reclaims a node (Slurm, Kubernetes, a Prefect worker cancelling a flow
run) sends SIGTERM and, a grace period later, SIGKILL. On the first SIGTERM, SIGINT or
SIGHUP (a closed terminal) the flow:

- stops its running stage commands: a local one runs in a process group of its own,
  which gets SIGTERM, then SIGKILL after `GRACE_S`; one on Ray (ray_exec.py) is
  cancelled, then force-cancelled after `GRACE_S`;
- launches nothing more (a stage about to start is refused, and a stopped stage is not
  retried);
- lets each stopped stage's task remove its partial outputs, as a failed attempt does
  (pipeline.run_stage), so the next run resumes from the stages that finished;
- then ends, raising pipeline.PipelineFailed with the signal and the summary of what
  finished, what was stopped and what never started (`distillflow run` exits with
  128 + the signal's number; Prefect records the flow run as failed, "stopped by
  SIGTERM", or as cancelled where a Prefect runner sent the signal to cancel it).

A second signal while stopping kills the stage commands at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

# How long a stage's processes get between SIGTERM and SIGKILL. Stages write their
# outputs atomically, so they need no time to clean up; the flow's 10-second promise
# (docs/orchestration.md) is this plus the time to remove partial outputs.
GRACE_S = 5.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Handle(Protocol):
    """A running stage command the stop can end: a local process group or a Ray task."""

    def terminate(self) -> None: ...  # ask it to end, then kill it GRACE_S later; must not block

    def kill(self) -> None: ...


class Stop:
    """The run's stop request and the running stage commands it ends (one per process: the flow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Handle] = set()
        self.signum: int | None = None
        # Whether stage processes get process groups of their own: only while the
        # flow's handlers are installed, which then end them (else a terminal's Ctrl-C
        # and hangup reach them as before)
        self.own_groups = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def register(self, handle: Handle) -> None:
        """A stage command just started. If a stop came first, it is ended at once."""
        with self._lock:
            self._running.add(handle)
            stopping = self.signum is not None
        if stopping:
            handle.terminate()

    def unregister(self, handle: Handle) -> None:
        with self._lock:
            self._running.discard(handle)

    def request(self, signum: int) -> bool:
        """End every running command; True on the first request, False on a repeat
        (which kills them at once)."""
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
            running = list(self._running)
        for handle in running:
            if first:
                handle.terminate()
            else:
                handle.kill()
        return first

    def reset(self) -> None:
        with self._lock:
            self.signum = None


STOP = Stop()


def after_grace(wait: Callable[[float], object], kill: Callable[[], None], name: str) -> None:
    """`wait(GRACE_S)` (returns once the command ended, or after that long), then `kill()`
    (a no-op for what already ended), in a thread of its own: a signal handler must not
    block."""

    def escalate() -> None:
        wait(GRACE_S)
        kill()

    threading.Thread(target=escalate, name=name, daemon=True).start()


class ProcessGroup:
    """A stage process started with start_new_session=True, and every process it started."""

    def __init__(self, proc: subprocess.Popen[Any]):
        self.proc = proc

    def _signal(self, sig: int) -> None:
        try:
            if STOP.own_groups:
                os.killpg(self.proc.pid, sig)  # the stage and what it started (workers, shells)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass  # the group is gone: every process in it has exited

    def _wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # still running: killed next

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)
        # SIGKILL to the group even if its leader exited: what it started may still run
        after_grace(self._wait, self.kill, f"stop-{self.proc.pid}")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


def leftovers(target: Path) -> list[Path]:
    """What a stopped or failed attempt may leave beside an out: the temporary siblings
    a stage writes before its atomic rename (`.<name>.*.tmp`, `.<name>.old`:
    distillflow/base/io.py). They may not exist."""
    return [*target.parent.glob(f".{target.name}.*.tmp"), target.with_name(f".{target.name}.old")]


@contextmanager
def handling_signals(log: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP stop the run (STOP.request) while the block runs; the
    handlers that were there before (Prefect's SIGTERM bridge, Python's SIGINT) come
    back on exit. The handler only writes the signal's number to a pipe (a signal may
    land while the main thread holds a lock the stop needs: the logger's, Stop's); a
    thread of this block reads it and does the stop. Signal handlers belong to the main
    thread: elsewhere (a flow called from a thread) this installs nothing, says so, and
    stage processes stay in the flow's process group, so a terminal's signals still
    reach them."""
    if threading.current_thread() is not threading.main_thread():
        log("not on the main thread: SIGTERM and SIGINT keep their handlers (no clean preemption)")
        yield
        return
    read_fd, write_fd = os.pipe()

    def handler(signum: int, frame: FrameType | None) -> None:
        os.write(write_fd, bytes([signum]))  # async-signal-safe; the watcher does the rest

    def watch() -> None:
        while True:
            signum = os.read(read_fd, 1)[0]
            if signum == 0:  # the block ended
                return
            name = signal.Signals(signum).name
            if STOP.request(signum):
                log(f"{name}: stopping the running stages and launching no more")
            else:
                log(f"{name} again: killing the running stages")

    STOP.reset()
    watcher = threading.Thread(target=watch, name="distillflow-stop", daemon=True)
    watcher.start()
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    STOP.own_groups = True
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        STOP.own_groups = False
        os.write(write_fd, b"\0")
        watcher.join()
        os.close(read_fd)
        os.close(write_fd)
        STOP.reset()
