"""dvc.yaml is the one DAG: its names, params, code deps and paths agree with the code."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_params import STAGES

RAW = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
BASE = ["bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train", "evaluate"]
ROUND = ["round_student", "round_pairs", "round_curate", "round_score", "round_train", "round_evaluate"]
EXPECTED = BASE + ROUND
# The round_* groups are `foreach: ${train.rounds}` templates; static checks read them
# instantiated for round 2 (tests/test_pipeline.py runs them through DVC itself).
ROUND_2 = {"${key}": "r2", "${item.previous}": "data/train"}


def instantiate(node: object) -> object:
    if isinstance(node, str):
        for k, v in ROUND_2.items():
            node = node.replace(k, v)
        return node
    if isinstance(node, list):
        return [instantiate(x) for x in node]
    if isinstance(node, dict):
        return {instantiate(k): instantiate(v) for k, v in node.items()}
    return node


DVC = {name: instantiate(spec["do"]) if "foreach" in spec else spec for name, spec in RAW.items()}


def module(stage: str) -> str:
    """The stage module a dvc.yaml stage runs: round_<x> runs stages.<x>."""
    return stage.removeprefix("round_")


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
    assert all(RAW[name]["foreach"] == "${train.rounds}" for name in ROUND)
    for name in BASE:
        assert name in PARAMS, f"params.yaml has no section {name!r}"
        assert (ROOT / "stages" / f"{name}.py").is_file()
        assert (ROOT / "tests" / f"test_{name}.py").is_file()


@pytest.mark.parametrize("stage", EXPECTED)
def test_dvc_params_are_exactly_what_the_stage_reads(stage: str) -> None:
    assert DVC[stage]["params"] == list(STAGES[module(stage)].PARAMS)


@pytest.mark.parametrize("stage", EXPECTED)
def test_code_deps_are_exactly_the_import_closure(stage: str) -> None:
    code_deps = {d for d in DVC[stage]["deps"] if d.startswith("stages/")}
    want = closure(module(stage))
    assert code_deps == want, f"dvc.yaml {stage}: missing {sorted(want - code_deps)}, not imported {sorted(code_deps - want)}"


@pytest.mark.parametrize("stage", EXPECTED)
def test_cmd_paths_are_declared(stage: str) -> None:
    """Inputs in the command are deps, outputs are outs/metrics/plots, and nothing else."""
    spec = DVC[stage]
    argv = shlex.split(spec["cmd"])
    assert argv[:3] == ["python", "-m", f"stages.{module(stage)}"]
    args = dict(zip(argv[3::2], argv[4::2]))
    outs = set(spec["outs"]) | {next(iter(m)) for m in spec.get("metrics", [])} | {next(iter(p)) for p in spec.get("plots", [])}
    data_deps = {d for d in spec["deps"] if not d.startswith("stages/")}
    out_flags = {"--out", "--metrics", "--plot"}
    assert {v for k, v in args.items() if k in out_flags} == outs
    assert {v for k, v in args.items() if k not in out_flags | {"--params"}} == data_deps
    assert args["--params"] == "params.yaml"


@pytest.mark.parametrize("stage", ROUND)
def test_a_round_runs_its_base_stage_on_the_round_paths(stage: str) -> None:
    """Same module, params and flags as the base stage; inputs from this round (or the
    previous round's student), outputs under data/rounds/<e>/."""
    base, rnd = DVC[module(stage)], DVC[stage]
    b_args, r_args = (dict(zip(shlex.split(x["cmd"])[3::2], shlex.split(x["cmd"])[4::2])) for x in (base, rnd))
    resumes = module(stage) in ("student", "train")
    assert set(r_args) == set(b_args) | ({"--previous"} if resumes else set())
    if resumes:
        assert RAW[stage]["do"]["cmd"].count("--previous ${item.previous}") == 1
    assert r_args["--out"] == f"data/rounds/r2/{module(stage)}" and r_args["--metrics"] == f"metrics/rounds/r2/{module(stage)}.json"
    assert base["params"] == rnd["params"]


def test_graph_edges() -> None:
    at = lambda name: f"{name}@r2" if name in ROUND else name  # noqa: E731
    producers = {out: at(name) for name, s in DVC.items() for out in s["outs"]}
    edges = {(producers[d], at(name)) for name, s in DVC.items() for d in s["deps"] if d in producers}
    assert edges == {
        ("bootstrap", "teacher"), ("bootstrap", "student"), ("bootstrap", "train"), ("bootstrap", "evaluate"),
        ("seed", "teacher"), ("seed", "student"), ("seed", "pairs"), ("seed", "evaluate"),
        ("teacher", "pairs"), ("student", "pairs"), ("pairs", "curate"), ("curate", "train"), ("train", "evaluate"),
        ("curate", "score"), ("bootstrap", "score"), ("score", "train"),
        # round 2 (instantiated): the student is sampled again from round 1's model
        ("train", "round_student@r2"), ("seed", "round_student@r2"), ("bootstrap", "round_student@r2"),
        ("seed", "round_pairs@r2"), ("teacher", "round_pairs@r2"), ("round_student@r2", "round_pairs@r2"),
        ("round_pairs@r2", "round_curate@r2"), ("round_curate@r2", "round_score@r2"), ("bootstrap", "round_score@r2"),
        ("round_curate@r2", "round_train@r2"), ("round_score@r2", "round_train@r2"), ("bootstrap", "round_train@r2"), ("train", "round_train@r2"),
        ("seed", "round_evaluate@r2"), ("bootstrap", "round_evaluate@r2"), ("round_train@r2", "round_evaluate@r2"),
    }
