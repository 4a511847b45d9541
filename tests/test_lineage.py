"""Lineage: manifests stay deterministic, run records and OpenLineage events carry what
varies, `distillflow lineage show/verify/cost` trace and check a smoke run, and the
run survives push / clone / pull through a DVC remote.

The first tests are fast (no pipeline; `lineage verify`'s sorting on a tiny git + DVC
repo laid out as this one, `twin`); the `smoke` fixture's tests are the slow tier:
a `dvc repro train` on the smoke profile in a temporary copy of the repo.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distillflow.audit import lineage
from distillflow.base.io import write_table
from distillflow.orchestration import trace as flin

from .builders import ENV, check_event, sh, write_stage
from .conftest import copy_repo


def _run_stage(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """write_stage as one OpenLineage run, as entry.run_stage runs a stage's main()."""
    lineage.start_run("pairs")
    return write_stage(tmp_path)


def test_manifest_is_deterministic_and_the_run_record_holds_what_varies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    out, manifest = _run_stage(tmp_path)
    first = (out / "manifest.json").read_bytes()
    _run_stage(tmp_path / "again")
    assert (tmp_path / "again" / "data" / "pairs" / "manifest.json").read_bytes().replace(b"again/", b"") == first
    assert manifest["seeds"] == {"pairs.seed": 3} and manifest["inputs"]["src"]["rows"] == 1
    assert "environment" not in manifest and "started" not in manifest
    record = json.loads((tmp_path / "lineage" / "runs" / "pairs.json").read_text())
    # library versions go in the run record (docs/decisions/library-versions.md)
    assert {"python", "pyarrow"} <= set(record["environment"])
    assert record["environment"]["openlineage-python"] == importlib.metadata.version("openlineage-python")
    # torch's CPU kernels and threads: what makes trained weights differ between machines
    assert record["environment"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["environment"]["torch_threads"] == torch.get_num_threads()
    assert record["run_id"] == lineage.RUN_ID and record["validation"] == {"success": True}
    assert (
        record["cost"]["tokens_read"] == 5
        and record["cost"]["wall_seconds"] >= 0
        and record["cost"]["peak_rss_mib"] > 0
    )
    assert record["cost"]["device_seconds_kind"] == "cpu_seconds" and {"commit", "dirty"} <= set(record["git"])
    history = (tmp_path / "lineage" / "runs" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2
    # `lineage show` finds the versions through the manifest's digest in the run history
    assert flin.run_environment(tmp_path, out / "manifest.json") == record["environment"]
    (out / "manifest.json").write_text("{}")
    assert flin.run_environment(tmp_path, out / "manifest.json") is None


def test_openlineage_events_are_well_formed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    monkeypatch.setenv("DISTILLFLOW_RUN_ID", "flow-run-7")
    _run_stage(tmp_path)
    files = sorted((tmp_path / "lineage" / "openlineage").rglob("*.json"))
    events = {json.loads(f.read_text())["eventType"]: json.loads(f.read_text()) for f in files}
    assert set(events) == {"START", "COMPLETE"}
    for event in events.values():
        check_event(event)
    done = events["COMPLETE"]
    assert done["run"]["runId"] == events["START"]["run"]["runId"]
    assert done["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 0
    assert [f["name"] for f in done["outputs"][0]["facets"]["schema"]["fields"]][:2] == ["pair_id", "prompt_id"]
    assert done["inputs"][0]["inputFacets"]["dataQualityMetrics"]["rowCount"] == 1
    assert done["run"]["facets"]["parent"]["run"]["runId"] == str(
        uuid.uuid5(uuid.NAMESPACE_URL, "distillflow:flow-run-7")
    )


def test_a_process_writing_several_folders_has_one_record_and_one_complete_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An on-policy round writes student, pairs, curate and score folders, then train:
    each step's manifest is written as it finishes, and the process's one run record
    (lists the steps) and one OpenLineage COMPLETE (their datasets; what a step wrote
    and a later one read is an output, not an input) come with the last manifest."""
    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    monkeypatch.setenv("DVC_STAGE", "round@r2")
    lineage.start_run("round")
    schema = pa.schema([pa.field("x", pa.string())], metadata={"distillflow.schema": "x"})
    src = tmp_path / "in.parquet"
    write_table(src, [{"x": "a"}], schema)
    first, last = tmp_path / "r2" / "pairs", tmp_path / "r2" / "train"
    for folder, read, stage, step in ((first, src, "pairs", True), (last, first / "p.parquet", "train", False)):
        folder.mkdir(parents=True)
        n = write_table(folder / "p.parquet", [{"x": stage}], schema)
        lineage.write_manifest(
            folder, stage, {}, inputs={"src": read}, outputs={"p.parquet": n}, counts={"n": n}, step=step
        )
        assert (folder / "manifest.json").is_file()
    records = (tmp_path / "lineage" / "runs" / "history.jsonl").read_text().splitlines()
    assert len(records) == 1  # one process, one record
    record = json.loads(records[0])
    assert record["job"] == "round@r2" and record["stage"] == "train"
    assert [(s["stage"], s["out"], s["rows_out"]) for s in record["steps"]] == [("pairs", str(first), {"p.parquet": 1})]
    files = sorted((tmp_path / "lineage" / "openlineage").rglob("*.json"))
    done = [json.loads(f.read_text()) for f in files if json.loads(f.read_text())["eventType"] == "COMPLETE"]
    assert len(done) == 1
    check_event(done[0])
    assert {d["name"] for d in done[0]["inputs"]} == {str(src.resolve())}
    assert {d["name"] for d in done[0]["outputs"]} == {
        str((first / "p.parquet").resolve()),
        str((last / "p.parquet").resolve()),
    }


def test_final_dir_names_the_out_an_atomic_write_is_for(tmp_path: Path) -> None:
    assert lineage.final_dir(tmp_path / ".curate.ab_c12x9.tmp") == tmp_path / "curate"
    assert lineage.final_dir(tmp_path / "curate") == tmp_path / "curate"


def test_cost_sums_the_stages_of_one_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = [
        {"run_id": rid, "job": job, "cost": {"wall_seconds": w, "cpu_seconds": w, "peak_rss_mib": m, "tokens_read": 10}}
        for rid, job, w, m in (
            ("a", "seed", 1.0, 100.0),
            ("b", "seed", 2.0, 50.0),
            ("b", "train", 3.0, 70.0),
            ("b", "train", 4.0, 80.0),
        )
    ]
    (runs / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = flin.cost_table(flin.run_records(tmp_path, None))
    assert table["run_id"] == "b" and set(table["stages"]) == {"seed", "train"}
    assert (
        table["total"]["wall_seconds"] == 6.0
        and table["total"]["peak_rss_mib"] == 80.0
        and table["total"]["tokens_read"] == 20
    )
    with pytest.raises(flin.LineageError, match="no records of run zzz"):
        flin.run_records(tmp_path, "zzz")


# --- verify sorts what it finds: a tiny git + DVC repo with both pipeline files ---------

# A stage's program: OUT/data.txt (from params.yaml and its inputs) with a manifest.json
# as the stages write one (outputs, inputs, code: sha256s as distillflow.base.io's
# digest_path takes them), and a metrics file. Standard library only: it starts fast.
MAKE = """import hashlib, json, sys
from pathlib import Path

def digest(path):
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(digest(p).encode())
    return h.hexdigest()

out, metrics, *inputs = sys.argv[1:]
folder = Path(out)
folder.mkdir(parents=True, exist_ok=True)
(folder / "data.txt").write_text(" ".join([out, Path("params.yaml").read_text(), *(digest(Path(i)) for i in inputs)]))
manifest = {
    "outputs": {"data.txt": {"sha256": digest(folder / "data.txt")}},
    "inputs": {f"in{n}": {"path": i, "sha256": digest(Path(i))} for n, i in enumerate(inputs)},
    "code": {"make.py": digest(Path("make.py"))},
}
(folder / "manifest.json").write_text(json.dumps(manifest))
Path(metrics).parent.mkdir(parents=True, exist_ok=True)
Path(metrics).write_text(json.dumps({"inputs": len(inputs)}))
"""


def _stage(out: str, *inputs: str, params: list[str] | None = None, cached_metrics: bool = True) -> dict[str, Any]:
    metrics = f"metrics/{Path(out).name}.json"
    stage = {"cmd": " ".join([sys.executable, "make.py", out, metrics, *inputs]), "deps": ["make.py", *inputs]}
    stage |= {"params": params} if params else {}
    if cached_metrics:
        return stage | {"outs": [out, metrics]}
    return stage | {"outs": [out], "metrics": [{metrics: {"cache": False}}]}


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repo laid out as this one: dvc.yaml (a; b and c read a's out) and
    comparison/dvc.yaml (cmp reads b's, run from the root; its metrics `cache: false`,
    committed to git as the comparison's plots are), both run and committed."""
    repo = tmp_path_factory.mktemp("twin")
    (repo / "make.py").write_text(MAKE)
    (repo / "params.yaml").write_text(yaml.safe_dump({"a": {"n": 1}, "b": {"k": 1}}))
    stages = {"a": _stage("data/a", params=["a.n"]), "b": _stage("data/b", "data/a", params=["b.k"])}
    stages["c"] = _stage("data/c", "data/a")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (repo / "comparison").mkdir()
    cmp = _stage("data/cmp", "data/b", cached_metrics=False) | {"wdir": ".."}
    (repo / "comparison" / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"cmp": cmp}}))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "repro"],
        ["dvc", "repro", "comparison/dvc.yaml"],
    ):
        sh(repo, *cmd)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "both pipelines ran")
    return repo


@pytest.fixture(scope="module")
def fresh(twin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's first command on a fresh clone of `twin`: `dvc repro` (dvc.yaml only).
    A test that changes it puts it back."""
    clone = tmp_path_factory.mktemp("fresh") / "clone"
    sh(clone.parent, "git", "clone", "-q", str(twin), str(clone))
    assert set(re.findall(r"Running stage '([\w@.:/-]+)'", sh(clone, "dvc", "repro"))) == {"a", "b", "c"}
    return clone


def test_verify_passes_a_fresh_clone_and_lists_what_never_ran_or_is_not_checked_out(fresh: Path) -> None:
    out = cli(fresh, "lineage", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    # cmp has a comparison/dvc.lock entry; its metrics file came with git, its data is nowhere here
    never = "never ran here: comparison/dvc.yaml:cmp (data/cmp: in neither the workspace nor the DVC cache)"
    assert never in out.stdout.splitlines(), out.stdout
    assert out.stdout.splitlines()[-1].endswith(" 0 mismatches; stages: 1 never ran here, 0 not checked out, 0 stale")
    # an out deleted from the workspace that the DVC cache holds: nothing present disagrees
    shutil.rmtree(fresh / "data" / "c")
    try:
        out = cli(fresh, "lineage", "verify")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "not checked out: c (data/c: not in the workspace; `dvc checkout c` restores" in out.stdout, out.stdout
        assert " 0 mismatches; stages: 1 never ran here, 1 not checked out, 0 stale" in out.stdout, out.stdout
    finally:
        sh(fresh, "dvc", "checkout", "c")


def test_verify_fails_on_a_tampered_output_and_names_it(fresh: Path) -> None:
    data = fresh / "data" / "b" / "data.txt"
    text = data.read_text()
    data.unlink()  # a fresh file: never write through a link into DVC's cache
    data.write_text(text + " (edited)")
    try:
        out = cli(fresh, "lineage", "verify")
        assert out.returncode == 1, out.stdout + out.stderr
        lines = [x for x in out.stdout.splitlines() if x.startswith("MISMATCH")]
        assert any(x.startswith("MISMATCH data/b/data.txt: file sha256 ") for x in lines), out.stdout
        assert "MISMATCH dvc.lock: stage b: changed outs: data/b: modified" in lines, out.stdout
        assert " 2 mismatches; stages: 1 never ran here, 0 not checked out, 0 stale" in out.stdout, out.stdout
    finally:
        sh(fresh, "dvc", "checkout", "--force", "b")


def test_verify_lists_the_stages_a_partial_repro_left_stale(twin: Path) -> None:
    """(The last to use `twin`: it leaves the changed params there.)"""
    (twin / "params.yaml").write_text(yaml.safe_dump({"a": {"n": 2}, "b": {"k": 2}}))
    sh(twin, "dvc", "repro", "c")  # reruns a and c: b read the old data/a, and its param changed
    out = cli(twin, "lineage", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    # b's manifest records the data/a it read, not the file now there nor a's manifest's: expected, not a mismatch
    assert "stale: b (changed since it ran: data/a modified, params.yaml b.k modified)" in out.stdout, out.stdout
    assert "comparison/dvc.yaml:cmp" not in out.stdout  # its dep, data/b, is what it read
    assert " 0 mismatches; stages: 0 never ran here, 0 not checked out, 1 stale" in out.stdout, out.stdout


# --- the slow tier: a smoke run -----------------------------------------------------


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`distillflow ARGS` with the repo copy's code, in the repo copy. Not checked: its
    exit status is what the tests assert on."""
    return subprocess.run(
        [sys.executable, "-m", "distillflow.cli", *args], cwd=repo, env=ENV, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke profile run up to train, committed: every stage a training pair passes through."""
    repo = copy_repo(tmp_path_factory.mktemp("lineage_repo"))
    try:
        subprocess.run(
            ["dvc", "repro", "train"],
            cwd=repo,
            env={**ENV, "DISTILLFLOW_RUN_ID": "smoke-run"},
            capture_output=True,
            text=True,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise AssertionError(
            f"dvc repro train failed ({exc.returncode}):\n{exc.stdout[-3000:]}\n{exc.stderr[-3000:]}"
        ) from exc
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "smoke run")
    return repo


@pytest.mark.slow
def test_show_takes_a_training_pair_back_to_its_source_row(smoke: Path) -> None:
    pair = pq.read_table(smoke / "data" / "curate" / "curated.parquet").to_pylist()[0]
    prompt = next(
        p
        for p in pq.read_table(smoke / "data" / "seed" / "train.parquet").to_pylist()
        if p["prompt_id"] == pair["prompt_id"]
    )
    text = cli(smoke, "lineage", "show", pair["pair_id"])
    assert text.returncode == 0, text.stderr
    assert f"source_ref: {prompt['source_ref']}" in text.stdout and "data/curate/curated.parquet row 0" in text.stdout
    tree = json.loads(cli(smoke, "lineage", "show", pair["pair_id"], "--json").stdout)
    assert tree["prompt"]["record"]["source_ref"] == prompt["source_ref"]
    teacher = json.loads((smoke / "data" / "teacher" / "manifest.json").read_text())
    assert (
        tree["chosen"]["record"]["model"] == teacher["model"]["fingerprint"]
        and tree["chosen"]["record"]["sampling"]["seed"] == 2
    )
    assert tree["rejected"]["found_in"] == ["data/student/generations.parquet row 0 (student)"]
    missing = cli(smoke, "lineage", "show", "0" * 32)
    assert missing.returncode == 1 and "no pair, generation or prompt" in missing.stderr


@pytest.mark.slow
def test_show_takes_the_trained_model_back_through_every_manifest(smoke: Path) -> None:
    tree = json.loads(cli(smoke, "lineage", "show", "data/train/model", "--json").stdout)
    assert tree["stage"] == "train" and tree["models"]["teacher"].startswith("sha256:")
    curate = tree["inputs"]["pairs"]
    assert curate["stage"] == "curate" and curate["inputs"]["pairs"]["stage"] == "pairs"
    # the seed stage is reached along train <- curate <- pairs <- seed and along curate <- seed;
    # it is expanded once (the first time the walk meets it) and marked repeated after
    seeds = [n for n in walk(tree) if n.get("stage") == "seed"]
    assert len(seeds) >= 2 and all(n["recorded_sha256"] == n["sha256"] for n in seeds)
    expanded = [n for n in seeds if not n.get("repeated")]
    assert len(expanded) == 1 and expanded[0]["seeds"]["seed.seed"] == 1
    assert curate["inputs"]["pairs"]["inputs"]["prompts"]["stage"] == "seed"


def walk(node: dict) -> list[dict]:
    """Every node of a `lineage show --json` tree."""
    return [node] + [m for child in node.get("inputs", {}).values() if isinstance(child, dict) for m in walk(child)]


@pytest.mark.slow
def test_the_model_card_is_in_hub_format_and_deterministic(smoke: Path) -> None:
    card = (smoke / "data" / "train" / "model" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "distillm2" in meta["tags"]
    teacher = json.loads((smoke / "data" / "train" / "manifest.json").read_text())["teacher"]["fingerprint"]
    assert teacher in body and '"kind": "toy"' in body and "digests checked" in body
    assert all(ch not in body for ch in ("2025-", "2026-", "2027-"))  # no dates


@pytest.mark.slow
def test_run_records_and_cost(smoke: Path) -> None:
    out = cli(smoke, "lineage", "cost", "--run", "smoke-run", "--json")
    table = json.loads(out.stdout)
    assert set(table["stages"]) == {"bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train"}
    assert table["stages"]["teacher"]["tokens_generated"] > 0 and table["stages"]["teacher"]["cache_hits"] == {
        "shards_resumed": 0
    }
    assert table["stages"]["train"]["tokens_read"] > 0 and table["total"]["wall_seconds"] > 0
    events = [json.loads(f.read_text()) for f in (smoke / "lineage" / "openlineage").rglob("*.json")]
    for event in events:
        check_event(event)
    # every stage process: one START, then its COMPLETE (entry.run_stage and the run record)
    types: dict[str, list[str]] = {}
    for event in events:
        types.setdefault(event["run"]["runId"], []).append(event["eventType"])
    assert all(sorted(t) == ["COMPLETE", "START"] for t in types.values()), types
    jobs = {e["job"]["name"] for e in events}
    assert set(table["stages"]) <= jobs
    assert "lineage" not in sh(smoke, "git", "status", "--porcelain")


@pytest.mark.slow
def test_push_clone_pull_gives_a_clean_verified_copy(smoke: Path, tmp_path: Path) -> None:
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    assert "local" in sh(smoke, "dvc", "remote", "default")
    sh(smoke, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(smoke, "dvc", "push")
    sh(tmp_path, "git", "clone", "-q", str(smoke), str(clone))
    sh(clone, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(clone, "dvc", "pull", "--with-deps", "train")  # the stages the smoke run ran
    status = json.loads(sh(clone, "dvc", "status", "--json", "--with-deps", "train").strip().splitlines()[-1])
    assert status == {"identify": ["always changed"]}  # identify reruns on every repro; nothing else differs
    verified = cli(clone, "lineage", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert " 0 mismatches" in verified.stdout


@pytest.mark.slow
def test_verify_names_an_edited_curated_row(smoke: Path) -> None:
    ok = cli(smoke, "lineage", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    curated = smoke / "data" / "curate" / "curated.parquet"
    table = pq.read_table(curated)
    rows = table.to_pylist()
    rows[0]["chosen"] += " (edited)"
    curated.unlink()  # a fresh file: never write through a link into DVC's cache
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), curated)
    try:
        bad = cli(smoke, "lineage", "verify")
        assert bad.returncode == 1
        lines = [x for x in bad.stdout.splitlines() if x.startswith("MISMATCH")]
        assert any(x.startswith("MISMATCH data/curate/curated.parquet: file sha256") for x in lines), bad.stdout
        assert any("stage curate: changed outs: data/curate: modified" in x for x in lines), bad.stdout
        # train read the file before the edit: stale (listed), its manifest's inputs not counted again
        assert "stale: train (changed since it ran: data/curate modified)" in bad.stdout.splitlines(), bad.stdout
        assert not any("data/train/manifest.json" in x for x in lines), bad.stdout
    finally:
        sh(smoke, "dvc", "checkout", "--force", "data/curate")
    assert cli(smoke, "lineage", "verify").returncode == 0
