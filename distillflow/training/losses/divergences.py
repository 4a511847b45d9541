"""The divergences between student and teacher next-token distributions, from full logits.

Notation: p = teacher next-token distribution, q = student distribution, both the
softmax of logits over the full vocabulary (docs/METHOD.md). Every divergence has one
calling convention::

    fn(student_logits, teacher_logits, mask, [alpha | beta], *,
       reduction="token_mean", chunk_size=1024) -> scalar tensor

* logits ``(B, T, V)`` or ``(N, V)``; the caller has already done the next-token
  shift, so position ``t`` of both tensors describes the same target token.
* mask ``(B, T)`` / ``(N,)`` bool, True = the position counts (response tokens);
  ``None`` means every position counts.
* reduction ``"token_mean"``: mean over every masked-in token of the batch;
  ``"sequence_mean"``: mean over the tokens of each sequence, then mean over the
  sequences that have at least one token (3-D input only); ``"none"``: the
  per-token values ``(n,)`` of the masked-in positions in row-major order (used by
  the fused head path, handy for logging).
* No masked-in token gives ``0.0`` (still attached to ``student_logits``), never NaN.

Numerics: the math runs in float32 whatever the input dtype (bf16/fp16 are upcast
inside each chunk, float64 stays float64 so tests can check gradients tightly);
everything is built from ``log_softmax``, and mixtures are formed in log space (the
logaddexp identity, see :func:`_log_mixture_ratio`) -- adding probabilities and taking
a log underflows where both are tiny. The teacher is a constant target: its logits are
detached, gradients flow into q only.

Memory: the positions are processed ``chunk_size`` at a time under activation
checkpointing (chunks.run_masked_chunks), each chunk cut to its masked-in rows inside
the chunk, so the working memory is a few ``(chunk, V)`` buffers; no ``(n, V)`` copy of
the masked-in rows is made. Pick ``chunk_size`` so that ``chunk_size * V`` floats is a
comfortable buffer (e.g. 128 at V = 32k on CPU). fused.py goes further: from final
hidden states and LM heads, no ``(N, V)`` logits ever exist.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from distillflow.training.losses.checks import (
    check_chunk_size,
    check_logits,
    check_mask,
    check_reduction,
    check_unit_interval,
    coefficient_rows,
    compute_dtype,
)
from distillflow.training.losses.chunks import (
    DEFAULT_CHUNK_SIZE,
    mask_rows,
    reduce_tokens,
    run_masked_chunks,
    sequence_ids,
)

Tensor = torch.Tensor

# A row kernel maps student/teacher logits (n, V) and an optional per-row
# coefficient (n, 1) or 0-dim tensor to per-token divergences (n,).
RowKernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def log_probs(logits: Tensor) -> Tensor:
    # dtype= upcasts inside the kernel, so a bf16 (n, V) never has a float32 twin.
    return F.log_softmax(logits, dim=-1, dtype=compute_dtype(logits))


def zero_loss(student: Tensor) -> Tensor:
    # Stays in the autograd graph so `loss.backward()` works on empty batches
    # (+ 0.0 turns the -0.0 of a negative sum into 0.0).
    return student.sum().to(compute_dtype(student)) * 0.0 + 0.0


def _masked_divergence(
    kernel: RowKernel,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    coef: float | Tensor | None,
    coef_name: str,
    reduction: str,
    chunk_size: int | None,
) -> Tensor:
    """Shared driver: validate, run ``kernel`` over chunks of positions (masked within each), reduce."""
    check_logits(student_logits, teacher_logits)
    check_reduction(reduction, student_logits.ndim)
    check_chunk_size(chunk_size)
    lead_shape = student_logits.shape[:-1]
    check_mask(mask, lead_shape, "logits")

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)  # (N, V) views
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    rows = mask_rows(mask)
    coef_rows = None
    if coef is not None:  # per position: each chunk picks its masked-in rows
        coef_rows = coefficient_rows(coef, coef_name, lead_shape, None, compute_dtype(student), student.device)
    n = student.shape[0] if rows is None else rows.shape[0]
    if n == 0 and reduction != "none":
        return zero_loss(student_logits)

    per_token = run_masked_chunks(kernel, [student, teacher, coef_rows], flat_mask, chunk_size)
    seq_ids = sequence_ids(rows, lead_shape, student.device) if reduction == "sequence_mean" else None
    return reduce_tokens(per_token, seq_ids, lead_shape[0], reduction)


# ----------------------------------------------------------------------- row kernels
# Each maps student logits s (n, V), teacher logits t (n, V) and an optional
# coefficient (n, 1) or 0-dim to per-token values (n,). Shared by the logits path and
# the hidden-state path. They are written to keep few (n, V) tensors alive for the
# backward: that count times chunk x V is the memory a chunk costs.


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """sum_v x[n, v] * y[n, v] -> (n,), without materialising the (n, V) product."""
    return torch.einsum("nv,nv->n", x, y)


def _log_mixture_ratio(log_ratio: Tensor, weight: Tensor | float) -> Tensor:
    """log(w x + (1 - w) y) - log y, elementwise, from r = log x - log y.

    This is ``torch.logaddexp(log w + log x, log(1 - w) + log y) - log y`` -- the
    mixture is still formed in log space, never as a sum of probabilities -- written
    through the identity logaddexp(a, b) = b + softplus(a - b):
    ``log1p(-w) + softplus(r + log w - log1p(-w))``. softplus' backward keeps one
    (n, V) tensor where logaddexp's keeps both inputs (measured peak of a skew KL's
    forward + backward: 9-10 -> 7-8 chunk-sized buffers). ``w = 0`` gives log(0) = -inf inside
    softplus, hence exactly 0: the skew divergences reduce to the plain ones bit for
    bit, gradients included.
    """
    w = torch.as_tensor(weight, dtype=log_ratio.dtype, device=log_ratio.device)
    return torch.log1p(-w) + F.softplus(log_ratio + (torch.log(w) - torch.log1p(-w)))


def _forward_kl_rows(s: Tensor, t: Tensor, coef: Tensor | None = None) -> Tensor:
    log_q, log_p = log_probs(s), log_probs(t)
    return _row_dot(log_p.exp(), log_p - log_q)


def _reverse_kl_rows(s: Tensor, t: Tensor, coef: Tensor | None = None) -> Tensor:
    log_q, log_p = log_probs(s), log_probs(t)
    return _row_dot(log_q.exp(), log_q - log_p)


def _skew_forward_kl_rows(s: Tensor, t: Tensor, alpha: Tensor | None) -> Tensor:
    assert alpha is not None
    log_q, log_p = log_probs(s), log_probs(t)
    u = log_p - log_q
    # log p - log(alpha p + (1 - alpha) q) = u - (log m - log q)
    return _row_dot(log_p.exp(), u - _log_mixture_ratio(u, alpha))


def _skew_reverse_kl_rows(s: Tensor, t: Tensor, alpha: Tensor | None, detach_mixture_student: bool = False) -> Tensor:
    assert alpha is not None
    log_q, log_p = log_probs(s), log_probs(t)
    w = log_q - log_p
    w_mix = (log_q.detach() - log_p) if detach_mixture_student else w
    # log q - log((1 - alpha) p + alpha q) = w - (log m - log p)
    return _row_dot(log_q.exp(), w - _log_mixture_ratio(w_mix, alpha))


def _generalized_jsd_rows(s: Tensor, t: Tensor, coef: Tensor | None, beta: float) -> Tensor:
    log_q, log_p = log_probs(s), log_probs(t)
    u = log_p - log_q
    log_m_over_q = _log_mixture_ratio(u, beta)  # m = beta p + (1 - beta) q
    kl_p = _row_dot(log_p.exp(), u - log_m_over_q)  # KL(p || m)
    kl_q = -_row_dot(log_q.exp(), log_m_over_q)  # KL(q || m)
    return beta * kl_p + (1.0 - beta) * kl_q


def _tvd_rows(s: Tensor, t: Tensor, coef: Tensor | None = None) -> Tensor:
    return 0.5 * (log_probs(t).exp() - log_probs(s).exp()).abs().sum(-1)


# ------------------------------------------------------------------ public divergences


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Forward KL, KL(p || q) = sum_v p (log p - log q): mode covering (KD).

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``, any float dtype.
        teacher_logits: same shape as ``student_logits``; detached.
        mask: ``(B, T)`` / ``(N,)`` bool, True = position counts; None = all count.
        reduction: ``"token_mean"``, ``"sequence_mean"`` (3-D only) or ``"none"``.
        chunk_size: tokens per chunk; None computes all masked-in rows at once.

    Returns:
        Scalar float32 tensor (``(n,)`` per-token values for ``reduction="none"``).
    """
    return _masked_divergence(_forward_kl_rows, student_logits, teacher_logits, mask, None, "", reduction, chunk_size)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Reverse KL, KL(q || p) = sum_v q (log q - log p): mode seeking (MiniLLM).

    Shapes and arguments as in :func:`forward_kl`.
    """
    return _masked_divergence(_reverse_kl_rows, student_logits, teacher_logits, mask, None, "", reduction, chunk_size)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    alpha: float | Tensor,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Skew KL (DistiLLM SKL), KL(p || alpha p + (1 - alpha) q).

    ``alpha = 0`` is exactly :func:`forward_kl`; ``alpha -> 1`` tends to 0.

    Args:
        alpha: in [0, 1). A float, or a tensor ``(B,)`` of per-sequence values for 3-D
            input / ``(N,)`` per-row values for 2-D input (DistiLLM-2's adaptive alpha
            is per sequence); broadcast over positions. Treated as a constant
            (detached).
        Others: as in :func:`forward_kl`.
    """
    return _masked_divergence(
        _skew_forward_kl_rows,
        student_logits,
        teacher_logits,
        mask,
        alpha,
        "alpha",
        reduction,
        chunk_size,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    alpha: float | Tensor,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    detach_mixture_student: bool = False,
) -> Tensor:
    """Skew reverse KL (DistiLLM SRKL), KL(q || (1 - alpha) p + alpha q).

    ``alpha = 0`` is exactly :func:`reverse_kl`.

    Args:
        alpha: in [0, 1); float or per-sequence ``(B,)`` / per-row ``(N,)`` tensor,
            as in :func:`skew_forward_kl`.
        detach_mixture_student: False (default, DistiLLM v1 and the exact gradient
            of the formula): gradients flow through q both outside and inside the
            mixture. True: q inside the mixture is a constant, as in the official
            DistiLLM-2 code. The value is identical either way; only the gradient
            differs.
        Others: as in :func:`forward_kl`.
    """
    kernel = partial(_skew_reverse_kl_rows, detach_mixture_student=detach_mixture_student)
    return _masked_divergence(kernel, student_logits, teacher_logits, mask, alpha, "alpha", reduction, chunk_size)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    beta: float,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Generalized JSD (GKD) in TRL's convention (``GKDTrainer.generalized_jsd_loss``).

    ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
    (p teacher, q student): beta weights the *teacher* both in the mixture and in front
    of KL(p || m), as in docs/METHOD.md and TRL. The interior formula tends to 0 at both
    ends, so the endpoints are special cases: ``beta == 0`` is exactly
    :func:`forward_kl` and ``beta == 1`` exactly :func:`reverse_kl`. The GKD paper's
    runs with m = 0.9 p + 0.1 q correspond to ``beta = 0.9``.

    Args:
        beta: float in [0, 1].
        Others: as in :func:`forward_kl`.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
    check_unit_interval(torch.tensor(float(beta)), "beta", upper_open=False)
    if beta == 0:
        kernel: RowKernel = _forward_kl_rows
    elif beta == 1:
        kernel = _reverse_kl_rows
    else:
        kernel = partial(_generalized_jsd_rows, beta=float(beta))
    return _masked_divergence(kernel, student_logits, teacher_logits, mask, None, "", reduction, chunk_size)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    reduction: str = "token_mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Total variation distance, 0.5 sum_v |p - q|. Arguments as in :func:`forward_kl`."""
    return _masked_divergence(_tvd_rows, student_logits, teacher_logits, mask, None, "", reduction, chunk_size)
