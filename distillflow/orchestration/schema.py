"""The params schema: each params.yaml top-level section, the dataclass it loads into,
and every setting under it with its type and its one help text (the comment on its
dataclass field, distillflow/base/fieldhelp.py).

`distillflow params` prints the settings with a params file's values; `render_markdown`
writes docs/params.md from the same walk (tests/test_params_doc.py keeps it in step).
teacher and student share one schema, GenerationParams: settings and help are written once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from distillflow.audit.suites import QualityParams
from distillflow.base.config import BootstrapParams, GenerationParams, ModelsParams, TaskParams
from distillflow.base.fieldhelp import field_help
from distillflow.data.curation import CurateParams
from distillflow.data.pairing import PairsParams
from distillflow.data.sources import SeedParams
from distillflow.engines.scoring import ScoreParams
from distillflow.evaluation.comparison import CompareParams
from distillflow.evaluation.eval_params import EvaluateParams
from distillflow.training.train_params import TrainParams

# params.yaml top-level section -> its dataclass, in params.yaml's order.
SECTIONS: dict[str, type] = {
    "models": ModelsParams,
    "task": TaskParams,
    "bootstrap": BootstrapParams,
    "seed": SeedParams,
    "teacher": GenerationParams,
    "student": GenerationParams,
    "pairs": PairsParams,
    "curate": CurateParams,
    "quality": QualityParams,
    "score": ScoreParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "compare": CompareParams,
}

# A mapping's entries (train.rounds, compare.runs) appear in keys as this placeholder.
ENTRY = "<name>"
COMMAND = "distillflow params --markdown > docs/params.md"


class Setting(NamedTuple):
    key: str  # dotted, e.g. "teacher.openai.base_url"; a mapping's entries as ENTRY
    type: Any  # the field's annotation, resolved
    help: str  # "" when the field has no help comment (a test refuses that)
    owner: type  # the dataclass declaring the field
    field: str


def dataclass_of(typ: Any) -> type | None:
    """The dataclass a field holds: itself, inside Optional, or a mapping's entries."""
    if dataclasses.is_dataclass(typ):
        return typ
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        inner = [dataclass_of(a) for a in get_args(typ) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return None


def walk(cls: type, prefix: str) -> Iterator[Setting]:
    """Every setting under dataclass `cls` at `prefix`, depth first, in field order."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        typ, key = hints[f.name], f"{prefix}.{f.name}"
        yield Setting(key, typ, helps.get(f.name, ""), cls, f.name)
        if get_origin(typ) is dict:
            inner = dataclass_of(get_args(typ)[1])
            if inner is not None:
                yield from walk(inner, f"{key}.{ENTRY}")
        elif (inner := dataclass_of(typ)) is not None:
            yield from walk(inner, key)


def settings(sections: list[str] | None = None) -> Iterator[Setting]:
    for name in sections or list(SECTIONS):
        if name not in SECTIONS:
            raise KeyError(f"no params section {name!r}; the sections are {list(SECTIONS)}")
        yield from walk(SECTIONS[name], name)


def lookup(key: str) -> Any:
    """The type at dotted `key` (a section, a setting, a mapping entry by any name)."""
    section, *rest = key.split(".")
    typ: Any = SECTIONS[section]
    for part in rest:
        if get_origin(typ) is dict:
            typ = get_args(typ)[1]
            continue
        cls = dataclass_of(typ)
        if cls is None or part not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            raise KeyError(f"{key}: no setting {part!r} in the params schema")
        typ = typing.get_type_hints(cls)[part]
    return typ


def type_name(typ: Any) -> str:
    if typ is type(None):
        return "null"
    if typ is Any:
        return "any"
    origin, args = get_origin(typ), get_args(typ)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is tuple:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"{{name: {type_name(args[1])}}}"
    if dataclasses.is_dataclass(typ):
        return "mapping"
    return getattr(typ, "__name__", str(typ))


def value_at(data: Any, key: str) -> tuple[bool, Any]:
    """(found, value) at dotted `key` of a loaded params file; a mapping's entries
    (ENTRY) are not one value, so not found."""
    node = data
    for part in key.split("."):
        if part == ENTRY or not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def show(value: Any) -> str:
    """A value as params.yaml writes it (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def value_text(data: dict[str, Any], s: Setting) -> str:
    found, value = value_at(data, s.key)
    if not found:
        return "-" if ENTRY in s.key else "(missing)"
    if get_origin(s.type) is dict and isinstance(value, dict):
        return ", ".join(map(str, value))  # the entry names; their settings follow
    if dataclass_of(s.type) is not None and isinstance(value, dict):
        return ""  # a section: its settings follow
    return show(value)


def render_text(params_file: Path, sections: list[str] | None = None) -> str:
    from distillflow.base.params import load_yaml

    data = load_yaml(params_file)
    lines = []
    for s in settings(sections):
        lines.append(f"{s.key} ({type_name(s.type)}) = {value_text(data, s)}".rstrip(" ="))
        lines.append(f"    {s.help or '(no help)'}")
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(params_file: Path, sections: list[str] | None = None) -> str:
    from distillflow.base.params import load_yaml

    data = load_yaml(params_file)
    out = [
        "# Params",
        "",
        f"<!-- Generated by `{COMMAND}` from params.yaml and the params dataclasses' field",
        "comments; edit those, not this file (tests/test_params_doc.py checks it is current). -->",
        "",
        f"Every setting of `{params_file.name}`: its type, its value there (the default run) and",
        "what it does. The help text is the comment on the setting's dataclass field; print it",
        "for any params file with `distillflow params [SECTION ...] [--params FILE]`.",
        f"`{ENTRY}` stands for each entry of a mapping (train.rounds, compare.runs).",
    ]
    for name in sections or list(SECTIONS):
        cls = SECTIONS[name]
        out += ["", f"## {name}", "", f"`{cls.__module__}.{cls.__qualname__}`", ""]
        out += ["| key | type | value | meaning |", "| --- | --- | --- | --- |"]
        for s in walk(cls, name):
            value = value_text(data, s)
            value = f"`{cell(value)}`" if value else ""
            out.append(f"| `{s.key}` | {cell(type_name(s.type))} | {value} | {cell(s.help)} |")
    return "\n".join(out) + "\n"
