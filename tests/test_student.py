"""The student stage through its real entry point (`python -m stages.student`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from distillflow.base import io, records
from stages import seed

from .builders import TASK, seed_params
from .conftest import ROOT


def test_entry_point_writes_generations_manifest_and_metrics(tmp_path: Path, tiny_models: Path) -> None:
    p = seed_params(num_train=6, num_eval=1)
    train, evals, _, _ = seed.run(TASK, p, seed.source_rows(TASK, p))
    io.write_table(tmp_path / "seed" / "train.parquet", train, records.PROMPT_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["student"].update(num_samples=2, max_new_tokens=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_models, tmp_path / "models")
    cmd = [
        sys.executable,
        "-m",
        "stages.student",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prompts",
        str(tmp_path / "seed"),
        "--models",
        str(tmp_path / "models"),
        "--out",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    table = pq.read_table(tmp_path / "out" / "generations.parquet")
    assert table.schema.equals(records.GENERATION_SCHEMA, check_metadata=False)
    assert table.num_rows == 12
    manifest = yaml.safe_load((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stage"] == "student"
    assert manifest["params"]["student"]["num_samples"] == 2
    assert "models.teacher" not in manifest["params"]  # the student stage never reads the teacher's params
    assert manifest["inputs"]["prompts"]["sha256"] == io.digest_path(tmp_path / "seed" / "train.parquet")
    assert manifest["outputs"]["generations.parquet"]["rows"] == 12
    assert "stages/student.py" in manifest["code"] and "distillflow/engines/generation.py" in manifest["code"]
    metrics = yaml.safe_load((tmp_path / "m.json").read_text())
    assert metrics["generations"] == 12 and sum(metrics["finish_reason"].values()) == 12


def test_bad_params_fail_before_any_work_naming_the_key(tmp_path: Path, tiny_models: Path) -> None:
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["student"]["temprature"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "stages.student",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prompts",
        str(tmp_path),
        "--models",
        str(tiny_models),
        "--out",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "unknown key(s) ['student.temprature']" in done.stderr
    assert not (tmp_path / "out").exists()
