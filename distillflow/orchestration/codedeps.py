"""The code deps of each dvc.yaml stage, computed from imports and written into dvc.yaml.

A stage's code is its module plus every distillflow module it imports, directly or
through other modules (lazy imports inside functions included). dvc.yaml names the
stage's module file and the layer folders of the package those modules lie in
(`distillflow/base`, `distillflow/training`, ...; tests/test_layers.py holds the
layers), and a module the task registry loads by name lies in `distillflow/tasks`,
which every stage that reaches the registry lists.

    distillflow dag sync      rewrite the code deps in dvc.yaml (after an import changed)
    distillflow dag sync --check
                              exit 1, naming the stages, if dvc.yaml is out of date

Why layer folders rather than the list of files (what this wrote before the package
had layers): the lists were 60% of dvc.yaml, and a stage's layers are what a reader
wants to see (train: audit, base, stagekit, training; not tasks). The cost is
reruns that exact file lists would skip: editing a module in a layer a stage uses
reruns the stage even when it never imports that module, and DVC then finds the same
outputs and keeps everything downstream cached. Never a missed change: a stage's
layers cover every file it loads (tests/test_dag.py). The two package `__init__.py`
files above the layers (stages/, distillflow/) hold only docstrings (tests/test_layers.py
checks), so no dep names them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOP = ("stages", "distillflow")
# docstring-only package files every stage loads: no dep names them (tests/test_layers.py)
DOCSTRING_ONLY = ("stages/__init__.py", "distillflow/__init__.py")
CODE_DEP = re.compile(r"^\s+- (stages/\S+\.py|distillflow(?:/\S+)?)\s*$")


# The pipeline files whose code deps `distillflow dag sync` keeps (repo-relative): the
# default pipeline and the method comparison's (run from the repo root: wdir ..).
PIPELINES = (Path("dvc.yaml"), Path("comparison") / "dvc.yaml")


def module_file(root: Path, module: str) -> Path | None:
    """The file a dotted `stages...` module name loads, or None if there is none."""
    base = root / module.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(root: Path, path: Path) -> set[str]:
    """The `stages` and `distillflow` modules a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in TOP:
                continue
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if module_file(root, sub) is not None:
                    found.add(sub)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in TOP)
    return found


def with_packages(modules: set[str]) -> set[str]:
    """The modules and every package above them: `distillflow.base.io` adds `distillflow.base`, `distillflow`."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def closure(stage_module: str, root: Path = ROOT) -> list[str]:
    """The repo-relative files `python -m stages.<stage_module>` loads from `stages` and `distillflow`, sorted."""
    start = f"stages.{stage_module}"
    todo, done = {start}, set()
    while todo:
        mod = todo.pop()
        if mod in done:
            continue
        done.add(mod)
        file = module_file(root, mod)
        if file is None:
            raise ValueError(f"{stage_module}: imports {mod}, which has no file under {root}")
        todo |= imported_modules(root, file) - done
    files = {module_file(root, m) for m in with_packages(done)}
    return sorted(p.relative_to(root).as_posix() for p in files if p is not None)


def layer_deps(files: list[str]) -> list[str]:
    """dvc.yaml's code deps for a closure: the stage files, and the layer folder of each
    distillflow file (`distillflow/training/losses/fused.py` -> `distillflow/training`)."""
    out: set[str] = set()
    for f in files:
        if f in DOCSTRING_ONLY:
            continue
        parts = f.split("/")
        out.add("/".join(parts[:2]) if parts[0] == "distillflow" and len(parts) > 2 else f)
    return sorted(out, key=lambda d: (not d.startswith("stages/"), d))


def stage_module(name: str, cmd: str) -> str:
    """The stage module a dvc.yaml command runs (`python -m stages.X ...`)."""
    m = re.match(r"python -m stages\.(\w+)\b", cmd.strip())
    if m is None:
        raise ValueError(f"dvc.yaml {name}: command does not run a stages module: {cmd!r}")
    return m.group(1)


def constant(root: Path, module: str, name: str) -> Any:
    """A module-level constant of stage module `stages.<module>` (`NAME = <literal>`),
    read from its source without importing it; None where it has none."""
    path = module_file(root, f"stages.{module}")
    if path is None:
        raise ValueError(f"no stage module stages.{module} under {root}")
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def sync_text(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's code deps replaced by its import closure, and
    the names of the stages whose deps changed. Comments and everything else stay."""
    lines = text.split("\n")
    out: list[str] = []
    changed: list[str] = []
    i = 0
    stage = cmd = None
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  (\w[\w-]*):\s*$", line)
        if head:
            stage, cmd = head.group(1), None
        c = re.match(r"^\s+cmd:\s*(.+)$", line)
        if c:
            cmd = c.group(1)
        if re.match(r"^\s+deps:\s*$", line) and stage is not None:
            if cmd is None:
                raise ValueError(f"dvc.yaml {stage}: deps come before cmd; put cmd first")
            out.append(line)
            i += 1
            indent = (
                re.match(r"^(\s+)- ", lines[i]).group(1)
                if i < len(lines) and lines[i].lstrip().startswith("- ")
                else None
            )
            if indent is None:
                raise ValueError(f"dvc.yaml {stage}: deps is empty")
            old, rest = [], []
            while i < len(lines) and lines[i].startswith(indent + "- "):
                m = CODE_DEP.match(lines[i])
                (old if m else rest).append(m.group(1) if m else lines[i])
                i += 1
            new = layer_deps(closure(stage_module(stage, cmd), root))
            if new != old:
                changed.append(stage)
            out.extend(f"{indent}- {f}" for f in new)
            out.extend(rest)
            continue
        out.append(line)
        i += 1
    return "\n".join(out), changed


def sync(dvc_yaml: Path, check_only: bool, root: Path | None = None) -> int:
    """Rewrite (or, with check_only, only check) the code deps of `dvc_yaml`, whose
    stage modules live under `root` (default: the folder dvc.yaml is in)."""
    text = dvc_yaml.read_text()
    new, changed = sync_text(text, dvc_yaml.parent if root is None else root)
    if not changed:
        print(f"{dvc_yaml}: code deps up to date")
        return 0
    if check_only:
        print(f"{dvc_yaml}: code deps out of date for {', '.join(changed)}; run `distillflow dag sync`")
        return 1
    dvc_yaml.write_text(new)
    print(f"{dvc_yaml}: rewrote the code deps of {', '.join(changed)}")
    return 0
