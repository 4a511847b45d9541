"""The DVC behaviour distillflow/orchestration/dvc_adapter.py relies on, pinned on a tiny real DVC project.

flows/ uses DVC internals (the index, stage status and hashing, save/commit/dump, the
run-cache, how stage commands run, `-S` parsing) through that one module. A DVC
release that changes any of them should fail here, each assertion saying which
behaviour moved, rather than as a wrong cache hit in a flow run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from distillflow.orchestration import dvc_adapter as dvc
from distillflow.orchestration import dvc_ops

PY = sys.executable
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "PATH": str(Path(PY).parent) + os.pathsep + os.environ.get("PATH", ""),
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}

DVC_YAML = """\
stages:
  prep:
    cmd: python prep.py
    deps: [prep.py]
    params: [prep.n]
    outs: [out/prep]
  round:
    foreach: [1, 2]
    do:
      cmd: python round.py ${item}
      deps: [round.py, out/prep]
      params: [rounds.scale]
      outs:
        - out/round${item}.txt
  grid:
    matrix:
      a: [x, y]
      b: [1]
    cmd: python -c "open('out/grid-${item.a}-${item.b}.txt', 'w').write('${item.a}')"
    outs:
      - out/grid-${item.a}-${item.b}.txt
  report:
    cmd:
      - python report.py
      - python -c "print('second command')"
    deps: [report.py, out/round1.txt, out/round2.txt]
    outs: [out/report.txt]
    metrics:
      - metrics.json:
          cache: false
"""
SUB_DVC_YAML = """\
stages:
  extra:
    cmd: python -c "open('extra.txt', 'w').write(open('../out/report.txt').read())"
    deps: [../out/report.txt]
    outs: [extra.txt]
"""
SCRIPTS = {
    "prep.py": """\
import os, yaml
n = yaml.safe_load(open("params.yaml"))["prep"]["n"]
os.makedirs("out/prep", exist_ok=True)
open("out/prep/rows.txt", "w").write("".join(f"{i}\\n" for i in range(n)))
""",
    "round.py": """\
import sys, yaml
i = int(sys.argv[1])
scale = yaml.safe_load(open("params.yaml"))["rounds"]["scale"]
open(f"out/round{i}.txt", "w").write("".join(f"{int(x) * scale * i}\\n" for x in open("out/prep/rows.txt")))
""",
    "report.py": """\
import json
rows = [int(x) for i in (1, 2) for x in open(f"out/round{i}.txt")]
open("out/report.txt", "w").write(f"{sum(rows)}\\n")
json.dump({"rows": len(rows)}, open("metrics.json", "w"))
""",
}
PARAMS = "prep:\n  n: 4\nrounds:\n  scale: 3\n  unused: 1\n"
DATA = b"a data source\n"


def sh(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr}"
    return done.stdout + done.stderr


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project after one `dvc repro`: every stage run and recorded by DVC."""
    repo = tmp_path_factory.mktemp("dvc-adapter") / "repo"
    (repo / "out").mkdir(parents=True)
    (repo / "sub").mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "sub" / "dvc.yaml").write_text(SUB_DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS)
    for name, text in SCRIPTS.items():
        (repo / name).write_text(text)
    (repo / "data.txt").write_bytes(DATA)
    sh(repo, "git", "init", "-q")
    sh(repo, PY, "-m", "dvc", "init", "-q")
    sh(repo, PY, "-m", "dvc", "add", "-q", "data.txt")  # a data source
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    sh(repo, PY, "-m", "dvc", "repro")
    # A plain `dvc repro` runs ./dvc.yaml (and what it depends on), not every dvc.yaml
    # in the repo; the index holds them all. `distillflow run` relies on neither yet,
    # a second pipeline file (issue 12 item 14) would.
    assert not (repo / "sub" / "extra.txt").exists(), "a plain `dvc repro` now runs sub/dvc.yaml too"
    sh(repo, PY, "-m", "dvc", "repro", "sub/dvc.yaml:extra")
    return repo


@pytest.fixture
def repo(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy (DVC cache included) to change, as the working directory."""
    copy = tmp_path / "repo"
    shutil.copytree(built, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def test_the_installed_dvc_is_the_range_pyproject_pins() -> None:
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "dvc")
    assert metadata.version("dvc") in req.specifier, (
        f"dvc {metadata.version('dvc')} is installed, pyproject.toml pins {req}: "
        "distillflow/orchestration/dvc_adapter.py is only checked against the pinned range"
    )


def test_index_lists_every_stage_foreach_and_matrix_expanded_with_dvc_dag_names(repo: Path) -> None:
    with dvc.project(repo) as p:
        described, edges = p.describe()
    by_name = {d["name"]: d for d in described}
    assert set(by_name) == {
        "prep",
        "round@1",
        "round@2",
        "grid@x-1",
        "grid@y-1",
        "report",
        "data.txt.dvc",
        "sub/dvc.yaml:extra",
    }, f"DVC's index now lists or names stages differently: {list(by_name)}"
    assert [d["name"] for d in described if d["dvcfile"] == "dvc.yaml"] == [
        "prep",
        "round@1",
        "round@2",
        "grid@x-1",
        "grid@y-1",
        "report",
    ], "stages of one dvc.yaml no longer come in that file's order"
    assert by_name["sub/dvc.yaml:extra"]["dvcfile"] == "sub/dvc.yaml"
    assert by_name["sub/dvc.yaml:extra"]["wdir"] == "sub"
    r2 = by_name["round@2"]
    assert r2["cmd"] == "python round.py 2" and r2["wdir"] == "."
    assert r2["deps"] == ("round.py", "out/prep") and r2["params"] == {"params.yaml": ("rounds.scale",)}
    assert r2["outs"] == ("out/round2.txt",)
    report = by_name["report"]
    assert report["cmd"] == ["python report.py", "python -c \"print('second command')\""]
    assert report["outs"] == ("out/report.txt", "metrics.json") and report["metrics"] == ("metrics.json",)
    assert by_name["data.txt.dvc"]["cmd"] is None
    assert edges == {
        ("prep", "round@1"),
        ("prep", "round@2"),
        ("round@1", "report"),
        ("round@2", "report"),
        ("report", "sub/dvc.yaml:extra"),
    }, f"DVC's graph edges (out -> dep) changed: {sorted(edges)}"


def test_status_after_dvc_repro_is_clean_and_hashes_are_what_dvc_lock_records(repo: Path) -> None:
    recorded = lock(repo)
    with dvc.project(repo) as p:
        for name in ("prep", "round@1", "round@2", "grid@x-1", "report", "sub/dvc.yaml:extra"):
            assert not p.changed(name), f"{name}: DVC reports a stage changed right after `dvc repro`"
        assert p.is_source("data.txt.dvc") and not p.is_source("prep") and not p.always_changed("prep")
        deps = dict((path, (kind, value)) for path, kind, value in p.dep_hashes("round@1"))
        assert deps["round.py"] == ("md5", md5((repo / "round.py").read_bytes())), "a file dep is no longer its md5"
        assert deps["out/prep"][0] == "md5" and deps["out/prep"][1].endswith(".dir"), "a folder dep is not a .dir md5"
        entry = {d["path"]: d["md5"] for d in recorded["round@1"]["deps"]}
        assert {k: v for k, (_, v) in deps.items()} == entry, "dep hashes differ from dvc.lock's md5s"
        assert p.param_hashes("round@1") == {"params.yaml": {"rounds.scale": 3}}
        assert p.outs_digests("prep") == {"out/prep": recorded["prep"]["outs"][0]["md5"]}
        assert p.recorded_outs("data.txt.dvc") == [["data.txt", "md5", md5(DATA)]]
        assert p.command_parts("round@2") == {"cmd": "python round.py 2", "wdir": ".", "outs": ["out/round2.txt"]}


def test_a_declared_param_or_a_dep_change_is_a_change_an_undeclared_param_is_not(repo: Path) -> None:
    params = repo / "params.yaml"
    before = dvc_ops.stage_fingerprint(repo, "round@1")
    params.write_text(PARAMS.replace("unused: 1", "unused: 2"))
    with dvc.project(repo) as p:
        assert not p.changed("round@1"), "a param the stage does not declare now counts as a change"
    assert dvc_ops.stage_fingerprint(repo, "round@1") == before
    params.write_text(PARAMS.replace("scale: 3", "scale: 5"))
    with dvc.project(repo) as p:
        assert p.changed("round@1") and p.param_hashes("round@1") == {"params.yaml": {"rounds.scale": 5}}
        assert not p.changed("prep")
        status = p.status()  # what `distillflow lineage verify` reads
    assert set(status) == {"round@1", "round@2"}, status
    assert {"changed deps": {"params.yaml": {"rounds.scale": "modified"}}} in status["round@1"], status["round@1"]
    assert dvc_ops.stage_fingerprint(repo, "round@1") != before
    params.write_text(PARAMS)
    (repo / "round.py").write_text(SCRIPTS["round.py"] + "# edited\n")
    with dvc.project(repo) as p:
        assert p.changed("round@1") and p.changed("round@2")
    assert dvc_ops.stage_fingerprint(repo, "round@1") != before


def test_a_missing_dep_or_params_key_is_a_stage_error_naming_it(repo: Path) -> None:
    shutil.rmtree(repo / "out" / "prep")
    with pytest.raises(dvc.StageError, match=r"stage 'round@1': dependency out/prep does not exist"):
        dvc_ops.stage_fingerprint(repo, "round@1")
    (repo / "params.yaml").write_text("prep:\n  n: 4\n")
    with pytest.raises(dvc.StageError, match=r"stage 'prep'|stage 'round@1': cannot read its params"):
        with dvc.project(repo) as p:
            p.param_hashes("round@1")


def test_run_cache_restores_an_earlier_run_and_record_writes_what_dvc_repro_writes(repo: Path) -> None:
    first = lock(repo)
    params = repo / "params.yaml"
    params.write_text(PARAMS.replace("scale: 3", "scale: 5"))
    sh(repo, PY, "-m", "dvc", "repro", "round@1")
    assert lock(repo)["round@1"] != first["round@1"]
    params.write_text(PARAMS)
    (repo / "out" / "round1.txt").unlink()
    with dvc.project(repo) as p:
        assert p.changed("round@1") and not p.only_cache_lost("round@1")
        assert p.restore_from_cache("round@1"), "DVC's run-cache did not restore an earlier identical run"
    assert lock(repo)["round@1"] == first["round@1"], "restoring did not write the earlier dvc.lock entry back"
    assert (repo / "out" / "round1.txt").is_file()
    params.write_text(PARAMS.replace("scale: 3", "scale: 7"))  # never run with 7
    with dvc.project(repo) as p:
        assert not p.restore_from_cache("round@1"), "DVC's run-cache restored a run that never happened"
    params.write_text(PARAMS)
    # record: run the command ourselves, then record it as `dvc repro` would
    (repo / "out" / "round2.txt").unlink()
    subprocess.run(dvc.shell_argv("python round.py 2"), cwd=repo, env=ENV, check=True)
    with dvc.project(repo) as p:
        p.record("round@2")
        assert not p.changed("round@2")
    assert lock(repo)["round@2"] == first["round@2"]
    assert "round@2" not in sh(repo, PY, "-m", "dvc", "status")


def test_a_lost_dvc_cache_with_the_workspace_intact_is_only_cache_lost(repo: Path) -> None:
    shutil.rmtree(repo / ".dvc" / "cache")
    with dvc.project(repo) as p:
        assert p.changed("prep"), "`dvc status` no longer reports outputs missing from the DVC cache"
        assert p.only_cache_lost("prep")
        p.record("prep")
        assert not p.changed("prep")
    assert any((repo / ".dvc" / "cache").rglob("*")), "record did not move the outputs into the DVC cache"


def test_a_session_reads_a_stage_again_after_the_flow_changed_it(repo: Path) -> None:
    """A stage object keeps what it loaded (`cmd_changed`) after save and dump; the
    session must read it again from dvc.yaml/dvc.lock, or a run of a stage whose
    command changed would still look changed after it was recorded."""
    (repo / "dvc.yaml").write_text(DVC_YAML.replace("cmd: python prep.py", "cmd: python ./prep.py"))
    with dvc.session(repo) as s:
        with dvc.project(repo) as p:
            assert p is s, "project() inside a session opened its own repo"
            untouched = p.stage("round@1")
            assert p.changed("prep") and p.stage("prep").changed_stage(), "a changed cmd is not a change"
            subprocess.run(dvc.shell_argv("python ./prep.py"), cwd=repo, env=ENV, check=True)
            stale = p.stage("prep")
            p.record("prep")
            assert stale.changed_stage(), "DVC now resets cmd_changed on save: `touched` may no longer be needed"
            assert not p.changed("prep"), "the session did not read the recorded stage again"
            assert p.stage("round@1") is not untouched  # the index was read again
    with dvc.project(repo) as p:
        assert not p.changed("prep")


def test_a_session_holds_dvcs_repo_lock_and_one_per_root(repo: Path) -> None:
    with dvc.session(repo):
        with pytest.raises(RuntimeError, match="already open"):
            with dvc.session(repo):
                pass
        done = subprocess.run(
            [PY, "-m", "dvc", "status"], cwd=repo, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert done.returncode != 0 and "lock" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    assert "Data and pipelines are up to date" in sh(repo, PY, "-m", "dvc", "status")


def test_dvc_must_run_in_the_repo(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="must run with it as the working directory"):
        with dvc.project(repo):
            pass


def test_stage_commands_run_as_dvc_runs_them() -> None:
    assert dvc.command_lines("echo a") == ["echo a"]
    assert dvc.command_lines(["echo a", "echo b"]) == ["echo a", "echo b"]
    argv = dvc.shell_argv("echo $((1 + 2)) && exit 3")
    done = subprocess.run(argv, capture_output=True, text=True)
    assert (done.stdout, done.returncode) == ("3\n", 3), f"DVC's stage shell command changed: {argv}"
    assert "PATH" in dvc.stage_env()


def test_overrides_are_grouped_and_applied_as_dvc_exp_run_does(repo: Path) -> None:
    assert dvc.split_overrides(["rounds.scale=4", "other.yaml:a=1"]) == {
        "params.yaml": ["rounds.scale=4"],
        "other.yaml": ["a=1"],
    }
    params = repo / "params.yaml"
    dvc.apply_file_overrides(params, ["rounds.scale=4", "+rounds.extra={k: v}"])
    assert yaml.safe_load(params.read_text())["rounds"] == {"scale": 4, "unused": 1, "extra": {"k": "v"}}
    with pytest.raises(dvc.OverrideError, match="nope"):
        dvc.apply_file_overrides(params, ["rounds.nope=1"])
