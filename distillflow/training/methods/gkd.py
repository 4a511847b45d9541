"""gkd: generalized JSD(beta) on the student's response for a lambda share of pairs, on the
teacher's response for the others (GKD; TRL's beta convention)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.heads import Term
from distillflow.training.methods.method import Method, MicroBatch, Result


@dataclass(frozen=True)
class GKDParams:
    """params.yaml `train.gkd`."""

    beta: float  # JSD interpolation; 0 = forward KL, 1 = reverse KL (TRL's convention)
    lmbda: float  # fraction of pairs trained on the student's response

    def __post_init__(self) -> None:
        check(0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]")
        check(0.0 <= self.lmbda <= 1.0, "lmbda", "must be in [0, 1]")


def loss(x: MicroBatch, p: GKDParams) -> Result:
    """The share is drawn per pair of the global micro-batch from a generator seeded by
    (seed, step, micro-batch), so reruns, resumed runs and torchrun runs see the same
    mix. Both sides' terms are weighted by their share of the batch, so the total is a
    mean over all pairs (or all their tokens)."""
    at = x.at
    rng = random.Random((at.seed * 1_000_003 + at.step) * 1_009 + at.micro)
    draws = [rng.random() < p.lmbda for _ in range(at.global_size)]
    on_student = torch.tensor([draws[i] for i in at.positions], device=x.chosen.mask.device)
    teacher_side = replace(x.chosen, mask=x.chosen.mask & ~on_student[:, None])
    student_side = replace(x.rejected, mask=x.rejected.mask & on_student[:, None])
    if x.heads.reduction == "token_mean":
        n_t, n_s = float(teacher_side.mask.sum()), float(student_side.mask.sum())
    else:
        n_t, n_s = float(teacher_side.mask.any(1).sum()), float(student_side.mask.any(1).sum())
    n = max(n_t + n_s, 1.0)
    kw = {"beta": p.beta}
    total, (on_t, on_s) = x.heads.divergences(
        [
            Term(teacher_side, losses.generalized_jsd, n_t / n, kw),
            Term(student_side, losses.generalized_jsd, n_s / n, kw),
        ]
    )
    return total, {"jsd_teacher_data": on_t, "jsd_student_data": on_s, "student_fraction": n_s / n}


GKD = Method(
    name="gkd",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section="gkd",
    loss=loss,
)
