"""What a method is: one `Method` object that declares what the trainer must feed it
and its loss, and the loss's per-call input (`MicroBatch`).

A loss is `loss(x: MicroBatch, p) -> (scalar loss, numbers worth logging)`, where `p`
is the method's own params section (`train.<params_section>`, None without one). It
reads the sides it declared (`x.chosen`, `x.rejected`), evaluates divergences and
log-probs through `x.heads`, and only the methods with a schedule or a seeded draw read
`x.at`; DistiLLM-2 alone reads `x.curriculum`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from distillflow.training.methods.heads import Heads, Side

Tensor = torch.Tensor
Result = tuple[Tensor, dict[str, float]]  # the scalar loss and the numbers worth logging

# What a method reads of the teacher: nothing; its distributions and log-probs, from the
# model run alongside (train.teacher_signal: online) or the stored top-k (topk); or
# something only the model itself gives (online only).
TeacherNeed = Literal["none", "online_or_topk", "online"]


@dataclass(frozen=True, kw_only=True)
class Progress:
    """Where one micro-batch sits in training: what beta schedules and seeded draws read."""

    step: int  # optimizer step, 0 .. total_steps - 1
    total_steps: int
    micro: int  # index of this micro-batch within the optimizer step
    round_index: int  # on-policy round, 1 .. rounds
    rounds: int
    seed: int  # the round's seed (train_params.round_seed)
    positions: list[int]  # this process's pairs' positions in the global micro-batch
    global_size: int  # pairs in the global micro-batch (all ranks)


class Curriculum(Protocol):
    """Per-sequence state a run carries across batches, saves in its checkpoints and hands
    to the next round: DistiLLM-2's adaptive alpha (distillm2.AlphaCurriculum)."""

    def alphas(self, gap_t: Tensor, gap_s: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    """What a loss gets for one micro-batch of this process's pairs."""

    chosen: Side  # the teacher's responses y^t through the models
    rejected: Side  # the student's responses y^s
    heads: Heads
    at: Progress
    curriculum: Curriculum


@dataclass(frozen=True, kw_only=True)
class Method:
    """One distillation method: what the trainer feeds it, and its loss.

    A side it does not need reaches the loss empty (no forward pass); with needs_teacher
    "none" the teacher is never run and no stored signal is read. `reads`, when given,
    narrows the sides by the method's params (gkd at lmbda 0 never weighs the student's
    responses, so they are not run). `switches` are boolean fields of its params section
    that `compare.runs.<run>.disable` may turn off.
    """

    name: str
    needs_teacher: TeacherNeed
    needs_teacher_samples: bool  # reads x.chosen
    needs_student_samples: bool  # reads x.rejected
    params_section: str | None  # the train.<section> its loss gets as `p`; None: p is None
    loss: Callable[[MicroBatch, Any], Result]
    switches: tuple[str, ...] = ()
    reads: Callable[[Any], tuple[bool, bool]] | None = None  # (chosen, rejected) for these params

    def section(self, train: Any) -> Any:
        """Its params section of `train` (a TrainParams): train.<params_section>, or None."""
        return getattr(train, self.params_section) if self.params_section is not None else None

    def sides(self, p: Any) -> tuple[bool, bool]:
        """Whether the trainer runs (chosen, rejected) for params `p` (its params section)."""
        declared = (self.needs_teacher_samples, self.needs_student_samples)
        if self.reads is None:
            return declared
        narrowed = self.reads(p)
        assert any(narrowed) and all(d or not n for d, n in zip(declared, narrowed)), f"{self.name}: reads {narrowed}"
        return narrowed

    def __post_init__(self) -> None:
        assert self.needs_teacher_samples or self.needs_student_samples, f"{self.name} reads no response"
        assert not self.switches or self.params_section is not None, f"{self.name}: switches need a params section"
