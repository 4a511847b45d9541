"""The embedded default task: short instructions with verifiable answers.

Five skills, each a deterministic function of a `random.Random`:

    add      "Add 47 and 385."              -> "432"
    reverse  "Reverse the word qkdfa."      -> "afdkq"
    sort     "Sort the letters of qkdfa."   -> "adfkq"
    upper    "Write qkdfa in capitals."     -> "QKDFA"
    count    "Count the letter a in abaca." -> "3"

The default mix (params.yaml `task.skills`) leaves out `count`: measured here, a
2-layer, 64-wide Llama stays near 55% on it after 2,500 steps, while it learns the
other four to 88-100% in the same budget.

The generator is pure: the same `(config, seed, n)` always yields the same examples,
so bootstrap (which trains the teacher and student) and seed (which makes the
distillation prompts) can both draw from it, and `split_of` (a hash of the normalised
prompt) keeps the held-out prompts out of every training set by construction.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SKILLS: tuple[str, ...] = ("add", "reverse", "sort", "upper", "count")

# Two phrasings per skill: the model has to read the instruction, not a fixed prefix.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("Add {a} and {b}.", "What is {a} plus {b}?"),
    "reverse": ("Reverse the word {w}.", "Write {w} backwards."),
    "sort": ("Sort the letters of {w}.", "Put the letters of {w} in order."),
    "upper": ("Write {w} in capitals.", "Spell {w} in upper case."),
    "count": ("Count the letter {c} in {w}.", "How many {c} are in {w}?"),
}


@dataclass(frozen=True)
class ToyExample:
    """One task instance: the instruction, its ground-truth answer and its skill."""

    prompt: str
    answer: str
    skill: str


@dataclass(frozen=True, kw_only=True)
class ToyTaskConfig:
    """Difficulty knobs of the toy task (params.yaml `task`)."""

    skills: tuple[str, ...]
    max_digits: int  # operands of `add` have 1..max_digits digits
    min_len: int  # words of reverse/sort/count have min_len..max_len letters
    max_len: int
    alphabet: str  # letters words are drawn from


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


_MAKERS: dict[str, Callable[[random.Random, ToyTaskConfig], tuple[dict[str, str], str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
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
        template = rng.choice(_TEMPLATES[skill])
        yield ToyExample(prompt=template.format(**fields), answer=answer, skill=skill)
        i += 1


def is_correct(response: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace: the task's verifier."""
    return response.strip() == answer.strip()
