"""dpkd: -log sigmoid(beta_d [(lq(y_t) - lq(y_s)) - (lp(y_t) - lp(y_s))]), with lq, lp the
student's and the teacher's mean token log-prob of a response."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.method import Method, MicroBatch, Result


@dataclass(frozen=True)
class DPKDParams:
    """params.yaml `train.dpkd`."""

    beta_d: float  # scale of the preference margin inside -log sigmoid

    def __post_init__(self) -> None:
        check(self.beta_d > 0.0, "beta_d", "must be > 0")


def loss(x: MicroBatch, p: DPKDParams) -> Result:
    lq_t = x.heads.seq_logprob(x.chosen, teacher=False)
    lq_s = x.heads.seq_logprob(x.rejected, teacher=False)
    with torch.no_grad():
        lp_t = x.heads.seq_logprob(x.chosen, teacher=True)
        lp_s = x.heads.seq_logprob(x.rejected, teacher=True)
    total = losses.dpkd_loss(lq_t, lq_s, lp_t, lp_s, p.beta_d)
    return total, {"margin": float(((lq_t - lq_s) - (lp_t - lp_s)).mean().detach())}


DPKD = Method(
    name="dpkd",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section="dpkd",
    loss=loss,
)
