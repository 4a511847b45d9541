"""Several teachers (params.yaml `models.teachers`, `models.routing`).

`models.teachers` is a weighted list; its first entry is `models.teacher` (the teacher
evaluation reports against and synthesis writes with). An empty list is the single
teacher, weight 1, and `models.teacher` keeps its meaning; a params file from before these
keys needs `teachers: []` and `routing: mix` added under `models` (the loader names the
missing key).

    teachers = teacher_set(used["models.teacher"], used["models.teachers"], used["models.routing"])
    teachers.routed(prompt_id, category)   # the index of the teacher a prompt is routed to

Three ways to combine them, each a pure function of the prompt (its id and category)
and the weights, so every stage (teacher generation, pairs, score) agrees without
passing state:
- `mix`: every teacher samples every prompt, and the target of the logit-level losses
  is the weighted mixture p(y) = sum_k w_k p_k(y) (the score stage stores its top-k);
- `route`: each prompt goes to one teacher, drawn with probability w_k by a hash of its
  prompt id; only that teacher samples it, and its pairs are distilled from that
  teacher alone (the pair's `teacher` column);
- `category`: routed by the data: a prompt whose `category` column is a teacher's label
  goes to that teacher (teachers labelled by the domain they know); any other prompt
  is routed by the hash, as under route.
In all, the first pair of a prompt takes the routed teacher's response, so with one
pair per prompt the chosen responses are samples of the weighted mixture.

Toy teachers past the first are trained by bootstrap into `teacher-<label>` folders
(a seed of their own); a local folder or hub id is used as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from distillflow.base.errors import ParamsError
from distillflow.base.identity import ModelRef
from distillflow.base.records import content_id

Routing = Literal["mix", "route", "category"]
LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class TeacherParams:
    """One entry of params.yaml `models.teachers`."""

    label: str  # the teacher's name in records (generations' and pairs' `teacher` column) and folders
    name: str  # toy (trained by bootstrap) | a local folder | a hub id
    revision: str | None  # hub revision of a hub id; null for toy or a folder
    weight: float  # its share: of the mixture (mix) or of the prompts routed to it (route); > 0


@dataclass(frozen=True)
class Teacher:
    label: str
    ref: ModelRef
    weight: float  # normalised: the weights sum to 1
    role: str  # its folder under bootstrap's output: "teacher" for the first, else "teacher-<label>"


@dataclass(frozen=True)
class TeacherSet:
    teachers: tuple[Teacher, ...]
    routing: Routing

    @property
    def several(self) -> bool:
        return len(self.teachers) > 1

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.teachers]

    def index(self, label: str) -> int:
        for i, t in enumerate(self.teachers):
            if t.label == label:
                return i
        raise ParamsError(f"models.teachers: no teacher labelled {label!r} (labels: {self.labels})")

    def routed(self, prompt_id: str, category: str | None) -> int:
        """The teacher prompt `prompt_id` (of `category`) is routed to: under `category`
        routing the teacher labelled with its category, if one is; else teacher k with
        probability w_k, by a hash of the id (the same on every machine and in every
        stage)."""
        if self.routing == "category" and category in self.labels:
            return self.labels.index(category)
        u = int(content_id("teacher-route", prompt_id)[:13], 16) / 16**13
        total = 0.0
        for i, t in enumerate(self.teachers):
            total += t.weight
            if u < total:
                return i
        return len(self.teachers) - 1  # u < 1 = the sum, up to rounding

    def samples(self, i: int, prompt_id: str, category: str | None) -> bool:
        """Whether teacher `i` samples prompt `prompt_id`: all prompts under mix, its
        routed ones under route and category."""
        return self.routing == "mix" or self.routed(prompt_id, category) == i

    def seed(self, i: int, seed: int) -> int:
        """The sampling seed of teacher `i`: `seed` for the first, a 31-bit hash of it and
        the label for the others, so no two teachers draw the same random stream."""
        if i == 0:
            return seed
        return int(content_id("teacher-seed", str(seed), self.teachers[i].label)[:8], 16) & 0x7FFFFFFF

    def rank(self, label: str | None, prompt_id: str, category: str | None) -> int:
        """The order of teacher `label`'s responses among a prompt's (pairs): the routed
        teacher first, then the others cyclically after it in list order (routed to b of
        a, b, c: b, c, a). 0 for a single teacher's (None)."""
        if label is None:
            return 0
        return (self.index(label) - self.routed(prompt_id, category)) % len(self.teachers)


def teacher_set(teacher: ModelRef, entries: tuple[TeacherParams, ...], routing: str) -> TeacherSet:
    """The teachers of `models.teacher` (its ref), `models.teachers` and `models.routing`,
    checked: refusals name the key."""
    if routing not in ("mix", "route", "category"):
        raise ParamsError(f"models.routing: must be mix, route or category, got {routing!r}")
    if not entries:
        return TeacherSet((Teacher("teacher", teacher, 1.0, "teacher"),), "mix")
    labels = [e.label for e in entries]
    for i, e in enumerate(entries):
        key = f"models.teachers[{i}]"
        if not LABEL.match(e.label):
            raise ParamsError(f"{key}.label: {e.label!r} must match {LABEL.pattern} (it names folders and records)")
        if not (math.isfinite(e.weight) and e.weight > 0):
            raise ParamsError(f"{key}.weight: must be a finite number > 0, got {e.weight}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ParamsError(f"models.teachers: labels must be unique, {dup} repeat")
    first = entries[0]
    if (first.name, first.revision) != (teacher.name, teacher.revision):
        raise ParamsError(
            f"models.teachers[0]: must be models.teacher ({teacher.name!r} at {teacher.revision!r}), the teacher "
            f"evaluation and synthesis use; got {first.name!r} at {first.revision!r}"
        )
    total = sum(e.weight for e in entries)
    return TeacherSet(
        tuple(
            Teacher(
                e.label, ModelRef(e.name, e.revision), e.weight / total, "teacher" if i == 0 else f"teacher-{e.label}"
            )
            for i, e in enumerate(entries)
        ),
        routing,  # type: ignore[arg-type]
    )
