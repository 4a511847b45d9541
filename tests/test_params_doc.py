"""The params schema (distillflow/orchestration/schema.py) covers params.yaml, gives
every setting its help, agrees with what the stages load, and docs/params.md is its
current rendering (regenerate it with `distillflow params --markdown > docs/params.md`)."""

from __future__ import annotations

import dataclasses
from typing import Any, get_origin

import pytest

from distillflow.base import params
from distillflow.orchestration import schema

from .builders import STAGES
from .conftest import ROOT


def test_docs_params_md_is_the_rendering_of_params_yaml() -> None:
    rendered = schema.render_markdown(ROOT / "params.yaml")
    committed = (ROOT / "docs" / "params.md").read_text()
    assert committed == rendered, f"docs/params.md is stale: run `{schema.COMMAND}`"


def test_every_setting_has_help() -> None:
    missing = sorted(
        {f"{s.owner.__module__}.{s.owner.__qualname__}.{s.field}" for s in schema.settings() if not s.help}
    )
    assert not missing, f"params fields without a help comment (on or above the field): {missing}"


def test_schema_sections_are_params_yaml_top_level_keys() -> None:
    keys = list(params.load_yaml(ROOT / "params.yaml"))
    assert keys == list(schema.SECTIONS), "params.yaml's sections and schema.SECTIONS differ (names or order)"


def test_teacher_and_student_share_one_schema() -> None:
    assert schema.SECTIONS["teacher"] is schema.SECTIONS["student"]


def _keys(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    out = {prefix} if prefix else set()
    for k, v in node.items():
        out |= _keys(v, f"{prefix}.{k}" if prefix else k)
    return out


def test_every_params_yaml_key_has_a_schema_entry_and_back() -> None:
    """Every key of params.yaml (mapping entries as schema.ENTRY) is a setting of the
    schema, and every setting appears in params.yaml."""
    data = params.load_yaml(ROOT / "params.yaml")
    setting_keys = {s.key for s in schema.settings()}
    yaml_keys = set()
    for key in _keys(data):
        parts = key.split(".")
        for i in range(1, len(parts)):  # an entry of a mapping (train.rounds, compare.runs)
            prefix = ".".join(parts[:i])
            if prefix in setting_keys and get_origin(schema.lookup(prefix)) is dict:
                parts[i] = schema.ENTRY
        yaml_keys.add(".".join(parts))
    yaml_keys -= set(schema.SECTIONS)
    yaml_keys = {k for k in yaml_keys if not k.endswith(f".{schema.ENTRY}")}  # an entry itself
    # an optional section left null in params.yaml (seed.eval_source) has no keys under it there
    unset = {k for k in setting_keys - yaml_keys if schema.value_at(data, k.rsplit(".", 1)[0])[1] is None}
    assert sorted(yaml_keys - setting_keys) == []
    assert sorted(setting_keys - yaml_keys - unset) == []


@pytest.mark.parametrize("stage", list(STAGES.values()), ids=list(STAGES))
def test_stage_sections_use_the_schema_classes(stage: Any) -> None:
    """Each key a stage loads (its SECTIONS) has, in the schema, the type the stage loads it as."""
    for key, typ in stage.SECTIONS.items():
        if typ is Any:  # built later from raw values (compare's shared train settings)
            continue
        want = schema.lookup(key.replace("${item.run}", "any_run"))
        assert want == typ, f"{stage.__name__}: {key} loads as {typ}, the schema says {want}"
        if dataclasses.is_dataclass(typ):
            assert typ.__module__.startswith("distillflow."), key


def test_cli_prints_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from distillflow import cli

    assert cli.main(["params", "teacher", "--params", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "teacher.openai.cache_dir (str) = data/.cache/openai" in out
    assert cli.main(["params", "no_such_section"]) == 2
