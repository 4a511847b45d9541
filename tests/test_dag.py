"""dvc.yaml (the default pipeline) and comparison/dvc.yaml (the method comparison, its
own pipeline over the default one's outputs) agree with the code: names, params, code
deps and paths."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from distillflow.orchestration import codedeps

from .builders import STAGES
from .conftest import ROOT

MAIN = yaml.safe_load((ROOT / "dvc.yaml").read_text())
SECOND = yaml.safe_load((ROOT / "comparison" / "dvc.yaml").read_text())
RAW = MAIN["stages"] | SECOND["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
BASE = ["bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train", "evaluate"]
# the comparison's bootstrap replicates: the teacher and initial student, the control
# teacher (no corrupted prefixes), and for each teacher its responses, pairs, curated pairs and scores
REPLICATE = ["boot", "boot_plain", "boot_teacher", "boot_student", "boot_pairs", "boot_curate", "boot_score"]
COMPARISON = REPLICATE + ["compare", "report"]
IDENTIFY = ["identify"]  # always runs; no params section of its own (it reads models.teacher / models.student)
ROUND = ["round", "round_evaluate"]  # rounds 2..E: stages/round.py, then the evaluate stage on its student
ROUND_STEPS = ["student", "pairs", "curate", "score", "train"]  # the stages a round runs as steps
EXPECTED = IDENTIFY + BASE + ROUND + COMPARISON  # dvc.yaml, then comparison/dvc.yaml
# The round groups are `foreach: ${train.rounds}` templates, the replicates foreach or
# matrix over compare.bootstraps (x the two teachers), and compare a matrix over
# compare.runs x compare.bootstraps x compare.seeds; static checks read them
# instantiated for round 2, bootstrap 1's default teacher and the cell (kd, 1, 1)
# (tests/test_pipeline.py runs them through DVC itself).
ROUND_2 = {
    "${key}": "r2",
    "${item.previous}": "data/train",
    "${item.run}": "kd",
    "${item.seed}": "1",
    "${item.bootstrap}": "1",
    "${item.b}": "1",
    "${item.teacher}": "default",
    "${item}": "1",
}


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


DVC = {name: instantiate(spec["do"]) if "foreach" in spec else instantiate(spec) for name, spec in RAW.items()}


def module(stage: str) -> str:
    """The stage module a dvc.yaml stage runs: round_<x> and boot_<x> run stages.<x>,
    boot and boot_plain stages.bootstrap, round runs stages.round."""
    if stage in ("boot", "boot_plain"):
        return "bootstrap"
    return stage.removeprefix("round_").removeprefix("boot_")


def closure(stage: str) -> set[str]:
    return set(codedeps.closure(stage))


def test_stage_names_agree_everywhere() -> None:
    assert list(DVC) == EXPECTED
    assert all(RAW[name]["foreach"] == "${train.rounds}" for name in ROUND)
    assert set(RAW["compare"]["matrix"]) == {"run", "bootstrap", "seed"}
    assert RAW["compare"]["matrix"]["bootstrap"] == "${compare.bootstraps}"
    for name in REPLICATE:  # one per bootstrap, or per bootstrap and teacher
        spec = RAW[name]
        assert spec.get("foreach") == "${compare.bootstraps}" or spec["matrix"] == {
            "b": "${compare.bootstraps}",
            "teacher": ["default", "plain"],
        }
    # the comparison is its own pipeline: not in dvc.yaml (a plain `dvc repro` never runs
    # it), run from the repo root with the root params file
    assert list(SECOND["stages"]) == COMPARISON and not set(COMPARISON) & set(MAIN["stages"])
    assert SECOND["vars"] == ["../params.yaml:compare"]
    assert all(DVC[n]["wdir"] == ".." for n in COMPARISON)
    for name in COMPARISON:
        assert (ROOT / "stages" / f"{module(name)}.py").is_file()
        assert (ROOT / "tests" / f"test_{module(name)}.py").is_file()
    assert "compare" in PARAMS
    assert RAW["identify"]["always_changed"] is True and (ROOT / "tests" / "test_preflight.py").is_file()
    for name in BASE:
        assert name in PARAMS, f"params.yaml has no section {name!r}"
        assert (ROOT / "stages" / f"{name}.py").is_file()
        assert (ROOT / "tests" / f"test_{name}.py").is_file()


@pytest.mark.parametrize("stage", EXPECTED)
def test_dvc_params_are_exactly_what_the_stage_reads(stage: str) -> None:
    assert DVC[stage]["params"] == instantiate(list(STAGES[module(stage)].PARAMS))


@pytest.mark.parametrize("stage", EXPECTED)
def test_code_deps_are_the_layers_of_the_import_closure(stage: str) -> None:
    """The stage's module and the layer folder of every library file it loads: no
    loaded file outside them (a missed change), no layer it does not load from."""
    code_deps = {d for d in DVC[stage]["deps"] if d.startswith(("stages/", "distillflow"))}
    loaded = closure(module(stage))
    assert code_deps == set(codedeps.layer_deps(sorted(loaded))), f"dvc.yaml {stage}: run `distillflow dag sync`"
    uncovered = [
        f
        for f in loaded
        if f not in codedeps.DOCSTRING_ONLY and not any(f == d or f.startswith(d + "/") for d in code_deps)
    ]
    assert not uncovered, f"dvc.yaml {stage}: no dep covers {uncovered}"
    for d in code_deps:
        assert any(f == d or f.startswith(d + "/") for f in loaded), f"dvc.yaml {stage}: {d} holds nothing it loads"


def test_dag_sync_finds_nothing_to_change_and_rewrites_a_stale_list(tmp_path: Path) -> None:
    for f in codedeps.PIPELINES:
        assert codedeps.sync_text((ROOT / f).read_text(), ROOT)[1] == [], f"{f}: run `distillflow dag sync`"
    text = (ROOT / "dvc.yaml").read_text()
    assert codedeps.sync_text(text, ROOT) == (text, [])
    stale = text.replace("      - distillflow/audit\n", "", 1).replace(
        "      - stages/pairs.py\n", "      - stages/pairs.py\n      - distillflow/tasks\n", 1
    )
    assert stale != text
    path = tmp_path / "dvc.yaml"
    path.write_text(stale)
    assert codedeps.sync(path, check_only=True, root=ROOT) == 1 and path.read_text() == stale
    synced, changed = codedeps.sync_text(stale, ROOT)
    assert synced == text and changed == ["identify", "pairs"]


def test_no_stage_imports_another_stage() -> None:
    """Stages share code through distillflow (the generation stage body included), never by
    importing one another: a stage's behaviour is its own module plus the library."""
    stage_modules = {f"stages.{module(s)}" for s in EXPECTED}
    for stage in sorted({module(s) for s in EXPECTED}):
        imported = codedeps.imported_modules(ROOT, ROOT / "stages" / f"{stage}.py")
        assert not imported & stage_modules, f"stages/{stage}.py imports {sorted(imported & stage_modules)}"


@pytest.mark.parametrize("stage", EXPECTED)
def test_cmd_paths_are_declared(stage: str) -> None:
    """Inputs in the command are deps, outputs are outs/metrics/plots, and nothing else."""
    spec = DVC[stage]
    argv = shlex.split(spec["cmd"])
    assert argv[:3] == ["python", "-m", f"stages.{module(stage)}"]
    args = dict(zip(argv[3::2], argv[4::2]))
    if stage in REPLICATE:  # a replicate's stages: the base stage's flags and the replicate, their own paths
        base = set(dict(zip(*[iter(shlex.split(DVC[module(stage)]["cmd"])[3:])] * 2))) - {"--docs"}
        seeded = stage in ("boot", "boot_plain", "boot_teacher", "boot_student")  # the stages with a seed
        assert set(args) == base | ({"--replicate"} if seeded else set()) | (
            {"--student-from"} if stage == "boot_plain" else set()
        )
        assert all(
            v.startswith(("data/compare/b1/", "metrics/replicates/b1/"))
            for k, v in args.items()
            if k in ("--out", "--metrics")
        )
    name = lambda o: o if isinstance(o, str) else next(iter(o))  # noqa: E731  (an out with options is {path: {...}})
    outs = (
        {name(o) for o in spec["outs"]}
        | {name(m) for m in spec.get("metrics", [])}
        | {name(p) for p in spec.get("plots", [])}
    )
    data_deps = {d for d in spec["deps"] if not d.startswith(("stages/", "distillflow"))}
    out_flags, value_flags = (
        {"--out", "--metrics", "--summary", "--plot", "--live", "--docs", "--prompt-scores"},
        {"--run", "--bootstrap", "--seed", "--round", "--replicate"},
    )  # compare's matrix values, evaluate's round label, a replicate's bootstrap
    written = {v for k, v in args.items() if k in out_flags}
    if stage == "round":  # its --out folder holds one folder per step, each an out
        written = (written - {args["--out"]}) | {f"{args['--out']}/{step}" for step in ROUND_STEPS}
    assert written == outs
    assert {v for k, v in args.items() if k not in out_flags | value_flags | {"--params"}} == data_deps
    assert args["--params"] == "params.yaml"


def test_a_round_runs_the_steps_of_its_base_stages_on_the_round_paths() -> None:
    """The round stage reads every params section its steps' stages read, its inputs are
    the base stages' inputs (the previous round's student in place of the initial one),
    its outputs are theirs under data/rounds/<e>/; round_evaluate is evaluate there."""
    want = [k for step in ROUND_STEPS for k in DVC[step]["params"]]
    assert set(DVC["round"]["params"]) == set(want)
    assert RAW["round"]["do"]["cmd"].count("--previous ${item.previous}") == 1
    outs = [o if isinstance(o, str) else next(iter(o)) for o in DVC["round"]["outs"]]
    assert outs[:5] == [f"data/rounds/r2/{step}" for step in ROUND_STEPS]
    base, rnd = (dict(zip(shlex.split(DVC[s]["cmd"])[3::2], shlex.split(DVC[s]["cmd"])[4::2])) for s in ROUND[::-1])
    ev = dict(zip(shlex.split(DVC["evaluate"]["cmd"])[3::2], shlex.split(DVC["evaluate"]["cmd"])[4::2]))
    assert set(base) == set(ev) and base["--trained"] == "data/rounds/r2/train" and base["--round"] == "r2"
    assert DVC["round_evaluate"]["params"] == DVC["evaluate"]["params"]
    assert rnd["--out"] == "data/rounds/r2" and rnd["--metrics"] == "metrics/rounds/r2/round.json"


def test_graph_edges() -> None:
    at = lambda name: f"{name}@r2" if name in ROUND else "compare@kd-1" if name == "compare" else name  # noqa: E731
    producers = {
        out if isinstance(out, str) else next(iter(out)): at(name) for name, s in DVC.items() for out in s["outs"]
    }
    producers |= {next(iter(m)): at(name) for name, s in DVC.items() for m in s.get("metrics", [])}
    edges = {(producers[d], at(name)) for name, s in DVC.items() for d in s["deps"] if d in producers}
    # a dep on a folder holding other stages' outputs (report reads metrics/compare/)
    edges |= {
        (producers[o], at(name))
        for name, s in DVC.items()
        for d in s["deps"]
        for o in producers
        if o.startswith(d + "/")
    }
    assert edges == {
        ("identify", "bootstrap"),
        ("bootstrap", "seed"),
        ("bootstrap", "teacher"),
        ("bootstrap", "student"),
        ("bootstrap", "train"),
        ("bootstrap", "evaluate"),
        ("seed", "teacher"),
        ("seed", "student"),
        ("seed", "pairs"),
        ("seed", "evaluate"),
        ("teacher", "pairs"),
        ("student", "pairs"),
        ("pairs", "curate"),
        ("seed", "curate"),
        ("curate", "train"),
        ("train", "evaluate"),
        ("curate", "score"),
        ("bootstrap", "score"),
        ("score", "train"),
        # round 2 (instantiated): the student is sampled again from round 1's model,
        # paired with the teacher's responses, curated, scored and trained on
        ("train", "round@r2"),
        ("seed", "round@r2"),
        ("teacher", "round@r2"),
        ("bootstrap", "round@r2"),
        ("seed", "round_evaluate@r2"),
        ("bootstrap", "round_evaluate@r2"),
        ("round@r2", "round_evaluate@r2"),
        # the comparison's bootstrap 1 (its default teacher's instance): its models, the
        # control teacher beside the same student, responses, samples, pairs, curation, scores
        ("identify", "boot"),
        ("identify", "boot_plain"),
        ("boot", "boot_plain"),
        ("seed", "boot_teacher"),
        ("boot", "boot_teacher"),
        ("seed", "boot_student"),
        ("boot", "boot_student"),
        ("seed", "boot_pairs"),
        ("boot_teacher", "boot_pairs"),
        ("boot_student", "boot_pairs"),
        ("boot_pairs", "boot_curate"),
        ("seed", "boot_curate"),
        ("boot_curate", "boot_score"),
        ("boot", "boot_score"),
        # a cell reads its bootstrap's models, responses, curated pairs and scores and the
        # seed prompts, nothing of the default pipeline's training; the report reads every cell
        ("seed", "compare@kd-1"),
        ("boot", "compare@kd-1"),
        ("boot_plain", "compare@kd-1"),
        ("boot_teacher", "compare@kd-1"),
        ("boot_curate", "compare@kd-1"),
        ("boot_score", "compare@kd-1"),
        ("compare@kd-1", "report"),
    }


def test_no_test_module_imports_another() -> None:
    """Tests share builders through tests/builders.py (and fixtures through conftest.py)."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert not (node.module or "").startswith("test_"), f"{path.name} imports tests/{node.module}.py"
