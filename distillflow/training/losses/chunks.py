"""How every loss path chunks its rows, and the reductions over per-token values.

Every loss that touches ``(rows, V)`` tensors works ``chunk_size`` rows at a time, with
the one set of boundaries of :func:`chunk_slices` (``0, c, 2c, ...``); what differs
between the paths is only how the backward gets each chunk's gradient:

* :func:`run_masked_chunks` (the full-logits divergences and sequence log-probs) maps a
  kernel over chunks of positions, each chunk cut to its masked-in rows inside the
  chunk, and recomputes one chunk at a time in the backward, writing its gradient
  straight into the input's gradient: beyond that gradient, memory is a few
  ``(chunk, V)`` buffers;
* :func:`run_chunks` (methods/heads.py's top-k and log-prob passes, whose kernels apply
  the trainable LM head) maps a kernel over row chunks under activation
  checkpointing, which follows gradients into tensors the kernel closes over;
* the fused LM-head path (fused.py) walks :func:`chunk_slices` itself, because it
  folds each chunk's gradient into the head gradients in the forward instead of
  recomputing the chunk in the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 1024


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    """Row ranges ``[0, c), [c, 2c), ...`` covering ``n`` rows (none when ``n == 0``)."""
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def run_chunks(kernel: Callable[..., Tensor], tensors: list[Tensor | None], chunk_size: int | None) -> Tensor:
    """Apply ``kernel`` over row chunks of ``tensors`` and concatenate the (n,) results.

    Tensors whose first dim is the row count are cut into chunks; others (0-dim
    coefficients, None) go to every chunk whole. Each chunk runs under non-reentrant
    checkpointing when a gradient is needed, so the backward keeps only the chunk's
    inputs and recomputes its (chunk, V) intermediates, instead of holding every
    chunk's log-probs and mixtures at once. ``split`` (not slicing) keeps the
    backward to one concatenation of chunk grads. ``chunk_size=None``: one call on
    everything.
    """
    if chunk_size is None:
        return kernel(*tensors)
    n = next(t for t in tensors if t is not None).shape[0]
    sizes = [s.stop - s.start for s in chunk_slices(n, chunk_size)] or [0]
    pieces = [t.split(sizes) if t is not None and t.ndim > 0 and t.shape[0] == n else None for t in tensors]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outputs = []
    for i in range(len(sizes)):
        args = [p[i] if p is not None else t for p, t in zip(pieces, tensors, strict=True)]
        if needs_grad:
            outputs.append(checkpoint(kernel, *args, use_reentrant=False))
        else:
            outputs.append(kernel(*args))
    return torch.cat(outputs)


def _masked_in_chunk(kernel: Callable[..., Tensor], mask: Tensor | None, *tensors: Tensor | None) -> Tensor:
    """``kernel`` on the masked-in rows of one chunk (its inputs as they are if all rows count)."""
    if mask is None:
        return kernel(*tensors)
    rows = mask.nonzero().squeeze(-1)
    if rows.shape[0] == mask.shape[0]:
        return kernel(*tensors)
    per_row = [t is not None and t.ndim > 0 and t.shape[0] == mask.shape[0] for t in tensors]
    return kernel(*(t.index_select(0, rows) if cut else t for t, cut in zip(tensors, per_row, strict=True)))


def _chunk_args(tensors: tuple[Tensor | None, ...], n: int, sl: slice) -> list[Tensor | None]:
    return [t[sl] if t is not None and t.ndim > 0 and t.shape[0] == n else t for t in tensors]


class _PositionChunks(torch.autograd.Function):
    """The kernel over position chunks; backward recomputes each chunk into one gradient buffer.

    Like checkpointing, but the backward writes each chunk's gradient straight into the
    ``(N, V)`` gradient of ``x``: checkpointing over ``split`` pieces holds every
    chunk's gradient until the split's backward concatenates them into a second
    full-size tensor. Only ``x`` gets a gradient; the other tensors are constants.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        kernel: Callable[..., Tensor],
        chunk_size: int,
        mask: Tensor | None,
        x: Tensor,
        *others: Tensor | None,
    ) -> Tensor:
        n = x.shape[0]
        slices = chunk_slices(n, chunk_size) or [slice(0, 0)]
        outputs = []
        for sl in slices:
            chunk_mask = None if mask is None else mask[sl]
            outputs.append(_masked_in_chunk(kernel, chunk_mask, x[sl], *_chunk_args(others, n, sl)))
        ctx.kernel, ctx.slices, ctx.sizes = kernel, slices, [o.shape[0] for o in outputs]
        ctx.save_for_backward(mask, x, *others)
        return torch.cat(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mask, x, *others = ctx.saved_tensors
        n = x.shape[0]
        grad = torch.zeros_like(x)
        start = 0
        for sl, size in zip(ctx.slices, ctx.sizes, strict=True):
            if size:
                with torch.enable_grad():
                    chunk = x[sl].detach().requires_grad_(True)
                    chunk_mask = None if mask is None else mask[sl]
                    value = _masked_in_chunk(ctx.kernel, chunk_mask, chunk, *_chunk_args(tuple(others), n, sl))
                (grad[sl],) = torch.autograd.grad(value, chunk, grad_out[start : start + size])
            start += size
        return None, None, None, grad, *(None for _ in others)


def run_masked_chunks(
    kernel: Callable[..., Tensor],
    tensors: list[Tensor | None],
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    """The (n,) kernel values of the masked-in positions, ``chunk_size`` positions at a time.

    ``tensors`` are laid out per position, ``(N, ...)`` (or 0-dim / None: given whole to
    every chunk), with ``mask`` ``(N,)`` bool (None: every position counts). Only
    ``tensors[0]`` (the student logits) gets a gradient. Chunks are cut from the
    positions (views, no copy) and each keeps its masked-in rows inside the chunk, so no
    ``(n, V)`` copy of the masked-in rows exists; the backward recomputes one chunk at a
    time into a single gradient buffer (first order only). Results come in row-major
    order of the masked-in positions. ``chunk_size=None``: one plain call on everything
    (the fused path's per-chunk call), differentiable as usual.
    """
    if chunk_size is None:
        return _masked_in_chunk(kernel, mask, *tensors)
    x, *others = tensors
    assert x is not None
    return _PositionChunks.apply(kernel, chunk_size, mask, x, *others)


def select_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """(..., D) -> (n, D): the masked-in rows (a view when every row counts)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def mask_rows(mask: Tensor | None) -> Tensor | None:
    """Flat indices (n,) of the masked-in positions, None when every position counts."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)


def sequence_ids(rows: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """Sequence index (n,) of each selected row of a (B, T) layout."""
    flat = torch.arange(lead_shape.numel(), device=device) if rows is None else rows
    return torch.div(flat, lead_shape[1], rounding_mode="floor")


def reduce_tokens(per_token: Tensor, seq_ids: Tensor | None, num_seqs: int, reduction: str) -> Tensor:
    """Apply a reduction to per-token values (n,) (n > 0 for the means).

    Shared by every path (full logits, fused heads, methods/heads.py's top-k), so all
    reduce alike, bit for bit.
    """
    if reduction == "none":
        return per_token
    if reduction == "token_mean":
        return per_token.sum() / per_token.shape[0]
    assert seq_ids is not None, f"{reduction} needs sequence ids"
    sums = per_token.new_zeros(num_seqs).index_add(0, seq_ids, per_token)
    counts = torch.bincount(seq_ids, minlength=num_seqs)
    present = counts > 0
    if reduction == "sequence_sum":  # a sum per sequence, then a mean over sequences (the policy-gradient losses)
        return sums[present].mean()
    return (sums[present] / counts[present].to(per_token.dtype)).mean()
