"""The models' side of every method: one batch of responses through both models (`Side`),
the stored top-k teacher signal (`TopK`), and the two LM heads that turn hidden states
into divergences and sequence log-probs (`Heads`).

`Heads.divergences` evaluates a list of weighted divergence terms (`Term`) either from
materialised logits (`train.logits: full`, the plain reference path), chunk by chunk from
the hidden states so that full (B, T, V) logits of both models never exist
(`train.logits: chunked`), or against the bucketed top-k teacher (`train.teacher_signal:
topk`); tests check the paths agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distillflow.training import losses

Tensor = torch.Tensor


@dataclass(frozen=True)
class TopK:
    """The offline teacher signal of one batch (stages/score.py), dense over positions.

    ids, logprobs (B, T, k): the teacher's k most likely next tokens and their
    log-probs; target (B, T): the teacher's log-prob of the actual next token.
    Positions outside the response mask hold zeros.
    """

    ids: Tensor
    logprobs: Tensor
    target: Tensor


@dataclass(frozen=True, kw_only=True)
class Side:
    """One batch of sequences (the chosen or the rejected responses) through both models.

    s_hidden (B, T, H_s) carries gradients; t_hidden (B, T, H_t) is None when the
    method does not need the teacher or the teacher signal is offline (t_topk);
    mask (B, T) marks the positions that predict a response token, targets (B, T)
    holds that token. A side the method does not read (Method.needs_*_samples) is
    empty: no sequence, no forward pass.
    """

    s_hidden: Tensor
    t_hidden: Tensor | None
    mask: Tensor
    targets: Tensor
    t_topk: TopK | None = None
    # (B, T): the sampler's log-prob of each target token, for responses the trainer sampled
    # itself (train.online); what MiniLLM's importance weights divide by. None otherwise.
    behaviour: Tensor | None = None


@dataclass(frozen=True)
class Term:
    """One weighted divergence over one Side."""

    side: Side
    divergence: Callable[..., Tensor]
    weight: float
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Heads:
    """The two LM heads, cut to the shared vocabulary, and how to apply them."""

    s_weight: Tensor  # (V, H_s)
    s_bias: Tensor | None
    t_weight: Tensor | None  # (V, H_t); None with the offline top-k signal
    t_bias: Tensor | None
    chunked: bool
    chunk_size: int
    reduction: str  # train.reduction: sequence_mean | token_mean
    topk: bool  # teacher distributions come from Side.t_topk, not from a teacher model

    def _topk_divergence(self, t: Term) -> Tensor:
        """One term against the bucketed top-k teacher (losses.topk_buckets), chunked.

        Each chunk's (c, V) student logits are recomputed in the backward rather than
        kept, so memory stays at chunk x V as on the online path.
        """
        side = t.side
        assert side.t_topk is not None
        rows = side.s_hidden[side.mask]  # (N, H)
        ids, lps = side.t_topk.ids[side.mask], side.t_topk.logprobs[side.mask]  # (N, k)
        seq = torch.nonzero(side.mask)[:, 0]
        kwargs = dict(t.kwargs)
        alpha = kwargs.pop("alpha", None)
        alpha_rows = alpha[seq] if isinstance(alpha, Tensor) else None

        def chunk(h: Tensor, i: Tensor, lp: Tensor, a: Tensor | None) -> Tensor:
            s_b, t_b = losses.topk_buckets(F.linear(h, self.s_weight, self.s_bias), i, lp)
            extra = {} if alpha is None else {"alpha": a if a is not None else alpha}
            return t.divergence(s_b, t_b, None, reduction="none", chunk_size=None, **kwargs, **extra)

        if rows.shape[0] == 0:  # no response token in this term: 0, still in the graph
            return side.s_hidden.sum() * 0.0
        per_token = losses.run_chunks(chunk, [rows, ids, lps, alpha_rows], self.chunk_size)
        return losses.reduce_tokens(per_token, seq, side.mask.shape[0], self.reduction)

    def divergences(self, terms: list[Term]) -> tuple[Tensor, list[float]]:
        """sum_k weight_k * divergence_k, and each divergence's value for logging."""
        if self.topk:
            values = [self._topk_divergence(t) for t in terms]
            total = sum((t.weight * v for t, v in zip(terms, values)), values[0].new_zeros(()))
            return total, [float(v.detach()) for v in values]
        if self.chunked:
            hidden_terms = [
                losses.HiddenTerm(
                    student_hidden=t.side.s_hidden,
                    teacher_hidden=t.side.t_hidden,
                    mask=t.side.mask,
                    divergence=t.divergence,
                    weight=t.weight,
                    reduction=self.reduction,
                    kwargs=t.kwargs,
                )
                for t in terms
            ]
            total, parts = losses.chunked_divergences_from_hidden(
                hidden_terms,
                self.s_weight,
                self.t_weight,
                student_bias=self.s_bias,
                teacher_bias=self.t_bias,
                chunk_size=self.chunk_size,
            )
            return total, [float(v) for v in parts]
        values = []
        for t in terms:
            s_logits = F.linear(t.side.s_hidden, self.s_weight, self.s_bias)  # (B, T, V)
            t_logits = F.linear(t.side.t_hidden, self.t_weight, self.t_bias)
            values.append(
                t.divergence(
                    s_logits, t_logits, t.side.mask, reduction=self.reduction, chunk_size=self.chunk_size, **t.kwargs
                )
            )
        total = sum((t.weight * v for t, v in zip(terms, values)), values[0].new_zeros(()))
        return total, [float(v.detach()) for v in values]

    def token_logprobs(self, side: Side, teacher: bool) -> tuple[Tensor, Tensor]:
        """(N,) log-prob of each response token under one model (the student's with
        gradients), in the side's mask order (row by row, left to right), and (N,) the
        sequence of each. The teacher's come from the stored top-k's target log-probs when
        the signal is offline.

        Chunked over the response tokens (each chunk's (c, V) logits recomputed in the
        backward rather than kept), so it is as memory-safe as the divergences.
        """
        seq = torch.nonzero(side.mask)[:, 0]  # (N,) sequence of each response token
        if teacher and self.topk:
            assert side.t_topk is not None
            return side.t_topk.target[side.mask].float(), seq  # stored by the score stage
        hidden = side.t_hidden if teacher else side.s_hidden
        weight, bias = (self.t_weight, self.t_bias) if teacher else (self.s_weight, self.s_bias)
        assert hidden is not None and weight is not None

        def chunk_lp(h: Tensor, y: Tensor) -> Tensor:
            logits = F.linear(h, weight, bias).float()
            return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

        return losses.run_chunks(chunk_lp, [hidden[side.mask], side.targets[side.mask]], self.chunk_size), seq

    def seq_logprob(self, side: Side, teacher: bool) -> Tensor:
        """(B,) mean token log-prob of the side's response under one model."""
        token_lp, seq = self.token_logprobs(side, teacher)
        total = token_lp.new_zeros(side.mask.shape[0]).index_add(0, seq, token_lp)
        return total / side.mask.sum(1).clamp(min=1).to(token_lp.dtype)

    def token_reverse_kl(self, side: Side) -> Tensor:
        """(N,) KL(q || p) of the next-token distributions at each response position, in
        the mask's order, with the student's gradients (the teacher's held fixed): the exact
        per-step term MiniLLM's single-step decomposition differentiates. Needs the teacher
        model's hidden states (the stored top-k cannot give the sum over the vocabulary)."""
        assert side.t_hidden is not None and self.t_weight is not None, "token_reverse_kl needs the online teacher"

        def chunk(h_s: Tensor, h_t: Tensor) -> Tensor:
            s_logits = F.linear(h_s, self.s_weight, self.s_bias)
            t_logits = F.linear(h_t, self.t_weight, self.t_bias)
            return losses.reverse_kl(s_logits, t_logits, None, reduction="none", chunk_size=None)

        return losses.run_chunks(chunk, [side.s_hidden[side.mask], side.t_hidden[side.mask]], self.chunk_size)
