"""The guard each stage line runs under on Ray (distillflow/orchestration/stage_guard.py),
with real processes: the stage's Python process is a grandchild behind a shell that
does not exec it (`...; true`), as under dash, the shell CI's `/bin/sh` is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillflow.orchestration import preempt, ray_exec, stage_guard

PY = sys.executable
# A stage line whose Python process is the shell's child: it writes its pid, then sleeps.
SLEEPER = "{py} -c \"import os, time; open('{pid}', 'w').write(str(os.getpid())); time.sleep(300)\"; true"


def wait_pid(path: Path, owner: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while not path.is_file() or not path.read_text():
        assert owner.poll() is None and time.monotonic() < deadline, "the stage never started"
        time.sleep(0.05)
    return int(path.read_text())


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped by whoever adopted it
            return True
        time.sleep(0.05)
    return False


def guard(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-I", str(ray_exec.GUARD), *argv], start_new_session=True)


def test_the_guard_passes_its_return_code_and_signal_on() -> None:
    assert guard("/bin/sh", "-c", "exit 3").wait(timeout=30) == 3
    assert guard("/bin/sh", "-c", "kill -9 $$").wait(timeout=30) == -signal.SIGKILL


def test_sigterm_to_the_guard_ends_the_grandchild_the_shell_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "stage.pid"
    proc = guard("/bin/sh", "-c", SLEEPER.format(py=PY, pid=pid_file))
    stage = wait_pid(pid_file, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=stage_guard.GRACE_S + 5)
    assert gone_within(stage, 2), "the stage outlived its guard"


def test_a_killed_worker_takes_its_stage_along(tmp_path: Path) -> None:
    """`run_lines`, the Ray task's body, in a process of its own standing in for the Ray
    worker; SIGKILL to it ends the stage behind the shell within the grace period."""
    pid_file = tmp_path / "stage.pid"
    line = ["/bin/sh", "-c", SLEEPER.format(py=PY, pid=pid_file)]
    body = "import sys; from distillflow.orchestration.ray_exec import run_lines; "
    body += f"run_lines([{line!r}], {str(tmp_path)!r}, {{'PATH': '/usr/bin:/bin'}}, [], 0)"
    worker = subprocess.Popen([PY, "-c", body], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    stage = wait_pid(pid_file, worker)
    assert not gone_within(stage, 0.5)
    worker.kill()
    worker.wait(timeout=30)
    assert gone_within(stage, stage_guard.GRACE_S + 5), "the stage outlived its Ray worker"


@pytest.mark.parametrize("name", ["GRACE_S"])
def test_the_guard_keeps_the_flows_grace_period(name: str) -> None:
    assert getattr(stage_guard, name) == getattr(preempt, name)
