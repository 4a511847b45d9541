"""The offline teacher signal: student and teacher distributions over the teacher's top-k.

methods.heads.Heads uses :func:`topk_buckets` when the teacher is only known through its
stored top-k log-probs (stages/score.py); tests/test_losses_topk.py measures how far
the bucketed divergences are from the full ones.
"""

from __future__ import annotations

import math

import torch

from distillflow.training.losses.divergences import log_probs

Tensor = torch.Tensor

# Log-probability floor for an empty tail bucket (top-k covering the whole vocabulary):
# exp(-60) ~ 1e-26 keeps 0 * log 0 terms finite and changes no divergence measurably.
TAIL_FLOOR = -60.0


def _tail_logprob(logprobs: Tensor) -> Tensor:
    """log(1 - sum exp(logprobs)) over the last dim, floored at TAIL_FLOOR."""
    covered = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)  # log of the top-k mass
    # log(1 - e^c) computed stably as log(-expm1(c)). The floor is applied before the
    # log, so an empty tail (c = 0) gets a finite value and a zero, not NaN, gradient.
    tail = (-torch.expm1(covered)).clamp(min=math.exp(TAIL_FLOOR))
    return torch.log(tail)


def topk_buckets(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Student and teacher distributions over the teacher's top-k tokens plus one tail bucket.

    For an offline teacher signal (only the teacher's k most likely tokens and their
    log-probs stored per position), both distributions are coarsened to the same k + 1
    outcomes: the teacher's top-k tokens, and "any other token". Each returned tensor
    holds normalised log-probabilities, so any divergence in this module can take
    them in place of logits (log_softmax leaves them unchanged). By the data
    processing inequality the bucketed divergence never exceeds the full one; the gap
    shrinks as k grows and vanishes when the top-k hold all of both distributions'
    mass (tests/test_losses_topk.py measures it).

    Args:
        student_logits: ``(N, V)`` full-vocabulary student logits (gradients flow).
        teacher_ids: ``(N, k)`` int64 token ids of the teacher's top-k.
        teacher_logprobs: ``(N, k)`` the teacher's log-probs of those tokens.

    Returns:
        ``(student (N, k + 1), teacher (N, k + 1))`` log-probabilities, float32.
    """
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.ndim != 2:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} "
            "must both be (N, k)"
        )
    if student_logits.ndim != 2 or student_logits.shape[0] != teacher_ids.shape[0]:
        raise ValueError(
            f"student_logits must be (N, V) with N = {teacher_ids.shape[0]}, got {tuple(student_logits.shape)}"
        )
    log_q = log_probs(student_logits)  # (N, V)
    q_top = log_q.gather(-1, teacher_ids)  # (N, k)
    p_top = teacher_logprobs.detach().to(log_q.dtype)
    student = torch.cat([q_top, _tail_logprob(q_top)[:, None]], dim=-1)
    teacher = torch.cat([p_top, _tail_logprob(p_top)[:, None]], dim=-1)
    return student, teacher
