"""The toy task's prompt parser: its phrasings as regexes, the answers from the parsed
fields, and whether the fields lie within the configured task (synthesis keeps a
teacher-written prompt only if it parses here)."""

from __future__ import annotations

import re
from collections.abc import Callable

from distillflow.base.config import TaskParams
from distillflow.tasks import ParsedPrompt
from distillflow.tasks.toy import toytask

_FIELD_PATTERNS = {
    "a": r"(?P<a>\d+)",
    "b": r"(?P<b>\d+)",
    "w": r"(?P<w>[a-z]+)",
    "c": r"(?P<c>[a-z])",
    "xs": r"(?P<xs>\d(?: \d)*)",
    "n": r"(?P<n>\d+)",
    "d": r"(?P<d>\d)",
    "m": r"(?P<m>\d+)",
    "s": r"(?P<s>\d)",
    "t": r"(?P<t>\d)",
}
_ANSWERS: dict[str, Callable[[dict[str, str]], str]] = {
    "add": lambda f: str(int(f["a"]) + int(f["b"])),
    "reverse": lambda f: f["w"][::-1],
    "sort": lambda f: "".join(sorted(f["w"])),
    "upper": lambda f: f["w"].upper(),
    "count": lambda f: str(f["w"].count(f["c"])),
    "minus": lambda f: str(int(f["n"]) - int(f["d"])),
    **{s: (lambda f, s=s: toytask.answer(s, f, None)) for s in ("countdown", "walk", "runsum", "addc", "perm")},
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in _FIELD_PATTERNS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


# toytask's phrasings, as regexes (toytask has no parser; its templates are the grammar)
_TOY_PATTERNS = [(skill, _template_regex(t)) for skill, ts in toytask.TEMPLATES.items() for t in ts]


def _fields_fit(skill: str, fields: dict[str, str], task: TaskParams) -> bool:
    """Within the configured task: operand digits, word lengths, the alphabet, runsum's
    and countdown's count of numbers, walk's span, addc's equal operand lengths, perm's
    distinct letters."""
    for name in ("a", "b", "n", "m"):
        if name in fields and str(int(fields[name])) != fields[name]:
            return False
    if skill == "minus":
        return 10 <= int(fields["n"]) <= 99 and 3 <= int(fields["d"]) <= 9
    if skill == "countdown":
        n, d, m = int(fields["n"]), int(fields["d"]), int(fields["m"])
        fit = 20 <= n <= 99 and 3 <= d <= 9 and (n - m) % d == 0
        return fit and task.min_terms <= (n - m) // d + 1 <= task.max_terms
    if skill == "walk":
        a, b, s, t = (int(fields[k]) for k in ("a", "b", "s", "t"))
        return 10 <= a and b <= 99 and task.min_span <= b - a <= task.max_span and (s, t) in toytask.WALK_STEPS
    if skill == "add" and any(len(fields[n]) > task.max_digits for n in ("a", "b")):
        return False
    if skill == "addc" and not (task.min_columns <= len(fields["a"]) == len(fields["b"]) <= task.max_columns):
        return False
    xs = fields.get("xs")
    if xs is not None and not (task.min_terms <= len(xs.split()) <= task.max_terms and "0" not in xs):
        return False
    w = fields.get("w")
    if w is not None and not (task.min_len <= len(w) <= task.max_len and set(w) <= set(task.alphabet)):
        return False
    if skill == "perm" and len(set(fields["w"])) != len(fields["w"]):
        return False
    return fields.get("c", task.alphabet[0]) in task.alphabet


def parse_prompt(text: str, task: TaskParams) -> ParsedPrompt | None:
    """(skill, reference answer, group) of a normalised toy-task prompt, the group as the
    generator gives it (toytask.group_of: the skill and its fields, whatever the
    phrasing); None if it is not one of the configured skills' phrasings with in-range
    fields."""
    for skill, pattern in _TOY_PATTERNS:
        m = pattern.fullmatch(text)
        if m is not None and skill in task.skills and _fields_fit(skill, m.groupdict(), task):
            fields = m.groupdict()
            return ParsedPrompt(skill, _ANSWERS[skill](fields), toytask.group_of(skill, fields))
    return None
