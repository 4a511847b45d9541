"""The embedded toy task: skills, prompts and verifiable answers (toytask, steps), its
prompt parser (parse), and `TASK`, what the registry (distillflow/tasks) hands out."""

from __future__ import annotations

from collections.abc import Iterator

from distillflow.base.config import TaskParams
from distillflow.tasks import ParsedPrompt
from distillflow.tasks.toy import parse, toytask


class ToyTask:
    name = "toy"
    categories = frozenset(toytask.SKILLS)

    def examples(self, params: TaskParams, seed: int) -> Iterator[toytask.ToyExample]:
        return toytask.examples(toytask.config_of(params), seed)

    def is_correct(self, response: str, reference: str, category: str | None) -> bool:
        return toytask.is_correct(response, reference, category)

    def step_score(self, response: str, reference: str, category: str | None) -> tuple[int, int] | None:
        return toytask.step_score(response, reference, category)

    def parse_prompt(self, text: str, params: TaskParams) -> ParsedPrompt | None:
        return parse.parse_prompt(text, params)


TASK = ToyTask()
