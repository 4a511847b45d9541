"""Size limits for the library and the stage modules: no module over 500 lines, no
function or method over 80 lines (its def line to its last, decorators not counted).

A module past the limit is split by what its parts hold (the comparison's numbers and
its report's files are two modules in distillflow/evaluation/); a function past it by
its steps.
"""

import ast
from pathlib import Path

from .conftest import ROOT

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
FOLDERS = ("distillflow", "stages")


def modules() -> list[Path]:
    return sorted(f for folder in FOLDERS for f in (ROOT / folder).rglob("*.py"))


def long_functions(path: Path) -> list[str]:
    """`path:line name (N lines)` for every function or method (nested ones included) over the limit."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_the_checks_see_the_modules() -> None:
    assert (ROOT / "stages" / "report.py") in modules() and (ROOT / "distillflow" / "cli.py") in modules()


def test_no_module_over_500_lines() -> None:
    offenders = [
        f"{f.relative_to(ROOT).as_posix()} ({n} lines)"
        for f in modules()
        if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_over_80_lines() -> None:
    offenders = [line for f in modules() for line in long_functions(f)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
