"""Each params setting's help text, read from its dataclass field.

A params dataclass documents a field with a comment on the field's line (trailing) or
on the lines right above it; that text is the setting's one help text, printed by
`distillflow params` and rendered into docs/params.md (tests/test_params_doc.py keeps
the page in step). params.yaml carries values, not explanations.

    @dataclass(frozen=True, kw_only=True)
    class PairsParams:
        # one pair per (prompt, student sample): the teacher's first response is chosen
        pair_with: Literal["first_teacher"]
        max_pairs: int  # 0: no cap
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text (the comments on and directly above its line), for every
    field of the dataclass `cls` that has one."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef), cls
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if stmt.target.id not in names:
            continue
        above: list[str] = []
        n = stmt.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        after = [comments[k] for k in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if k in comments]
        text = " ".join(t for t in above + after if t)
        if text:
            out[stmt.target.id] = text
    return out
