"""Strict params loading: params.yaml sections into frozen dataclasses.

Each stage declares the params.yaml keys it reads (`PARAMS` in its module, the same
list as its `params:` in dvc.yaml; a test checks they agree) and parses them into
dataclasses. An unknown key, a missing key, a wrong type or an out-of-range value
raises ParamsError (a ValueError) naming the full key, so a typo never silently falls back to a
default: there are no defaults here, params.yaml is the only source of behaviour.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from distillflow.base.errors import ParamsError

T = TypeVar("T")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def select(data: dict[str, Any], key: str, source: str) -> Any:
    """The value at dotted `key` (e.g. "models.teacher") in `data`."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"{source}: missing key {key!r}")
        node = node[part]
    return node


def _convert(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if typ is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(typ)
        if value is None:
            if type(None) in options:
                return None
            raise ParamsError(f"{key}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ParamsError("; ".join(errors))
    if origin is Literal:
        if value not in get_args(typ):
            raise ParamsError(f"{key}: {value!r} is not one of {list(get_args(typ))}")
        return value
    if origin is tuple:
        (inner, _ellipsis) = get_args(typ)
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__}")
        _k, inner = get_args(typ)
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            # YAML reads `2:` as an integer key, and DVC's foreach silently skips
            # integer keys (measured, dvc 3.x): no stages, no error. Refuse them here.
            raise ParamsError(
                f'{key}: keys must be strings, got {type(bad[0]).__name__} {bad[0]!r}; quote them ("{bad[0]}": ...)'
            )
        return {k: _convert(v, inner, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(typ):
        return build(typ, value, key)
    if typ is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: params field type {typ!r} is not supported by the loader")


def build(cls: type[T], data: Any, key: str) -> T:
    """Build dataclass `cls` from mapping `data`, checking every key and type.

    After construction, a dataclass's `__post_init__` may raise ValueError for
    out-of-range values; the message is prefixed with `key`.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{key}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ParamsError(f"{key}: unknown key(s) {[f'{key}.{u}' for u in unknown]}; allowed: {names}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ParamsError(f"{key}: missing key(s) {[f'{key}.{m}' for m in missing]}")
    kwargs = {n: _convert(data[n], hints[n], f"{key}.{n}") for n in names}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ParamsError(f"{key}: {exc}") from exc


def check(condition: bool, field: str, message: str) -> None:
    """For `__post_init__`: raise ParamsError naming `field` when `condition` fails."""
    if not condition:
        raise ParamsError(f"{field}: {message}")


def load(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The raw values of `keys` from a params file, each checked to exist."""
    data = load_yaml(path)
    return {k: select(data, k, str(path)) for k in keys}


def load_sections(path: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """Load each (dotted) key in `sections` and convert it to its type.

    Types are dataclasses (built strictly, see `build`) or plain annotations
    (`bool`, `Literal[...]`, ...). The keys are the stage's `PARAMS`, the same list
    dvc.yaml tracks for it.
    """
    raw = load(path, tuple(sections))
    try:
        return {key: _convert(raw[key], typ, key) for key, typ in sections.items()}
    except ValueError as exc:
        raise ParamsError(f"{path}: {exc}") from exc
