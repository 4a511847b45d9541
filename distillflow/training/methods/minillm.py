"""minillm: MiniLLM's policy-gradient reverse KL (Gu et al., 2024), on responses the
trainer samples from the teacher-mixed distribution p~ = a p + (1 - a) q (`train.online`
with `train.minillm.teacher_mix` a).

Per sampled token y_t, with the reward r_t = log p(y_t) - log q(y_t) and the importance
weight w_t = q(y_t) / p~(y_t) (the paper's single-step approximation of the prefix ratio;
p~ is the sampler's stored log-prob, `Side.behaviour`), both detached:

    single step:  w_t * KL(q(.|y<t) || p(.|y<t))            exact over the vocabulary
    long term:    -w_t * R_{t+1} * log q(y_t),   R_{t+1} = mean of r_s over s > t

(the long-term reward length-normalised, as the paper's R^Norm), summed over each
response's tokens and averaged over responses, whatever `train.reduction` says (as
opd's). At a = 0 the weights are 1 (up to float rounding, dropout and autocast between
the sampler and the training forward) and, without the normalisation, the expected
gradient is the sequence-level reverse-KL gradient: tests/test_onpolicy.py checks that
by enumeration. Not included: the paper's PPO ratio clipping and its pre-training
language-modelling loss L_PT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.method import Method, MicroBatch, Result


@dataclass(frozen=True)
class MiniLLMParams:
    """params.yaml `train.minillm`."""

    teacher_mix: float  # a: the teacher's share of the sampling distribution (the paper: 0.2)
    length_norm: bool  # the long-term reward as a mean over the remaining tokens (the paper's R^Norm)

    def __post_init__(self) -> None:
        check(0.0 <= self.teacher_mix < 1.0, "teacher_mix", "must be in [0, 1)")


def loss(x: MicroBatch, p: MiniLLMParams) -> Result:
    side, heads = x.rejected, x.heads
    if side.behaviour is None:
        raise ValueError("minillm trains on responses the trainer sampled itself: set train.online.every > 0")
    lq, seq = heads.token_logprobs(side, teacher=False)
    if lq.shape[0] == 0:
        return side.s_hidden.sum() * 0.0, {"reverse_kl": 0.0, "weight": 0.0}
    n_seqs = side.mask.shape[0]
    with torch.no_grad():
        lp, _ = heads.token_logprobs(side, teacher=True)
        reward = lp.float() - lq.detach().float()
        weight = torch.exp(lq.detach().float() - side.behaviour[side.mask].float())
        if p.length_norm:
            future = losses.returns_to_go(reward, seq, n_seqs, 1.0, future_mean=True)
        else:
            future = losses.returns_to_go(reward, seq, n_seqs, 1.0) - reward
    step_kl = heads.token_reverse_kl(side)
    per_token = weight * step_kl - weight * future * lq
    total = losses.reduce_tokens(per_token, seq, n_seqs, "sequence_sum")  # as opd's: a sum per response
    return total, {
        "reverse_kl": float(losses.reduce_tokens(step_kl.detach(), seq, n_seqs, "sequence_sum")),
        "weight": float(weight.mean()),
    }


MINILLM = Method(
    name="minillm",
    needs_teacher="online",
    needs_teacher_samples=False,
    needs_student_samples=True,
    params_section="minillm",
    loss=loss,
)
