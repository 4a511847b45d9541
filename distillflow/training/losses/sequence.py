"""Sequence-level losses: summed / mean token log-probs of given labels, and DPKD.

Run the tests: ``pytest tests/test_losses.py -q -k "sequence_logprob or dpkd"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillflow.training.losses.checks import check_chunk_size, check_mask, compute_dtype
from distillflow.training.losses.chunks import DEFAULT_CHUNK_SIZE, mask_rows, run_masked_chunks, sequence_ids
from distillflow.training.losses.divergences import zero_loss

Tensor = torch.Tensor


def _token_logprob_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per row: (n, V), (n,) -> (n,), float32."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype(logits))
    return picked - torch.logsumexp(logits.to(compute_dtype(logits)), dim=-1)


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
    check_mask(mask, logits.shape[:-1], "logits")
    check_chunk_size(chunk_size)
    rows = mask_rows(mask)
    flat_labels = labels.reshape(-1)
    selected_labels = (flat_labels if rows is None else flat_labels.index_select(0, rows)).long()  # (n,)
    vocab = logits.shape[-1]
    if selected_labels.numel() and not bool(((selected_labels >= 0) & (selected_labels < vocab)).all()):
        raise ValueError(f"labels at masked-in positions must be token ids in [0, {vocab})")
    flat_mask = None if mask is None else mask.reshape(-1)
    flat_logits = logits.reshape(-1, vocab)  # (N, V) view; chunks keep their masked-in rows
    per_token = run_masked_chunks(_token_logprob_rows, [flat_logits, flat_labels.long()], flat_mask, chunk_size)
    batch = logits.shape[0]
    seq_ids = sequence_ids(rows, logits.shape[:-1], logits.device)
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
    sc, sr, tc, tr = (lp.to(compute_dtype(lp)) for lp in lps)
    if sc.shape[0] == 0:
        return zero_loss(student_chosen_lp)
    margin = (sc - sr) - (tc.detach() - tr.detach())
    return -F.logsigmoid(beta_d * margin).mean()


def returns_to_go(values: Tensor, seq: Tensor, num_seqs: int, discount: float, *, future_mean: bool = False) -> Tensor:
    """Per-token returns of per-token values (n,) laid out sequence by sequence, each
    sequence's tokens contiguous and in order (a mask's row-major order; ``seq`` (n,)
    names each token's sequence).

    Default: the discounted return from each token on, ``G_t = sum_{s >= t} discount^(s - t) v_s``
    (on-policy distillation's advantage with the sign of a cost). ``future_mean``: the mean
    of the values strictly after each token, ``sum_{s > t} v_s / (n_seq - t - 1)``, 0 at a
    sequence's last token (MiniLLM's length-normalised long-term reward; ``discount`` unused).
    Sequences are independent: no value crosses from one into another.
    """
    n = values.shape[0]
    if n == 0:
        return values
    counts = torch.bincount(seq, minlength=num_seqs)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=values.device) - starts[seq]
    dense = values.new_zeros(num_seqs, int(counts.max()))
    dense[seq, pos] = values
    out = torch.zeros_like(dense)
    acc = values.new_zeros(num_seqs)
    gamma = 1.0 if future_mean else discount
    for t in range(dense.shape[1] - 1, -1, -1):  # positions past a sequence's end hold 0
        acc = dense[:, t] + gamma * acc
        out[:, t] = acc
    inclusive = out[seq, pos]
    if not future_mean:
        return inclusive
    after = (counts[seq] - pos - 1).to(values.dtype)
    return torch.where(after > 0, (inclusive - values) / after.clamp(min=1), torch.zeros_like(values))
