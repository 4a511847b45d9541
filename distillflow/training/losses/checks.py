"""Argument checks and the dtype rule shared by every loss in the package.

Each check raises ValueError naming the argument and saying what it should be.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

REDUCTIONS = ("token_mean", "sequence_mean", "none")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs; float64 stays float64 (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_reduction(reduction: str, ndim: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sequence_mean" and ndim != 3:
        raise ValueError(
            "reduction='sequence_mean' needs (B, T, V) logits to know the sequences; "
            f"got {ndim}-D input, use reduction='token_mean'"
        )


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_mask(mask: Tensor | None, lead_shape: torch.Size, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (use mask.bool()), got {got}")
    if mask.shape != lead_shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the {what} shape without its last dim {tuple(lead_shape)}"
        )


def check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
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


def check_unit_interval(value: Tensor, name: str, upper_open: bool) -> None:
    # Written as a positive condition so NaN fails it too.
    upper_ok = value < 1 if upper_open else value <= 1
    if not bool(((value >= 0) & upper_ok).all()):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        shown = value.item() if value.numel() == 1 else value.tolist()
        raise ValueError(f"{name} must be in {bound}, got {shown}")


def coefficient_rows(
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
        rows: flat indices ``(n,)`` of the selected positions, or None for all positions.

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
    check_unit_interval(value, name, upper_open=True)
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
