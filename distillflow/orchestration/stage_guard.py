"""The first process of a stage run on Ray: `python -I stage_guard.py ARGV...`.

A Ray task starts the stage's command line through this guard, in a session (and so a
process group) of its own, with Linux's parent-death signal set: when the Ray worker
dies, the guard gets SIGTERM. The kernel sends that signal to the worker's direct
child only, and a stage line is `$SHELL -c LINE`: dash, unlike bash, does not exec the
line's last command, so the stage's Python process would be a grandchild and outlive
its worker. The guard passes the signal on to its whole process group (the shell, the
stage, whatever they started), waits `GRACE_S`, then SIGKILLs the group.

Otherwise the guard only waits: it exits as the stage line did (its return code, or
the same signal). It imports the standard library only, and runs isolated (`-I`), so
it starts fast and does not depend on the checkout it runs in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

GRACE_S = 5.0  # as distillflow.orchestration.preempt.GRACE_S


def _end_group(child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to this process group (the guard ignores its own), SIGKILL after GRACE_S."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while child is not None and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)  # the guard too: what is left of the stage goes with it


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: stage_guard.py COMMAND [ARG...]")
    started: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        _end_group(started[0] if started else None)

    signal.signal(signal.SIGTERM, stop)  # before the child starts: no window without it
    started.append(subprocess.Popen(argv))  # in the guard's process group
    returncode = started[0].wait()
    if returncode < 0:  # ended by a signal: end the same way
        if -returncode != signal.SIGKILL:  # SIGKILL's action cannot be set (nor needs to be)
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
