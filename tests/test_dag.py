"""dvc.yaml is the one DAG: its names, params, code deps and paths agree with the code."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_params import STAGES

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
EXPECTED = ["bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train", "evaluate"]


def lib_imports(path: Path) -> set[str]:
    """stages.lib modules a file imports, anywhere in it (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "stages.lib":
                found.update(f"stages.lib.{a.name}" for a in node.names)
            elif node.module.startswith("stages.lib."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stages.lib."))
    return found


def closure(stage: str) -> set[str]:
    todo = lib_imports(ROOT / "stages" / f"{stage}.py")
    done: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in done:
            continue
        done.add(mod)
        todo |= lib_imports(ROOT / (mod.replace(".", "/") + ".py")) - done
    return {f"stages/{stage}.py"} | {m.replace(".", "/") + ".py" for m in done}


def test_stage_names_agree_everywhere() -> None:
    assert list(DVC) == EXPECTED
    for name in EXPECTED:
        assert name in PARAMS, f"params.yaml has no section {name!r}"
        assert (ROOT / "stages" / f"{name}.py").is_file()
        assert (ROOT / "tests" / f"test_{name}.py").is_file()


@pytest.mark.parametrize("stage", EXPECTED)
def test_dvc_params_are_exactly_what_the_stage_reads(stage: str) -> None:
    assert DVC[stage]["params"] == list(STAGES[stage].PARAMS)


@pytest.mark.parametrize("stage", EXPECTED)
def test_code_deps_are_exactly_the_import_closure(stage: str) -> None:
    code_deps = {d for d in DVC[stage]["deps"] if d.startswith("stages/")}
    want = closure(stage)
    assert code_deps == want, f"dvc.yaml {stage}: missing {sorted(want - code_deps)}, not imported {sorted(code_deps - want)}"


@pytest.mark.parametrize("stage", EXPECTED)
def test_cmd_paths_are_declared(stage: str) -> None:
    """Inputs in the command are deps, outputs are outs/metrics/plots, and nothing else."""
    spec = DVC[stage]
    argv = shlex.split(spec["cmd"])
    assert argv[:3] == ["python", "-m", f"stages.{stage}"]
    args = dict(zip(argv[3::2], argv[4::2]))
    outs = set(spec["outs"]) | {next(iter(m)) for m in spec.get("metrics", [])} | {next(iter(p)) for p in spec.get("plots", [])}
    data_deps = {d for d in spec["deps"] if not d.startswith("stages/")}
    out_flags = {"--out", "--metrics", "--plot"}
    assert {v for k, v in args.items() if k in out_flags} == outs
    assert {v for k, v in args.items() if k not in out_flags | {"--params"}} == data_deps
    assert args["--params"] == "params.yaml"


def test_graph_edges() -> None:
    producers = {out: name for name, s in DVC.items() for out in s["outs"]}
    edges = {(producers[d], name) for name, s in DVC.items() for d in s["deps"] if d in producers}
    assert edges == {
        ("bootstrap", "teacher"), ("bootstrap", "student"), ("bootstrap", "train"), ("bootstrap", "evaluate"),
        ("seed", "teacher"), ("seed", "student"), ("seed", "pairs"), ("seed", "evaluate"),
        ("teacher", "pairs"), ("student", "pairs"), ("pairs", "curate"), ("curate", "train"), ("train", "evaluate"),
        ("curate", "score"), ("bootstrap", "score"), ("score", "train"),
    }
