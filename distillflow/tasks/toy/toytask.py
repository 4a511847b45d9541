"""The embedded task: instructions with verifiable answers.

Eleven skills, each a deterministic function of a `random.Random`. The step skills
(distillflow/tasks/toy/steps.py: responses of dependent steps, a rule for the next step
after any written prefix, a verifier) and the control; params.yaml `task.skills`
picks the mix (the default: countdown, walk, minus):

    countdown "Count down from 46 by 9."             -> "46 37 28 19 10 1"
    walk      "Walk from 13 to 20 by 1 or 2."        -> "13 14 16 17 19 20" (any such walk passes)
    runsum    "Running sum of 3 8 1 4 9 2."          -> "3 11 12 16 25 27"
    addc      "Add 472 and 385 column by column."    -> "7c0 5c1 8c0 = 857"
    perm      "List each letter of cadbe once."      -> "c a d b e" (any order passes)
    minus     "Subtract 7 from 38."                  -> "31" (the short control: one countdown step)

The short-answer skills of the first toy task stay for fast tests (profiles/smoke.yaml):

    add      "Add 47 and 385."              -> "432"
    reverse  "Reverse the word qkdfa."      -> "afdkq"
    sort     "Sort the letters of qkdfa."   -> "adfkq"
    upper    "Write qkdfa in capitals."     -> "QKDFA"
    count    "Count the letter a in abaca." -> "3"

The generator is pure: the same `(config, seed, n)` always yields the same examples,
so bootstrap (which trains the teacher and student) and seed (which makes the
distillation prompts) can both draw from it. Each example carries its group, the
instance (`group_of`: the skill and its fields, e.g. `minus:d=7,n=38`), the same for
every phrasing of it; the split is a hash of the group (records.split_key, split_of),
so the held-out instances, in any phrasing, stay out of every training set by
construction.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from distillflow.base.config import TaskParams
from distillflow.base.params import check
from distillflow.tasks.toy import steps

SKILLS: tuple[str, ...] = ("add", "reverse", "sort", "upper", "count", "minus", *steps.STEP_SKILLS)

# Two phrasings per skill: the model has to read the instruction, not a fixed prefix.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("Add {a} and {b}.", "What is {a} plus {b}?"),
    "reverse": ("Reverse the word {w}.", "Write {w} backwards."),
    "sort": ("Sort the letters of {w}.", "Put the letters of {w} in order."),
    "upper": ("Write {w} in capitals.", "Spell {w} in upper case."),
    "count": ("Count the letter {c} in {w}.", "How many {c} are in {w}?"),
    "minus": ("Subtract {d} from {n}.", "What is {n} minus {d}?", "Take {d} away from {n}."),
    "countdown": ("Count down from {n} by {d} to {m}.", "From {n}, count down by {d} to {m}."),
    "walk": ("Walk from {a} to {b} by {s} or {t}.", "From {a} to {b} in steps of {s} or {t}."),
    "runsum": ("Running sum of {xs}.", "Write the running totals of {xs}."),
    "addc": ("Add {a} and {b} column by column.", "Sum {a} and {b} digit by digit."),
    "perm": ("List each letter of {w} once.", "Write the letters of {w} in any order."),
}


@dataclass(frozen=True)
class ToyExample:
    """One task instance: the instruction, its ground-truth answer, its skill and its
    group (`group_of`: the instance, whatever the phrasing)."""

    prompt: str
    answer: str
    skill: str
    group: str


def group_of(skill: str, fields: dict[str, str]) -> str:
    """The instance's key: the skill and its fields, names sorted (`minus:d=7,n=38`).
    Every phrasing of an instance has the same key; walk's and perm's answers are a
    random choice, not part of it. Fields hold digits, spaces and letters only, so the
    key is unambiguous."""
    return f"{skill}:" + ",".join(f"{k}={fields[k]}" for k in sorted(fields))


@dataclass(frozen=True, kw_only=True)
class ToyTaskConfig:
    """Difficulty knobs of the toy task (params.yaml `task`)."""

    skills: tuple[str, ...]
    max_digits: int  # operands of `add` have 1..max_digits digits
    min_len: int  # words of reverse/sort/upper/count/perm have min_len..max_len letters (perm: distinct)
    max_len: int
    alphabet: str  # letters words are drawn from
    min_terms: int  # countdown writes, runsum adds, min_terms..max_terms numbers
    max_terms: int
    min_span: int  # walk goes up min_span..max_span from its start
    max_span: int
    min_columns: int  # addc's two operands have min_columns..max_columns digits each
    max_columns: int


def config_of(task: TaskParams) -> ToyTaskConfig:
    """The generator's config from params.yaml `task`; refuses a skill it does not know."""
    for sk in task.skills:  # checked here, not when params load: only a run on this task reads them
        check(sk in SKILLS, "task: skills", f"unknown skill {sk!r}; known: {list(SKILLS)}")
    return ToyTaskConfig(
        skills=task.skills,
        max_digits=task.max_digits,
        min_len=task.min_len,
        max_len=task.max_len,
        alphabet=task.alphabet,
        min_terms=task.min_terms,
        max_terms=task.max_terms,
        min_span=task.min_span,
        max_span=task.max_span,
        min_columns=task.min_columns,
        max_columns=task.max_columns,
    )


def _word(rng: random.Random, cfg: ToyTaskConfig) -> str:
    n = rng.randint(cfg.min_len, cfg.max_len)
    return "".join(rng.choice(cfg.alphabet) for _ in range(n))


def _add(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    a = rng.randint(0, 10 ** rng.randint(1, cfg.max_digits) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, cfg.max_digits) - 1)
    return {"a": str(a), "b": str(b)}, str(a + b)


def _reverse(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    w = _word(rng, cfg)
    return {"w": w}, w[::-1]


def _sort(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    w = _word(rng, cfg)
    return {"w": w}, "".join(sorted(w))


def _upper(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    w = _word(rng, cfg)
    return {"w": w}, w.upper()


def _count(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    w = _word(rng, cfg)
    # Ask for a letter that is present half of the time, so "0" is not the easy answer.
    c = rng.choice(w) if rng.random() < 0.5 else rng.choice(cfg.alphabet)
    return {"c": c, "w": w}, str(w.count(c))


def _minus(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    """One step of countdown, alone: the control with no step to compound."""
    n, d = rng.randint(10, 99), rng.randint(3, 9)
    return {"n": str(n), "d": str(d)}, str(n - d)


def _countdown(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    """From a two-digit start down by 3-9, min_terms..max_terms numbers, the last the floor."""
    d, k = rng.randint(3, 9), rng.randint(cfg.min_terms, cfg.max_terms)
    n = rng.randint(max(20, d * (k - 1)), 99)
    fields = {"n": str(n), "d": str(d), "m": str(n - d * (k - 1))}
    return fields, answer("countdown", fields, rng)


WALK_STEPS = ((1, 2), (1, 3))


def _walk(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    """From a two-digit start up min_span..max_span (goal <= 99) by two step sizes; the
    answer is a uniform walk that uses both (so its differences name them)."""
    s, t = rng.choice(WALK_STEPS)
    span = rng.randint(cfg.min_span, cfg.max_span)
    a = rng.randint(10, 99 - span)
    fields = {"a": str(a), "b": str(a + span), "s": str(s), "t": str(t)}
    return fields, answer("walk", fields, rng)


def _runsum(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    xs = [rng.randint(1, 9) for _ in range(rng.randint(cfg.min_terms, cfg.max_terms))]
    return {"xs": " ".join(map(str, xs))}, answer("runsum", {"xs": " ".join(map(str, xs))}, rng)


def _addc(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    n = rng.randint(cfg.min_columns, cfg.max_columns)
    fields = {k: str(rng.randint(10 ** (n - 1), 10**n - 1)) for k in ("a", "b")}
    return fields, answer("addc", fields, rng)


def _perm(rng: random.Random, cfg: ToyTaskConfig) -> tuple[dict[str, str], str]:
    n = rng.randint(cfg.min_len, min(cfg.max_len, len(cfg.alphabet)))
    fields = {"w": "".join(rng.sample(cfg.alphabet, n))}
    return fields, answer("perm", fields, rng)


def answer(skill: str, fields: dict[str, str], rng: random.Random | None) -> str:
    """A step skill's right answer from its prompt fields (perm, walk: a uniform choice
    given `rng`; without one, the word's own order and a fixed walk)."""
    if skill == "countdown":
        inst = steps.Instance(skill, values=(int(fields["n"]), int(fields["d"]), int(fields["m"])))
    elif skill == "walk":  # a uniform choice of step at each point given `rng`, until both sizes are used
        inst = steps.Instance(skill, values=tuple(int(fields[k]) for k in ("a", "b", "s", "t")))
        walk_rng = rng or random.Random(0)
        while True:
            walk = steps.rollout(inst, [], walk_rng)
            if len({int(y) - int(x) for x, y in zip(walk, walk[1:])}) == 2:
                return steps.join_steps(skill, walk)
    elif skill == "runsum":
        inst = steps.Instance(skill, values=tuple(int(x) for x in fields["xs"].split()))
    elif skill == "addc":
        a, b = fields["a"], fields["b"]
        inst = steps.Instance(skill, values=tuple(int(x) + int(y) for x, y in zip(reversed(a), reversed(b))))
    elif skill == "perm":
        if rng is None:
            return steps.join_steps(skill, list(fields["w"]))
        inst = steps.Instance(skill, letters=fields["w"])
    else:
        raise ValueError(f"not a step skill: {skill!r}")
    return steps.join_steps(skill, steps.rollout(inst, [], rng or random.Random(0)))


_MAKERS: dict[str, Callable[[random.Random, ToyTaskConfig], tuple[dict[str, str], str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
    "minus": _minus,
    "countdown": _countdown,
    "walk": _walk,
    "runsum": _runsum,
    "addc": _addc,
    "perm": _perm,
}


def examples(cfg: ToyTaskConfig, seed: int) -> Iterator[ToyExample]:
    """Yield an endless, deterministic stream of examples, skills in round robin.

    Round robin (rather than a random skill per example) keeps the skill mix exact
    in every prefix of the stream, so small smoke runs still see every skill.
    """
    rng = random.Random(seed)
    i = 0
    while True:
        skill = cfg.skills[i % len(cfg.skills)]
        fields, answer = _MAKERS[skill](rng, cfg)
        template = rng.choice(TEMPLATES[skill])
        yield ToyExample(prompt=template.format(**fields), answer=answer, skill=skill, group=group_of(skill, fields))
        i += 1


def is_correct(response: str, answer: str, skill: str | None) -> bool:
    """The task's verifier: perm accepts any order of its letters (steps.verify); every
    other skill, and a reference of another source, wants exact match after stripping
    surrounding whitespace. Never raises on an unparseable response: it is wrong."""
    if skill in steps.SEPARATOR:
        return steps.verify(response, answer, skill)
    return response.strip() == answer.strip()


def step_score(response: str, answer: str, skill: str | None) -> tuple[int, int] | None:
    """(right steps, steps) of a step-skill response (steps.step_score); None for the
    short-answer skills, whose answers are one step."""
    return steps.step_score(response, answer, skill) if skill in steps.SEPARATOR else None
