"""Distillation losses as pure tensor functions (see docs/METHOD.md).

Notation: p = teacher next-token distribution, q = student distribution, both the
softmax of logits over the full vocabulary. Every divergence has one calling
convention::

    fn(student_logits, teacher_logits, mask, [alpha | beta], *,
       reduction="token_mean", chunk_size=1024) -> scalar tensor

* logits ``(B, T, V)`` or ``(N, V)``; the caller has already done the next-token
  shift, so position ``t`` of both tensors describes the same target token.
* mask ``(B, T)`` / ``(N,)`` bool, True = the position counts (response tokens);
  ``None`` means every position counts.
* reduction ``"token_mean"``: mean over every masked-in token of the batch;
  ``"sequence_mean"``: mean over the tokens of each sequence, then mean over the
  sequences that have at least one token (3-D input only); ``"none"``: the
  per-token values ``(N,)`` of the masked-in positions in row-major order (used by
  the hidden-state path, handy for logging).
* No masked-in token gives ``0.0`` (still attached to ``student_logits``), never NaN.

Numerics: the math runs in float32 whatever the input dtype (bf16/fp16 are upcast,
float64 stays float64 so tests can check gradients tightly); everything is built from
``log_softmax``, and mixtures are formed in log space (the logaddexp identity, see
:func:`_log_mixture_ratio`) -- adding probabilities and taking a log underflows where
both are tiny. The teacher is a constant target: its logits are detached, gradients
flow into q only.

Memory: the masked-in rows are gathered first (one ``(N, V)`` copy of each input),
then processed ``chunk_size`` tokens at a time under activation checkpointing, so the
working memory is a few ``(chunk, V)`` buffers rather than several float32 ``(N, V)``
copies. :func:`chunked_divergences_from_hidden` goes further: from final hidden
states and LM heads, no ``(N, V)`` logits ever exist. Pick ``chunk_size`` so that
``chunk_size * V`` floats is a comfortable buffer (e.g. 128 at V = 32k on CPU).

Run the tests: ``pytest tests/test_losses.py -q``; the memory benchmark:
``python benchmarks/losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 1024
REDUCTIONS = ("token_mean", "sequence_mean", "none")

# A row kernel maps student/teacher logits (n, V) and an optional per-row
# coefficient (n, 1) or 0-dim tensor to per-token divergences (n,).
RowKernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs; float64 stays float64 (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_probs(logits: Tensor) -> Tensor:
    # dtype= upcasts inside the kernel, so a bf16 (n, V) never has a float32 twin.
    return F.log_softmax(logits, dim=-1, dtype=_compute_dtype(logits))


def _check_reduction(reduction: str, ndim: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sequence_mean" and ndim != 3:
        raise ValueError(
            "reduction='sequence_mean' needs (B, T, V) logits to know the sequences; "
            f"got {ndim}-D input, use reduction='token_mean'"
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_mask(mask: Tensor | None, lead_shape: torch.Size, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (use mask.bool()), got {got}")
    if mask.shape != lead_shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the {what} shape without its last dim {tuple(lead_shape)}"
        )


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.ndim not in (2, 3):
        raise ValueError(f"student_logits must be (B, T, V) or (N, V), got shape {tuple(student_logits.shape)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher_logits vocabulary size {teacher_logits.shape[-1]} differs from "
            f"student_logits vocabulary size {student_logits.shape[-1]}; slice both to the "
            "shared tokenizer length before the loss (fail if the tokenizers really differ)"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
            f"student_logits shape {tuple(student_logits.shape)}"
        )


def _check_unit_interval(value: Tensor, name: str, upper_open: bool) -> None:
    # Written as a positive condition so NaN fails it too.
    upper_ok = value < 1 if upper_open else value <= 1
    if not bool(((value >= 0) & upper_ok).all()):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        shown = value.item() if value.numel() == 1 else value.tolist()
        raise ValueError(f"{name} must be in {bound}, got {shown}")


def _coefficient_rows(
    coef: float | Tensor,
    name: str,
    lead_shape: torch.Size,
    rows: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Validate a skew coefficient and lay it out per selected row.

    Args:
        coef: Python float, 0-dim tensor, or per-sequence ``(B,)`` (3-D input) /
            per-row ``(N,)`` (2-D input) tensor.
        lead_shape: ``(B, T)`` or ``(N,)`` -- the logits shape without V.
        rows: flat indices ``(n,)`` of the selected positions, or None for all.

    Returns:
        A 0-dim tensor (scalar) or ``(n, 1)`` tensor that broadcasts over V. It is
        detached: alpha is a schedule value, not something to train.
    """
    if isinstance(coef, bool) or not isinstance(coef, (int, float, Tensor)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(coef).__name__}")
    if isinstance(coef, Tensor):
        value = coef.detach().to(device=device, dtype=dtype)
    else:  # straight to dtype: via a float32 tensor 0.3 would become 0.30000001 in float64
        value = torch.tensor(float(coef), dtype=dtype, device=device)
    _check_unit_interval(value, name, upper_open=True)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != lead_shape[0]:
        kind = "per-sequence (B,)" if len(lead_shape) == 2 else "per-row (N,)"
        raise ValueError(
            f"{name} tensor must be 0-dim or {kind} with {lead_shape[0]} entries, got shape {tuple(value.shape)}"
        )
    # (B,) -> one value per (b, t) position -> the selected rows.
    per_position = value.unsqueeze(-1).expand(lead_shape).reshape(-1) if len(lead_shape) == 2 else value
    if rows is not None:
        per_position = per_position.index_select(0, rows)
    return per_position.unsqueeze(-1)


def _select_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """(..., V) -> (n, V): the masked-in rows (a view when every row counts)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _mask_rows(mask: Tensor | None) -> Tensor | None:
    """Flat indices (n,) of the masked-in positions, None when every position counts."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)


def _sequence_ids(rows: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """Sequence index (n,) of each selected row of a (B, T) layout."""
    flat = torch.arange(lead_shape.numel(), device=device) if rows is None else rows
    return torch.div(flat, lead_shape[1], rounding_mode="floor")


def reduce_tokens(per_token: Tensor, seq_ids: Tensor | None, num_seqs: int, reduction: str) -> Tensor:
    """Apply a reduction to per-token values (n,) (n > 0 for the means).

    Shared with stages/lib/training/objectives.py (the top-k path), so both paths reduce alike.
    """
    if reduction == "none":
        return per_token
    if reduction == "token_mean":
        return per_token.sum() / per_token.shape[0]
    assert seq_ids is not None, "sequence_mean needs sequence ids"
    sums = per_token.new_zeros(num_seqs).index_add(0, seq_ids, per_token)
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    present = counts > 0
    return (sums[present] / counts[present].to(per_token.dtype)).mean()


def run_chunks(kernel: Callable[..., Tensor], tensors: list[Tensor | None], chunk_size: int | None) -> Tensor:
    """Apply ``kernel`` over row chunks of ``tensors`` and concatenate the (n,) results.

    Each chunk runs under non-reentrant checkpointing when a gradient is needed, so the
    backward keeps only the chunk's inputs and recomputes its (chunk, V)
    intermediates, instead of holding every chunk's log-probs and mixtures at once.
    ``split`` (not slicing) keeps the backward to one concatenation of chunk grads.
    """
    if chunk_size is None:
        return kernel(*tensors)
    n = next(t for t in tensors if t is not None).shape[0]
    pieces = [list(t.split(chunk_size)) if t is not None and t.ndim > 0 and t.shape[0] == n else None for t in tensors]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outputs = []
    for i in range(max(1, math.ceil(n / chunk_size))):
        args = [p[i] if p is not None else t for p, t in zip(pieces, tensors, strict=True)]
        if needs_grad:
            outputs.append(checkpoint(kernel, *args, use_reentrant=False))
        else:
            outputs.append(kernel(*args))
    return torch.cat(outputs)


def _zero_loss(student: Tensor) -> Tensor:
    # Stays in the autograd graph so `loss.backward()` works on empty batches
    # (+ 0.0 turns the -0.0 of a negative sum into 0.0).
    return student.sum().to(_compute_dtype(student)) * 0.0 + 0.0


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
    """Shared driver: validate, gather masked-in rows, run ``kernel`` in chunks, reduce."""
    _check_logits(student_logits, teacher_logits)
    _check_reduction(reduction, student_logits.ndim)
    _check_chunk_size(chunk_size)
    lead_shape = student_logits.shape[:-1]
    _check_mask(mask, lead_shape, "logits")

    rows = _mask_rows(mask)
    student = _select_rows(student_logits, rows)  # (n, V)
    teacher = _select_rows(teacher_logits.detach(), rows)  # (n, V)
    coef_rows = None
    if coef is not None:
        coef_rows = _coefficient_rows(coef, coef_name, lead_shape, rows, _compute_dtype(student), student.device)
    if student.shape[0] == 0 and reduction != "none":
        return _zero_loss(student_logits)

    per_token = run_chunks(kernel, [student, teacher, coef_rows], chunk_size)
    seq_ids = _sequence_ids(rows, lead_shape, student.device) if reduction == "sequence_mean" else None
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
    log_q, log_p = _log_probs(s), _log_probs(t)
    return _row_dot(log_p.exp(), log_p - log_q)


def _reverse_kl_rows(s: Tensor, t: Tensor, coef: Tensor | None = None) -> Tensor:
    log_q, log_p = _log_probs(s), _log_probs(t)
    return _row_dot(log_q.exp(), log_q - log_p)


def _skew_forward_kl_rows(s: Tensor, t: Tensor, alpha: Tensor | None) -> Tensor:
    assert alpha is not None
    log_q, log_p = _log_probs(s), _log_probs(t)
    u = log_p - log_q
    # log p - log(alpha p + (1 - alpha) q) = u - (log m - log q)
    return _row_dot(log_p.exp(), u - _log_mixture_ratio(u, alpha))


def _skew_reverse_kl_rows(s: Tensor, t: Tensor, alpha: Tensor | None, detach_mixture_student: bool = False) -> Tensor:
    assert alpha is not None
    log_q, log_p = _log_probs(s), _log_probs(t)
    w = log_q - log_p
    w_mix = (log_q.detach() - log_p) if detach_mixture_student else w
    # log q - log((1 - alpha) p + alpha q) = w - (log m - log p)
    return _row_dot(log_q.exp(), w - _log_mixture_ratio(w_mix, alpha))


def _generalized_jsd_rows(s: Tensor, t: Tensor, coef: Tensor | None, beta: float) -> Tensor:
    log_q, log_p = _log_probs(s), _log_probs(t)
    u = log_p - log_q
    log_m_over_q = _log_mixture_ratio(u, beta)  # m = beta p + (1 - beta) q
    kl_p = _row_dot(log_p.exp(), u - log_m_over_q)  # KL(p || m)
    kl_q = -_row_dot(log_q.exp(), log_m_over_q)  # KL(q || m)
    return beta * kl_p + (1.0 - beta) * kl_q


def _tvd_rows(s: Tensor, t: Tensor, coef: Tensor | None = None) -> Tensor:
    return 0.5 * (_log_probs(t).exp() - _log_probs(s).exp()).abs().sum(-1)


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
    _check_unit_interval(torch.tensor(float(beta)), "beta", upper_open=False)
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


# ------------------------------------------------------------------ hidden-state path


@dataclass(frozen=True)
class HiddenTerm:
    """One divergence term over one batch of final hidden states.

    Attributes:
        student_hidden: ``(B, T, H_s)`` or ``(N, H_s)``; receives gradients.
        teacher_hidden: ``(B, T, H_t)`` or ``(N, H_t)``; constant.
        mask: ``(B, T)`` / ``(N,)`` bool, or None when every position counts.
        divergence: one of this module's divergences, e.g. :func:`skew_forward_kl`.
        weight: the term's coefficient in the total (DistiLLM-2's 1 - beta and beta).
        reduction: ``"token_mean"`` or ``"sequence_mean"`` (3-D only).
        kwargs: passed to ``divergence`` (``alpha``, ``beta``,
            ``detach_mixture_student``); a tensor ``alpha`` of shape ``(B,)`` / ``(N,)``
            is gathered per row.
    """

    student_hidden: Tensor
    teacher_hidden: Tensor
    mask: Tensor | None
    divergence: Callable[..., Tensor]
    weight: float = 1.0
    reduction: str = "token_mean"
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _PreparedTerm:
    """A validated term, reduced to its masked-in rows (n of them)."""

    teacher_rows: Tensor  # (n, H_t)
    coef_rows: Tensor | None  # (n, 1) per-row alpha, or None
    token_weights: Tensor  # (n,) d(total) / d(per-token value), term weight included
    seq_ids: Tensor | None  # (n,) for sequence_mean
    num_seqs: int
    reduction: str
    weight: float
    divergence: Callable[..., Tensor]
    kwargs: dict[str, Any]


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(c, H) @ (V, H)^T (+ (V,)) -> (c, V) logits in the head's dtype."""
    return F.linear(hidden, weight, bias)


class _HeadDivergences(torch.autograd.Function):
    """Weighted sum of divergences of two linear heads, chunk by chunk, gradients in forward.

    Why not ``torch.utils.checkpoint`` per chunk: that recomputes both heads' matmuls in
    the backward (about 1.5x the matmul FLOPs of the plain path, which dominate on
    CPU). Instead each chunk's gradient w.r.t. its student logits is taken at once (the
    reduction's per-token weights are known from the masks up front) and folded into the
    hidden/weight/bias gradients; the (chunk, V) logits are then freed. This is what
    Liger-Kernel's fused linear losses do, in plain PyTorch. All terms share one (V, H)
    weight-gradient buffer: for small token counts and large vocabularies that buffer,
    not the logits, is the largest allocation. Backward only scales the stored
    gradients by the incoming scalar (first-order only, one backward pass).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        terms: list[_PreparedTerm],
        chunk_size: int,
        needs: tuple[bool, ...],  # (weight, bias, hidden of term 0, hidden of term 1, ...)
        student_weight: Tensor,  # (V, H_s)
        student_bias: Tensor | None,  # (V,)
        teacher_weight: Tensor,  # (V, H_t)
        teacher_bias: Tensor | None,  # (V,)
        *student_rows: Tensor,  # (n_k, H_s) masked-in rows of each term
    ) -> tuple[Tensor, Tensor]:
        acc = _compute_dtype(student_weight)  # float32 accumulation (float64 in tests)
        need_w, need_b, need_h = needs[0], needs[1], needs[2:]
        any_grad = any(needs)
        grad_w = torch.zeros(student_weight.shape, dtype=acc, device=student_weight.device) if need_w else None
        grad_b = torch.zeros(student_weight.shape[0], dtype=acc, device=student_weight.device) if need_b else None
        grad_hs: list[Tensor | None] = []
        parts = []
        for term, rows, need_rows in zip(terms, student_rows, need_h, strict=True):
            n = rows.shape[0]
            grad_h = torch.zeros(rows.shape, dtype=acc, device=rows.device) if need_rows else None
            values = []
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                h = rows[sl]
                kwargs = dict(term.kwargs)
                if term.coef_rows is not None:
                    kwargs["alpha"] = term.coef_rows[sl].squeeze(-1)
                t_logits = _head_logits(term.teacher_rows[sl], teacher_weight, teacher_bias)  # (c, V)
                s_logits = _head_logits(h, student_weight, student_bias)  # (c, V)
                with torch.enable_grad():
                    s_logits.requires_grad_(any_grad)
                    value = term.divergence(s_logits, t_logits, None, reduction="none", chunk_size=None, **kwargs)
                    if any_grad:
                        (g,) = torch.autograd.grad(value, s_logits, grad_outputs=term.token_weights[sl].to(value.dtype))
                values.append(value.detach())
                del s_logits, t_logits, value
                if any_grad:
                    if grad_h is not None:
                        # In the head's dtype: upcasting a bf16 (V, H) head per chunk would
                        # cost more than the chunk itself.
                        grad_h[sl] = g.to(student_weight.dtype) @ student_weight
                    g = g.to(acc)  # (c, V)
                    if grad_w is not None:
                        grad_w.addmm_(g.t(), h.to(acc))
                    if grad_b is not None:
                        grad_b += g.sum(0)
                    del g
            grad_hs.append(None if grad_h is None else grad_h.to(rows.dtype))
            if n == 0:
                parts.append(torch.zeros((), dtype=acc, device=rows.device))
            else:
                # Same reduction code as the logits path, so values agree bit for bit.
                parts.append(reduce_tokens(torch.cat(values), term.seq_ids, term.num_seqs, term.reduction))
        parts_t = torch.stack(parts)  # (K,)
        total = sum(
            (term.weight * part for term, part in zip(terms, parts, strict=True)),
            parts_t.new_zeros(()),
        )
        # Plain attributes, not save_for_backward, so backward can hand the buffers over
        # and drop its own reference: autograd then puts the (V, H) weight gradient into
        # .grad without a defensive copy. The price: a single backward pass.
        ctx.grads = [
            None if grad_w is None else grad_w.to(student_weight.dtype),
            None if grad_b is None else grad_b.to(student_bias.dtype),  # type: ignore[union-attr]
            *grad_hs,
        ]
        ctx.mark_non_differentiable(parts_t)
        return total, parts_t

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, grad_parts: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "the hidden-state divergences support a single backward pass; "
                "compute the loss again instead of using retain_graph=True"
            )
        grads, ctx.grads = ctx.grads, None
        # Scale in place: the buffers are ours alone now, and a (V, H) temporary per call
        # would cost as much as the weight gradient itself.
        for g in grads:
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        grad_w, grad_b, *grad_hs = grads
        return None, None, None, grad_w, grad_b, None, None, *grad_hs


def _token_weights(
    seq_ids: Tensor | None,
    num_seqs: int,
    n: int,
    reduction: str,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """d(reduced loss) / d(per-token value), (n,): 1/n, or 1/(len_b * n_seqs_present)."""
    if reduction == "token_mean":
        return torch.full((n,), 1.0 / max(n, 1), dtype=dtype, device=device)
    assert seq_ids is not None
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    present = int((counts > 0).sum())
    return 1.0 / (counts[seq_ids].to(dtype) * max(present, 1))


def _prepare_term(
    term: HiddenTerm, index: int, student_weight: Tensor, teacher_weight: Tensor
) -> tuple[_PreparedTerm, Tensor]:
    """Validate one term; return it reduced to masked-in rows, and its student rows (n, H_s)."""
    where = f"terms[{index}]"
    s_hidden, t_hidden = term.student_hidden, term.teacher_hidden
    if s_hidden.ndim not in (2, 3):
        raise ValueError(f"{where}.student_hidden must be (B, T, H) or (N, H), got {tuple(s_hidden.shape)}")
    if t_hidden.shape[:-1] != s_hidden.shape[:-1]:
        raise ValueError(
            f"{where}.teacher_hidden shape {tuple(t_hidden.shape)} must match student_hidden "
            f"shape {tuple(s_hidden.shape)} in every dim but the last"
        )
    if s_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_weight must be (V, {s_hidden.shape[-1]}) to match {where}.student_hidden, "
            f"got {tuple(student_weight.shape)}"
        )
    if t_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher_weight must be (V, {t_hidden.shape[-1]}) to match {where}.teacher_hidden, "
            f"got {tuple(teacher_weight.shape)}"
        )
    if term.reduction == "none":
        raise ValueError(f"{where}.reduction must be 'token_mean' or 'sequence_mean' on the hidden-state path")
    _check_reduction(term.reduction, s_hidden.ndim)
    lead_shape = s_hidden.shape[:-1]
    _check_mask(term.mask, lead_shape, "student_hidden")
    if isinstance(term.weight, bool) or not isinstance(term.weight, (int, float)) or not math.isfinite(term.weight):
        raise ValueError(f"{where}.weight must be a finite float, got {term.weight!r}")

    rows = _mask_rows(term.mask)
    s_rows = _select_rows(s_hidden, rows)  # (n, H_s)
    n = s_rows.shape[0]
    dtype = _compute_dtype(student_weight)
    kwargs = dict(term.kwargs)
    coef_rows = None
    if isinstance(kwargs.get("alpha"), Tensor) and kwargs["alpha"].ndim > 0:
        coef_rows = _coefficient_rows(kwargs.pop("alpha"), "alpha", lead_shape, rows, dtype, s_rows.device)
    seq_ids = _sequence_ids(rows, lead_shape, s_rows.device) if term.reduction == "sequence_mean" else None
    weights = _token_weights(seq_ids, lead_shape[0], n, term.reduction, dtype, s_rows.device) * term.weight
    prepared = _PreparedTerm(
        teacher_rows=_select_rows(t_hidden.detach(), rows),
        coef_rows=coef_rows,
        token_weights=weights,
        seq_ids=seq_ids,
        num_seqs=lead_shape[0],
        reduction=term.reduction,
        weight=float(term.weight),
        divergence=term.divergence,
        kwargs=kwargs,
    )
    return prepared, s_rows


def chunked_divergences_from_hidden(
    terms: Sequence[HiddenTerm],
    student_weight: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """``sum_k terms[k].weight * loss_k`` for terms that share the two LM heads.

    Each ``loss_k`` equals ``terms[k].divergence(student_hidden @ student_weight.T +
    student_bias, teacher_hidden @ teacher_weight.T + teacher_bias, mask, ...)``, but
    the masked-in rows go through both heads ``chunk_size`` rows at a time: only
    ``(chunk, V)`` logits of each model exist at once, in the forward and in the
    backward. Use one call for all terms of a step (DistiLLM-2's SKL on teacher
    responses + SRKL on student responses) so that they share one ``(V, H)``
    weight-gradient buffer.

    Args:
        terms: the :class:`HiddenTerm` s.
        student_weight: student LM head ``(V, H_s)``; ``student_bias`` ``(V,)`` or None.
        teacher_weight: teacher LM head ``(V, H_t)``; ``teacher_bias`` ``(V,)`` or None;
            constant (no gradient).
        chunk_size: rows per chunk: memory ~ chunk x V, and every chunk reads and
            writes the (V, H) weight gradient once, so very small chunks are slow.

    Returns:
        ``(total, parts)``: scalar float32 ``total`` (differentiable w.r.t. the student
        hidden states, weight and bias; first order, one backward pass), and ``parts``
        ``(K,)``, the unweighted term values, detached, for logging. A term without any
        masked-in token contributes 0.
    """
    if not terms:
        raise ValueError("terms must hold at least one HiddenTerm")
    if student_weight.ndim != 2 or teacher_weight.ndim != 2:
        raise ValueError(
            f"student_weight and teacher_weight must be (V, H), got {tuple(student_weight.shape)} "
            f"and {tuple(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight vocabulary size {teacher_weight.shape[0]} differs from "
            f"student_weight vocabulary size {student_weight.shape[0]}; slice both heads to the "
            "shared tokenizer length (fail if the tokenizers really differ)"
        )
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != (student_weight.shape[0],):
            raise ValueError(f"{name} must be ({student_weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is None:
        raise ValueError("chunk_size must be a positive int on the hidden-state path")
    _check_chunk_size(chunk_size)

    prepared_rows = [_prepare_term(t, i, student_weight, teacher_weight) for i, t in enumerate(terms)]
    prepared = [p for p, _ in prepared_rows]
    student_rows = [rows for _, rows in prepared_rows]
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
        *(grad_on and rows.requires_grad for rows in student_rows),
    )
    return _HeadDivergences.apply(
        prepared,
        chunk_size,
        needs,
        student_weight,
        student_bias,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        *student_rows,
    )


def chunked_divergence_from_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None,
    divergence: Callable[..., Tensor],
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    reduction: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **divergence_kwargs: Any,
) -> Tensor:
    """One divergence computed from final hidden states, never materialising (N, V) logits.

    Equals ``divergence(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, mask, reduction=reduction,
    **divergence_kwargs)``; see :func:`chunked_divergences_from_hidden` (prefer it when
    several terms share the heads in one step).

    Args:
        student_hidden: ``(B, T, H_s)`` or ``(N, H_s)``.
        student_weight: ``(V, H_s)``; ``student_bias`` ``(V,)`` or None.
        teacher_hidden: ``(B, T, H_t)`` or ``(N, H_t)``; constant.
        teacher_weight: ``(V, H_t)``; ``teacher_bias`` ``(V,)`` or None; constant.
        mask: ``(B, T)`` / ``(N,)`` bool, or None.
        divergence: e.g. :func:`skew_reverse_kl`.
        reduction: ``"token_mean"`` or ``"sequence_mean"``.
        chunk_size: rows per chunk.
        divergence_kwargs: ``alpha`` (float or per-sequence/per-row tensor), ``beta``,
            ``detach_mixture_student``.

    Returns:
        Scalar float32 loss.
    """
    term = HiddenTerm(student_hidden, teacher_hidden, mask, divergence, 1.0, reduction, divergence_kwargs)
    total, _ = chunked_divergences_from_hidden(
        [term],
        student_weight,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        chunk_size=chunk_size,
    )
    return total


# ------------------------------------------------------- sequence log-probs and DPKD


def _token_logprob_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per row: (n, V), (n,) -> (n,), float32."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(_compute_dtype(logits))
    return picked - torch.logsumexp(logits.to(_compute_dtype(logits)), dim=-1)


def sequence_logprob_sum(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Summed log-prob of ``labels`` per sequence over masked-in positions.

    Args:
        logits: ``(B, T, V)``, already aligned with ``labels`` (caller shifted).
        labels: ``(B, T)`` int token ids; values at masked-out positions are ignored
            (may be -100).
        mask: ``(B, T)`` bool, or None when every position counts.
        chunk_size: tokens per chunk, as for the divergences.

    Returns:
        ``(B,)`` float32; a sequence with no masked-in token gives 0.
    """
    return _sequence_logprob(logits, labels, mask, chunk_size, mean=False)


def sequence_logprob(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean token log-prob of ``labels`` per sequence, ``(B,)`` float32.

    ``exp`` of it is the geometric-mean token probability used by DistiLLM-2's
    adaptive alpha; it is also DPKD's ``l``. A sequence with no masked-in token gives
    0 (i.e. probability 1): callers should drop such sequences rather than read it.
    Arguments as in :func:`sequence_logprob_sum`.
    """
    return _sequence_logprob(logits, labels, mask, chunk_size, mean=True)


def _sequence_logprob(
    logits: Tensor, labels: Tensor, mask: Tensor | None, chunk_size: int | None, mean: bool
) -> Tensor:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without V {tuple(logits.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    _check_mask(mask, logits.shape[:-1], "logits")
    _check_chunk_size(chunk_size)
    rows = _mask_rows(mask)
    flat_labels = labels.reshape(-1)
    selected_labels = (flat_labels if rows is None else flat_labels.index_select(0, rows)).long()  # (n,)
    vocab = logits.shape[-1]
    if selected_labels.numel() and not bool(((selected_labels >= 0) & (selected_labels < vocab)).all()):
        raise ValueError(f"labels at masked-in positions must be token ids in [0, {vocab})")
    per_token = run_chunks(_token_logprob_rows, [_select_rows(logits, rows), selected_labels], chunk_size)
    batch = logits.shape[0]
    seq_ids = _sequence_ids(rows, logits.shape[:-1], logits.device)
    sums = per_token.new_zeros(batch).index_add(0, seq_ids, per_token)
    if not mean:
        return sums
    counts = torch.bincount(seq_ids, minlength=batch).clamp_min(1)
    return sums / counts.to(sums.dtype)


def dpkd_loss(
    student_chosen_lp: Tensor,
    student_rejected_lp: Tensor,
    teacher_chosen_lp: Tensor,
    teacher_rejected_lp: Tensor,
    beta_d: float,
) -> Tensor:
    """DPKD: mean over pairs of -log sigmoid(beta_d [(lq(y^t) - lq(y^s)) - (lp(y^t) - lp(y^s))]).

    Args:
        student_chosen_lp: ``(B,)`` student mean token log-prob of the teacher
            response y^t (``lq(y^t)``, from :func:`sequence_logprob`).
        student_rejected_lp: ``(B,)`` ``lq(y^s)`` on the student response.
        teacher_chosen_lp / teacher_rejected_lp: ``(B,)`` ``lp(y^t)`` / ``lp(y^s)``;
            detached (the teacher is the reference).
        beta_d: inverse temperature of the preference margin.

    Returns:
        Scalar float32; 0.0 for an empty batch.
    """
    lps = (student_chosen_lp, student_rejected_lp, teacher_chosen_lp, teacher_rejected_lp)
    names = ("student_chosen_lp", "student_rejected_lp", "teacher_chosen_lp", "teacher_rejected_lp")
    for name, lp in zip(names, lps, strict=True):
        if lp.ndim != 1 or lp.shape != student_chosen_lp.shape:
            raise ValueError(
                f"{name} must be (B,) like student_chosen_lp {tuple(student_chosen_lp.shape)}, got {tuple(lp.shape)}"
            )
    if isinstance(beta_d, bool) or not isinstance(beta_d, (int, float)) or not math.isfinite(beta_d):
        raise ValueError(f"beta_d must be a finite float, got {beta_d!r}")
    sc, sr, tc, tr = (lp.to(_compute_dtype(lp)) for lp in lps)
    if sc.shape[0] == 0:
        return _zero_loss(student_chosen_lp)
    margin = (sc - sr) - (tc.detach() - tr.detach())
    return -F.logsigmoid(beta_d * margin).mean()


# ------------------------------------------------------------------ offline top-k signal

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
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} must both be (N, k)"
        )
    if student_logits.ndim != 2 or student_logits.shape[0] != teacher_ids.shape[0]:
        raise ValueError(
            f"student_logits must be (N, V) with N = {teacher_ids.shape[0]}, got {tuple(student_logits.shape)}"
        )
    log_q = _log_probs(student_logits)  # (N, V)
    q_top = log_q.gather(-1, teacher_ids)  # (N, k)
    p_top = teacher_logprobs.detach().to(log_q.dtype)
    student = torch.cat([q_top, _tail_logprob(q_top)[:, None]], dim=-1)
    teacher = torch.cat([p_top, _tail_logprob(p_top)[:, None]], dim=-1)
    return student, teacher
