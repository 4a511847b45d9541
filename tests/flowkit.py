"""The harness the flow tests share (tests/test_flows.py, tests/test_ray.py): an isolated
environment, `distillflow run` and its summary, a real `prefect server start`, a check
that DVC agrees with a run, and a tiny DVC project (foreach rounds, a report) whose
stages can be made slow, flaky or failing through environment variables."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

PY = sys.executable


def base_env(home: Path, api_url: str | None) -> dict[str, str]:
    """This process's environment without any Prefect setting of the user's, plus an
    isolated PREFECT_HOME and, when given, the server's API URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        DVC_NO_ANALYTICS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    env["PATH"] = str(Path(PY).parent) + os.pathsep + env.get("PATH", "")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def sh(cwd: Path, env: dict[str, str], *cmd: str, timeout: float = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def run_flow(repo: Path, env: dict[str, str], *args: str, expect_rc: int = 0) -> tuple[dict[str, Any], str]:
    """`distillflow run ARGS` in the repo; returns its JSON summary and its output."""
    summary = repo.parent / f"summary-{time.monotonic_ns()}.json"
    cmd = [PY, "-m", "distillflow.cli", "run", "--retry-delay", "1", "--summary", str(summary), *args]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    if done.returncode != expect_rc or not summary.is_file():
        raise AssertionError(
            f"{' '.join(cmd[2:])} exited {done.returncode} (expected {expect_rc}), "
            f"summary written: {summary.is_file()}:\n{out[-6000:]}"
        )
    return json.loads(summary.read_text()), out


def outcomes(summary: dict[str, Any]) -> dict[str, str]:
    return {name: entry["outcome"] for name, entry in summary["stages"].items()}


def assert_dvc_agrees(repo: Path, env: dict[str, str], pipeline: str = "dvc.yaml") -> None:
    """After a Prefect run, DVC sees `pipeline` up to date: `dvc status` reports nothing
    but `always changed` stages (identify: it hashes the model folders on every repro)
    and `dvc repro` runs only those, leaving their outputs byte-identical. (Checked per
    pipeline file: a training param change leaves comparison/dvc.yaml stale, as it must.)"""
    status = json.loads(sh(repo, env, PY, "-m", "dvc", "status", "--json", pipeline).strip().splitlines()[-1])
    assert all(v == ["always changed"] for v in status.values()), status
    outs = {p: p.read_bytes() for p in (repo / "data").glob("identity.json")}
    repro = sh(repo, env, PY, "-m", "dvc", "repro", pipeline)
    ran = set(re.findall(r"Running stage '([\w@.:/-]+)'", repro))
    assert ran == set(status) | ({"identify"} & ran), repro  # identify is upstream of both pipelines
    assert {p: p.read_bytes() for p in outs} == outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this test started in its own session (its process group)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Server:
    url: str
    env: dict[str, str]


@contextlib.contextmanager
def service(cmd: list[str], env: dict[str, str], log: Path, health: str, limit_s: float) -> Iterator[None]:
    """A server process (its own session, output in `log`) until the block ends: up once
    `health` answers 200, an AssertionError with its log if it exits or is not up within
    `limit_s`."""
    name = " ".join(cmd[2:5])
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + limit_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(health, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not up after {limit_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield
    finally:
        stop(proc)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[Server]:
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = base_env(home, None)
    cmd = [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with service(cmd, env, home / "server.log", f"{url}/health", 180):
        yield Server(url, base_env(home, url))


def slow_pids(pids: Path, proc: subprocess.Popen, log: Path) -> list[int]:
    """The pids round.py's slow attempt wrote (the stage's, then its child's), once it
    has; fails with the run's log if the run ended first or 300 s passed."""
    deadline = time.monotonic() + 300
    while not pids.is_file() or not pids.read_text().endswith("\n"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    return [int(p) for p in pids.read_text().split()]


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, its stat was read (ESRCH)
        return False
    return state != "Z"


def lock_outs(repo: Path) -> dict[str, str]:
    """Every output's md5 in the repo's dvc.lock, by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}


# --- a tiny DVC project: foreach stages, a flaky stage, a failing stage ----------------

TINY_DVC_YAML = """\
stages:
  prep:
    cmd: python prep.py
    deps: [prep.py]
    params: [prep]
    outs: [out/prep.txt]
  round:
    foreach: [1, 2]
    do:
      cmd: python round.py ${item}
      deps: [round.py, out/prep.txt]
      params: [rounds]
      outs:
        - out/round${item}.txt
  report:
    cmd: python report.py
    deps: [report.py, out/round1.txt, out/round2.txt]
    outs: [out/report.txt]
    metrics:
      - metrics/report.json:
          cache: false
"""

TINY_SCRIPTS = {
    "prep.py": """\
import os, yaml
print("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY"))
n = yaml.safe_load(open("params.yaml"))["prep"]["n"]
open("out/prep.txt", "w").write("".join(f"{i}\\n" for i in range(n)))
""",
    # Writes its output in place, not atomically: a failure leaves a partial file.
    "round.py": """\
import os, sys, yaml
i = int(sys.argv[1])
print("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY"))
p = yaml.safe_load(open("params.yaml"))["rounds"]
rows = [int(x) * p["scale"] * i for x in open("out/prep.txt")]
with open(f"out/round{i}.txt", "w") as f:
    f.write(f"{rows[0]}\\n")
    f.flush()
    marker = os.environ.get("FLAKY_MARKER")
    slow = os.environ.get("SLOW_PIDS")  # the preemption and Ray tests: the first attempt waits
    if os.environ.get("SLOW_ROUND") == str(i) and not os.path.exists(slow):
        import subprocess, time
        cmd = [sys.executable, "-c", "import time; time.sleep(300)"]
        kids = [subprocess.Popen(cmd).pid] if os.environ.get("SLOW_CHILD") else []
        open(slow, "w").write(" ".join(map(str, [os.getpid(), *kids])) + "\\n")
        time.sleep(300)
    if i == p["fail_round"] or (marker and i == 2 and not os.path.exists(marker)):
        if marker:
            open(marker, "w").close()
        sys.exit(f"round {i} failed on purpose")
    f.write("".join(f"{r}\\n" for r in rows[1:]))
""",
    "report.py": """\
import json
rows = [int(x) for i in (1, 2) for x in open(f"out/round{i}.txt")]
odd = sum(r % 2 for r in rows)
open("out/report.txt", "w").write(f"{sum(rows)}\\n")
metrics = {"rows": len(rows), "kept": len(rows) - odd, "quarantined": odd, "dropped_by_reason": {"odd": odd}}
json.dump(metrics, open("metrics/report.json", "w"))
""",
}


def make_tiny(repo: Path, server: Server) -> Path:
    (repo / "out").mkdir(parents=True)
    (repo / "metrics").mkdir()
    (repo / "dvc.yaml").write_text(TINY_DVC_YAML)
    (repo / "params.yaml").write_text("prep:\n  n: 5\nrounds:\n  scale: 3\n  fail_round: 0\n")
    for name, text in TINY_SCRIPTS.items():
        (repo / name).write_text(text)
    return init_repo(repo, server.env, "tiny")


def init_repo(repo: Path, env: dict[str, str], message: str) -> Path:
    """git and DVC initialised in `repo`, its files committed."""
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, PY, "-m", "dvc", "init", "-q")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", message)
    return repo
