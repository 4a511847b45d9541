"""Tasks: the interface every task implements and the registry that names them.

A task owns prompts with verifiable answers: it makes examples, checks a response,
scores its steps and recognises its own prompts (synthesis keeps a teacher-written
prompt only if its task can parse and answer it). Generic code (sources, synthesis,
curation, evaluation) reaches a task only through this module, so a task's code is
loaded, and becomes part of a stage's recorded code, only when the run uses it: a
real-model run on a dataset without references never loads the toy task.

    task = tasks.get("toy")                 # the task a `seed.source.kind` names
    tasks.is_correct(response, reference, "walk")   # by the task that owns "walk"

Adding a task: a package under distillflow/tasks/ whose `__init__` defines `TASK`, and
its name in REGISTRY.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from distillflow.base.config import TaskParams


@dataclass(frozen=True)
class Example:
    """One task instance: the instruction, its ground-truth answer, its category (skill)
    and its group: the instance's key, the same for every phrasing of it (the split key,
    records.split_key, so no instance has prompts in two splits)."""

    prompt: str
    answer: str
    skill: str
    group: str


class ParsedPrompt(NamedTuple):
    """What a task reads from one of its prompts."""

    category: str
    reference: str  # the ground-truth answer
    group: str  # the instance's key, as the task's examples give it (Example.group)


class Task(Protocol):
    name: str
    categories: frozenset[str]  # the `category` values of its records (the toy task: its skills)

    def examples(self, params: TaskParams, seed: int) -> Iterator[Example]:
        """An endless, deterministic stream of instances of the configured task."""
        ...

    def is_correct(self, response: str, reference: str, category: str | None) -> bool:
        """Whether a response answers the instance; never raises."""
        ...

    def step_score(self, response: str, reference: str, category: str | None) -> tuple[int, int] | None:
        """(right steps, steps) of a stepwise response; None for a category without steps."""
        ...

    def parse_prompt(self, text: str, params: TaskParams) -> ParsedPrompt | None:
        """(category, reference answer, group) of one of this task's normalised prompts
        within the configured params; None if the text is not one."""
        ...


# name -> module whose TASK implements it; a name is also a `seed.source.kind`
REGISTRY: dict[str, str] = {"toy": "distillflow.tasks.toy"}


def get(name: str) -> Task:
    if name not in REGISTRY:
        raise KeyError(f"no task named {name!r}; known: {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).TASK


def owner(category: str | None) -> Task | None:
    """The registered task whose records carry `category`, or None. No category (a
    dataset's record) loads no task."""
    if category is None:
        return None
    for name in REGISTRY:
        task = get(name)
        if category in task.categories:
            return task
    return None


def is_correct(response: str, reference: str, category: str | None) -> bool:
    """Whether a response answers a reference: by the task that owns the category; a
    reference no task owns (another source's) wants exact match after stripping
    surrounding whitespace. Never raises on an unparseable response: it is wrong."""
    task = owner(category)
    return task.is_correct(response, reference, category) if task else response.strip() == reference.strip()


def step_score(response: str, reference: str, category: str | None) -> tuple[int, int] | None:
    """(right steps, steps) by the owning task; None where no task owns the category."""
    task = owner(category)
    return task.step_score(response, reference, category) if task else None
