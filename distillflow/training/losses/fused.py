"""The fused LM-head path: divergences computed from final hidden states and the LM heads.

:func:`chunked_divergences_from_hidden` takes the masked-in rows of the hidden states
through both heads ``chunk_size`` rows at a time (chunks.chunk_slices), so only
``(chunk, V)`` logits of each model exist at once, in the forward and in the backward;
every chunk's gradient w.r.t. its student logits is folded into the hidden / weight /
bias gradients at once (:class:`_HeadDivergences`). Its values equal the divergences
of divergences.py on the full logits (tests/test_losses.py checks, gradients too).
This is the default training path (``train.logits: chunked``, methods.heads.Heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from distillflow.training.losses.checks import (
    check_chunk_size,
    check_mask,
    check_reduction,
    coefficient_rows,
    compute_dtype,
)
from distillflow.training.losses.chunks import (
    DEFAULT_CHUNK_SIZE,
    chunk_slices,
    mask_rows,
    reduce_tokens,
    select_rows,
    sequence_ids,
)

Tensor = torch.Tensor


@dataclass(frozen=True, kw_only=True)
class HiddenTerm:
    """One divergence term over one batch of final hidden states.

    Attributes:
        student_hidden: ``(B, T, H_s)`` or ``(N, H_s)``; receives gradients.
        teacher_hidden: ``(B, T, H_t)`` or ``(N, H_t)``; constant.
        mask: ``(B, T)`` / ``(N,)`` bool, or None when every position counts.
        divergence: a divergence of divergences.py, e.g. ``skew_forward_kl``.
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


@dataclass(frozen=True, kw_only=True)
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


def _chunk_value_and_grad(
    term: _PreparedTerm, sl: slice, s_logits: Tensor, t_logits: Tensor, any_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """One chunk's per-token values (c,), and d(weighted total)/d(s_logits) (c, V) if needed."""
    kwargs = dict(term.kwargs)
    if term.coef_rows is not None:
        kwargs["alpha"] = term.coef_rows[sl].squeeze(-1)
    g = None
    with torch.enable_grad():
        s_logits.requires_grad_(any_grad)
        value = term.divergence(s_logits, t_logits, None, reduction="none", chunk_size=None, **kwargs)
        if any_grad:
            (g,) = torch.autograd.grad(value, s_logits, grad_outputs=term.token_weights[sl].to(value.dtype))
    return value.detach(), g


def _term_forward(
    term: _PreparedTerm,
    rows: Tensor,
    need_rows: bool,
    any_grad: bool,
    chunk_size: int,
    heads: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> tuple[Tensor | None, Tensor]:
    """One term, chunk by chunk: accumulate into grad_w / grad_b; return (grad of rows, value)."""
    student_weight, student_bias, teacher_weight, teacher_bias = heads
    acc = compute_dtype(student_weight)  # float32 accumulation (float64 in tests)
    n = rows.shape[0]
    grad_h = torch.zeros(rows.shape, dtype=acc, device=rows.device) if need_rows else None
    values = []
    for sl in chunk_slices(n, chunk_size):
        h = rows[sl]
        t_logits = F.linear(term.teacher_rows[sl], teacher_weight, teacher_bias)  # (c, V), the head's dtype
        s_logits = F.linear(h, student_weight, student_bias)  # (c, V)
        value, g = _chunk_value_and_grad(term, sl, s_logits, t_logits, any_grad)
        values.append(value)
        del s_logits, t_logits, value
        if g is not None:
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
    grad_rows = None if grad_h is None else grad_h.to(rows.dtype)
    if n == 0:
        return grad_rows, torch.zeros((), dtype=acc, device=rows.device)
    # Same reduction code as the logits path, so values agree bit for bit.
    return grad_rows, reduce_tokens(torch.cat(values), term.seq_ids, term.num_seqs, term.reduction)


class _HeadDivergences(torch.autograd.Function):
    """Weighted sum of divergences of two linear heads, chunk by chunk, gradients in forward.

    Why not ``torch.utils.checkpoint`` per chunk (chunks.run_chunks): that recomputes
    both heads' matmuls in the backward (about 1.5x the matmul FLOPs of the plain path,
    which dominate on CPU). Instead each chunk's gradient w.r.t. its student logits is
    taken at once (the reduction's per-token weights are known from the masks up front)
    and folded into the hidden/weight/bias gradients; the (chunk, V) logits are then
    freed. This is what Liger-Kernel's fused linear losses do, in plain PyTorch. All
    terms share one (V, H) weight-gradient buffer: for small token counts and large
    vocabularies that buffer, not the logits, is the largest allocation. Backward only
    scales the stored gradients by the incoming scalar (first-order only, one backward
    pass).
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
        acc = compute_dtype(student_weight)  # float32 accumulation (float64 in tests)
        need_w, need_b, need_h = needs[0], needs[1], needs[2:]
        any_grad = any(needs)
        grad_w = torch.zeros(student_weight.shape, dtype=acc, device=student_weight.device) if need_w else None
        grad_b = torch.zeros(student_weight.shape[0], dtype=acc, device=student_weight.device) if need_b else None
        heads = (student_weight, student_bias, teacher_weight, teacher_bias)
        grad_hs: list[Tensor | None] = []
        parts = []
        for term, rows, need_rows in zip(terms, student_rows, need_h, strict=True):
            grad_rows, part = _term_forward(term, rows, need_rows, any_grad, chunk_size, heads, grad_w, grad_b)
            grad_hs.append(grad_rows)
            parts.append(part)
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
    check_reduction(term.reduction, s_hidden.ndim)
    lead_shape = s_hidden.shape[:-1]
    check_mask(term.mask, lead_shape, "student_hidden")
    if isinstance(term.weight, bool) or not isinstance(term.weight, (int, float)) or not math.isfinite(term.weight):
        raise ValueError(f"{where}.weight must be a finite float, got {term.weight!r}")

    rows = mask_rows(term.mask)
    s_rows = select_rows(s_hidden, rows)  # (n, H_s)
    n = s_rows.shape[0]
    dtype = compute_dtype(student_weight)
    kwargs = dict(term.kwargs)
    coef_rows = None
    if isinstance(kwargs.get("alpha"), Tensor) and kwargs["alpha"].ndim > 0:
        coef_rows = coefficient_rows(kwargs.pop("alpha"), "alpha", lead_shape, rows, dtype, s_rows.device)
    seq_ids = sequence_ids(rows, lead_shape, s_rows.device) if term.reduction == "sequence_mean" else None
    weights = _token_weights(seq_ids, lead_shape[0], n, term.reduction, dtype, s_rows.device) * term.weight
    prepared = _PreparedTerm(
        teacher_rows=select_rows(t_hidden.detach(), rows),
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
    check_chunk_size(chunk_size)

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
