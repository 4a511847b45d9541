"""Stages and generation parts on a real local Ray cluster (`distillflow run --ray`):
`ray start --head` on 127.0.0.1, started and stopped by the module, the tiny DVC project
and a repo running the real teacher stage; a Ray worker is killed mid-stage and
mid-part, and the outputs equal a local run's byte for byte.

Slow tier, run in CI; its own module so that it runs beside tests/test_flows.py on the
other xdist worker (`--dist loadfile`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .flowkit import (
    PY,
    Server,
    alive,
    assert_dvc_agrees,
    free_port,
    init_repo,
    lock_outs,
    make_tiny,
    outcomes,
    run_flow,
    sh,
    slow_pids,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(server: Server) -> str:
    """A real local Ray cluster: `ray start --head` on 127.0.0.1 with 2 CPUs (two worker
    processes for 1-CPU tasks), stopped after the module."""
    ray = str(Path(PY).parent / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**server.env, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--dashboard-agent-listen-port", str(free_port())]  # not its fixed default
    start += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    try:
        sh(ROOT, env, *start, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        sh(ROOT, env, ray, "stop", "--force", timeout=120)  # every Ray process of this user: CI runs no other
        shutil.rmtree(temp)


def ray_worker_of(pid: int) -> int:
    """The Ray worker process above `pid` (its title starts with `ray::`)."""
    while pid > 1:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError("no Ray worker above the stage process")


def test_stages_on_a_ray_cluster_write_the_local_runs_bytes_and_a_killed_worker_is_retried(
    tmp_path: Path, server: Server, ray_cluster: str
) -> None:
    """The same tiny pipeline in two fresh repos: run here, and with its rounds and report
    on a local Ray cluster, where the Ray worker running round@2 is killed mid-stage.
    Ray retries the task on another worker; every output's md5 in dvc.lock equals the
    local run's, and DVC agrees with the Ray run."""
    local, remote = make_tiny(tmp_path / "local", server), make_tiny(tmp_path / "remote", server)
    env = {**server.env, "PYTHONPATH": str(ROOT)}
    summary, _ = run_flow(local, env)
    assert set(outcomes(summary).values()) == {"ran"}

    pids = tmp_path / "slow.pids"
    cmd = [PY, "-m", "distillflow.cli", "run", "--summary", str(tmp_path / "summary.json"), "--ray", ray_cluster]
    cmd += ["--ray-stage", "round@*", "--ray-stage", "report", "--ray-cpus", "1"]
    log_path = tmp_path / "ray-run.log"
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=remote,
            # /bin/sh runs the stage lines, as where SHELL is unset: dash does not exec a
            # line's command, so the stage is its worker's grandchild (stage_guard.py)
            env={**env, "SLOW_ROUND": "2", "SLOW_PIDS": str(pids), "SHELL": "/bin/sh"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        (stage,) = slow_pids(pids, proc, log_path)
        worker = ray_worker_of(stage)
        os.kill(worker, signal.SIGKILL)
        rc = proc.wait(timeout=300)
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(outcomes(summary).values()) == {"ran"}, out[-4000:]
    ran_on = re.findall(r"ran on Ray node \S+, worker pid (\d+)", out)
    assert len(ran_on) == 3 and str(worker) not in ran_on, out[-4000:]  # round@1, round@2 (retried), report
    deadline = time.monotonic() + 10
    while alive(stage) and time.monotonic() < deadline:  # it gets SIGTERM as its worker dies
        time.sleep(0.1)
    assert not alive(stage), "the stage process outlived its Ray worker"

    assert lock_outs(remote) == lock_outs(local) and len(lock_outs(local)) == 5
    assert_dvc_agrees(remote, env)


GEN_DVC_YAML = """\
stages:
  teacher:
    cmd: python -m stages.teacher --params params.yaml --prompts seed --models tiny --out data/teacher --metrics m.json
    deps: [seed, tiny]
    params: [teacher]
    outs: [data/teacher]
    metrics: [{m.json: {cache: false}}]
"""


def make_gen_repo(repo: Path, server: Server, tiny_models: Path) -> Path:
    """A repo whose one stage is the real teacher stage on tiny models: 96 prompts in
    shards of 2 (48 shards)."""
    from distillflow.base import io, records
    from stages import seed

    from .builders import TASK, seed_params

    repo.mkdir(parents=True)
    sp = seed_params(num_train=96, num_eval=1)
    train = seed.run(TASK, sp, seed.source_rows(TASK, sp))[0]
    io.write_table(repo / "seed" / "train.parquet", train, records.PROMPT_SCHEMA)
    shutil.copytree(tiny_models, repo / "tiny")
    for code in ("stages", "distillflow"):  # the stage module, its PARTS and its imports (codedeps.py)
        (repo / code).symlink_to(ROOT / code)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["teacher"].update(batch_size=2, shard_size=2, num_samples=2, max_new_tokens=24)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.yaml").write_text(GEN_DVC_YAML)
    return init_repo(repo, server.env, "gen")


def part_process(repo: Path, part: str) -> int | None:
    """The pid of the teacher stage running `--part PART` in `repo`, if one runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"stages.teacher" in argv and b"--part" in argv[:-1] and cwd == str(repo):
            if argv[argv.index(b"--part") + 1] == part.encode():
                return int(proc.name)
    return None


def test_generation_parts_on_ray_write_the_local_runs_bytes_and_a_killed_part_resumes(
    tmp_path: Path, server: Server, ray_cluster: str, tiny_models: Path
) -> None:
    """The real teacher stage (48 shards) run here, and in 2 parts on a local Ray
    cluster with an fsspec URL (file://) between the parts and the flow, the worker
    running part 0 killed once that part has finished a shard. Ray retries part 0, which
    resumes from its finished shards; the flow downloads and merges the parts, the stage
    only gathers, and the output's md5 in dvc.lock equals the local run's."""
    env = {**server.env, "PYTHONPATH": str(ROOT), "SHELL": "/bin/sh"}
    local = make_gen_repo(tmp_path / "local", server, tiny_models)
    remote = make_gen_repo(tmp_path / "remote", server, tiny_models)
    summary, _ = run_flow(local, env)
    assert outcomes(summary) == {"teacher": "ran"}

    bucket = tmp_path / "bucket"
    cmd = [PY, "-m", "distillflow.cli", "run", "--summary", str(tmp_path / "summary.json"), "--ray", ray_cluster]
    cmd += ["--ray-cpus", "1", "--ray-parts", "2", "--ray-parts-url", f"file://{bucket}"]
    log_path = tmp_path / "parts-run.log"
    part_work = remote / "data" / "teacher.shards" / "part-0-of-2"
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, cwd=remote, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(part_work.glob("*.done")):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.005)
        pid = part_process(remote, "0/2")
        assert pid is not None, "part 0 finished before it could be killed"
        os.kill(ray_worker_of(pid), signal.SIGKILL)
        rc = proc.wait(timeout=300)
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    assert json.loads((tmp_path / "summary.json").read_text())["stages"]["teacher"]["outcome"] == "ran"
    resumed = re.findall(r"part-0-of-2: (\d+) of 24 shards already done \(skipped\)", out)
    assert resumed and 1 <= int(resumed[-1]) < 24, out[-6000:]  # the retried part 0 kept its finished shards
    assert "teacher: 48 shards from 2 parts on Ray" in out, out[-6000:]
    assert "48 of 48 shards already done (skipped), 0 to generate" in out, out[-6000:]  # the stage only gathered
    assert len(list(bucket.rglob("*.done"))) == 48

    assert lock_outs(remote) == lock_outs(local) and set(lock_outs(local)) == {"data/teacher", "m.json"}
    assert not (remote / "data" / "teacher.shards").exists()
    assert_dvc_agrees(remote, env)
