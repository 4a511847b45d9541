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
    mean over all pairs (or all their tokens). At lmbda 0 (1) no pair draws the student's
    (teacher's) response, which then is not run (`reads`) and has no term."""
    at = x.at
    rng = random.Random((at.seed * 1_000_003 + at.step) * 1_009 + at.micro)
    draws = [rng.random() < p.lmbda for _ in range(at.global_size)]
    device = (x.chosen if p.lmbda < 1.0 else x.rejected).mask.device
    on_student = torch.tensor([draws[i] for i in at.positions], device=device)
    sides = {}
    if p.lmbda < 1.0:
        sides["teacher"] = replace(x.chosen, mask=x.chosen.mask & ~on_student[:, None])
    if p.lmbda > 0.0:
        sides["student"] = replace(x.rejected, mask=x.rejected.mask & on_student[:, None])
    if x.heads.reduction == "token_mean":
        counts = {k: float(side.mask.sum()) for k, side in sides.items()}
    else:
        counts = {k: float(side.mask.any(1).sum()) for k, side in sides.items()}
    n = max(sum(counts.values()), 1.0)
    kw = {"beta": p.beta}
    total, parts = x.heads.divergences(
        [Term(side, losses.generalized_jsd, counts[k] / n, kw) for k, side in sides.items()]
    )
    got = dict(zip(sides, parts, strict=True))
    return total, {
        "jsd_teacher_data": got.get("teacher", 0.0),
        "jsd_student_data": got.get("student", 0.0),
        "student_fraction": counts.get("student", 0.0) / n,
    }


GKD = Method(
    name="gkd",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section="gkd",
    loss=loss,
    reads=lambda p: (p.lmbda < 1.0, p.lmbda > 0.0),
)
