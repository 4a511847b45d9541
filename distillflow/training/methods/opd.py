"""opd: on-policy distillation, reverse KL estimated on the student's own samples. On each
token y_t of a student response, the cost c_t = log q(y_t) - log p(y_t) (student q,
teacher p, both detached) weights the student's score: loss = sum_t G_t log q(y_t), with
G_t = sum_{s >= t} discount^(s - t) c_s. Only the teacher's log-prob of each sampled token
is read, so the teacher can be the stored top-k's target log-probs (the score stage) as
well as the model run alongside.

The loss is a sum over each response's tokens and a mean over responses, whatever
`train.reduction` says: dividing by a response's own length, which depends on the
sampled tokens, would bias the gradient. In expectation over y ~ q (responses ending at
their stop token or at the length limit) the gradient is the exact gradient of the per-step reverse KL,
sum_t E_{y<t}[KL(q(.|y<t) || p(.|y<t))] with the prefixes' distribution held fixed, at
discount 0 (the usual on-policy distillation advantage), and of the sequence-level
KL(q || p) at discount 1 (the REINFORCE reward-to-go); tests/test_onpolicy.py checks both
by enumerating every sequence of a tiny vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.method import Method, MicroBatch, Result


@dataclass(frozen=True)
class OPDParams:
    """params.yaml `train.opd`."""

    discount: float  # 0: per-token advantage (reverse KL per step); 1: reward-to-go (sequence reverse KL)

    def __post_init__(self) -> None:
        check(0.0 <= self.discount <= 1.0, "discount", "must be in [0, 1]")


def loss(x: MicroBatch, p: OPDParams) -> Result:
    side = x.rejected
    lq, seq = x.heads.token_logprobs(side, teacher=False)
    with torch.no_grad():
        lp, _ = x.heads.token_logprobs(side, teacher=True)
        cost = lq.detach().float() - lp.float()  # per-token log q/p: its mean estimates the reverse KL
        to_go = losses.returns_to_go(cost, seq, side.mask.shape[0], p.discount)
    if lq.shape[0] == 0:
        return side.s_hidden.sum() * 0.0, {"reverse_kl": 0.0}
    # a sum per response (not a mean: a response's length depends on what was sampled), a mean over responses
    total = losses.reduce_tokens(to_go * lq, seq, side.mask.shape[0], "sequence_sum")
    return total, {"reverse_kl": float(losses.reduce_tokens(cost, seq, side.mask.shape[0], "sequence_sum"))}


OPD = Method(
    name="opd",
    needs_teacher="online_or_topk",
    needs_teacher_samples=False,
    needs_student_samples=True,
    params_section="opd",
    loss=loss,
)
