"""The package's layers import only downward, and the wheel installs one top-level name.

The order is written once, here (distillflow/__init__.py describes it): a module may
import its own layer and the layers below it, never one above; a stage module
(stages/) or a flow (flows/) may import any layer. Lazy imports inside functions
count. Within a layer, modules may import each other, but not in a cycle.
"""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT

LAYERS = [
    "base",  # errors, params, shared params sections, records and ids, io, models
    "tasks",  # the task interface and registry (the toy task is one plugin)
    "engines",  # generation and scoring engines
    "data",  # sources, split, synthesis, pairing, curation, quarantine
    "training",  # losses, methods, trainer
    "evaluation",  # metrics, evaluator
    "audit",  # quality gates, lineage, OpenLineage
    "stagekit",  # the bodies stage modules share
    "orchestration",  # dvc.yaml as a DAG, the Prefect flow, code deps, lineage commands
    "cli",  # the `distillflow` command
]
PACKAGE = ROOT / "distillflow"
# The embedded toy task is a plugin: the registry (distillflow/tasks/__init__.py) loads
# it by name; only the builder of its models (loaded by bootstrap for toy models alone)
# and its tests import it.
PLUGIN = "distillflow.tasks.toy"
MAY_IMPORT_PLUGIN = {"distillflow/stagekit/toymodels.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The distillflow modules a file imports anywhere in it: `from a import b` counts
    a.b when b is a module, else a (a package's own `__init__` that a submodule import
    runs on the way is not counted: it is not what the file asked for)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "distillflow":
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names}
            modules = {s for s in subs if is_module(s)}
            found |= modules
            if modules != subs:  # a name defined in node.module itself
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "distillflow")
    return found


def layer(module: str) -> int | None:
    """The layer index of a distillflow module; None for the package itself."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None


FILES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(f): imports(f) for f in FILES}


def test_every_subpackage_is_a_layer() -> None:
    tops = {module_name(f).split(".")[1] for f in FILES if module_name(f) != "distillflow"}
    assert tops == set(LAYERS), f"not in LAYERS: {sorted(tops - set(LAYERS))}; add them in their place"


def test_imports_only_go_down() -> None:
    upward = []
    for mod, deps in GRAPH.items():
        here = layer(mod)
        for dep in deps:
            there = layer(dep)
            if here is not None and there is not None and there > here:
                upward.append(f"{mod} ({LAYERS[here]}) imports {dep} ({LAYERS[there]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH or d == m:
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_only_the_registry_and_its_builder_import_the_toy_task() -> None:
    offenders = []
    for f in FILES + sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "flows").glob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if module_name(f).startswith(PLUGIN) or rel in MAY_IMPORT_PLUGIN:
            continue
        if any(d == PLUGIN or d.startswith(PLUGIN + ".") for d in imports(f)):
            offenders.append(rel)
    assert not offenders, f"import the toy task through distillflow.tasks.get(): {offenders}"


def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("distillflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"distillflow"}, tops
    assert "distillflow/tasks/toy/toytask.py" in names and "distillflow/cli.py" in names


def test_the_package_files_no_dep_names_hold_only_a_docstring() -> None:
    """dvc.yaml names no `__init__.py` above the layers (distillflow/orchestration/codedeps.py),
    so those files must not hold code that could change a stage's behaviour."""
    from distillflow.orchestration import codedeps

    for rel in codedeps.DOCSTRING_ONLY:
        body = ast.parse((ROOT / rel).read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), rel
