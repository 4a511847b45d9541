"""The distillation methods, each a small function built from distillflow.training.losses.

A method sees one batch of pairs already run through the models (`Batch`: final hidden
states of student and teacher on the chosen = teacher response and the rejected =
student response) and returns the scalar loss plus numbers worth logging. The
divergences are evaluated through `Heads.divergences`, which either materialises the
logits (`logits: full`, the plain reference path) or works chunk by chunk from the
hidden states so that full (B, T, V) logits of both models never exist
(`logits: chunked`); tests check the two agree.

    sft        token NLL on teacher responses (SeqKD)
    kd         forward KL on teacher responses
    gkd        generalized JSD(beta) on a lambda-mix of student and teacher responses
    distillm   skew reverse KL(alpha) on both responses, equal weights (DistiLLM v1)
    distillm2  (1 - beta) SKL(alpha_t) on teacher responses + beta SRKL(alpha_s) on
               student responses, rising beta, adaptive alpha (DistiLLM-2, docs/METHOD.md)
    dpkd       -log sigmoid(beta_d [(lq(y_t) - lq(y_s)) - (lp(y_t) - lp(y_s))])
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from distillflow.base.params import check
from distillflow.training import losses

Tensor = torch.Tensor


# ---------------------------------------------------------------- params


@dataclass(frozen=True)
class BetaSchedule:
    """beta_start until ramp_start (a fraction of training), linear to beta_end at
    ramp_end, then held. The paper's single-round clip(tau/T, 0.5, 1) is 0.5, 1.0,
    0.5, 1.0; the official code's ramp is 0.5, 0.75, 0.0, 0.5."""

    start: float
    end: float
    ramp_start: float
    ramp_end: float

    def __post_init__(self) -> None:
        check(0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0, "start", "beta start and end must be in [0, 1]")
        check(0.0 <= self.ramp_start <= self.ramp_end <= 1.0, "ramp_start", "need 0 <= ramp_start <= ramp_end <= 1")

    def at(self, step: int, total: int, round_index: int = 1, rounds: int = 1) -> float:
        """beta at `step` of `total` in on-policy round `round_index` of `rounds`: the
        ramp runs over the whole training, (round - 1 + step / total) / rounds."""
        frac = (round_index - 1 + step / max(1, total - 1)) / rounds
        if frac <= self.ramp_start:
            return self.start
        if frac >= self.ramp_end:
            return self.end
        x = (frac - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return self.start + x * (self.end - self.start)


@dataclass(frozen=True, kw_only=True)
class DistiLLM2Params:
    """params.yaml `train.distillm2`, with the three ablation switches."""

    contrastive: bool  # SKL on chosen + SRKL on rejected; off: SRKL on both (DistiLLM's loss)
    beta_ramp: bool  # off: beta stays at beta.start
    adaptive_alpha: bool  # off: alpha stays at alpha_0
    alpha_0: float
    alpha_min: float
    alpha_eps: float
    reference_batches: int  # batches whose mean gaps set m_t, m_s; alpha_0 meanwhile
    beta: BetaSchedule
    detach_mixture_student: bool  # official DistiLLM-2 code: true; DistiLLM v1: false

    def __post_init__(self) -> None:
        check(0.0 < self.alpha_min <= self.alpha_0 < 1.0, "alpha_0", "need 0 < alpha_min <= alpha_0 < 1")
        check(self.alpha_eps > 0.0, "alpha_eps", "must be > 0")
        check(self.reference_batches >= 1, "reference_batches", "must be >= 1")


@dataclass(frozen=True)
class DistiLLMParams:
    alpha: float

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")


@dataclass(frozen=True)
class GKDParams:
    beta: float  # JSD interpolation; 0 = forward KL, 1 = reverse KL (TRL's convention)
    lmbda: float  # fraction of pairs trained on the student's response

    def __post_init__(self) -> None:
        check(0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]")
        check(0.0 <= self.lmbda <= 1.0, "lmbda", "must be in [0, 1]")


@dataclass(frozen=True)
class DPKDParams:
    beta_d: float

    def __post_init__(self) -> None:
        check(self.beta_d > 0.0, "beta_d", "must be > 0")


Method = Literal["distillm2", "distillm", "gkd", "kd", "sft", "dpkd"]


@dataclass(frozen=True, kw_only=True)
class MethodParams:
    """Everything a method reads (the method-specific parts of params.yaml `train`)."""

    method: Method
    reduction: Literal["sequence_mean", "token_mean"]
    distillm2: DistiLLM2Params
    distillm: DistiLLMParams
    gkd: GKDParams
    dpkd: DPKDParams


# ---------------------------------------------------------------- the models' side


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
    holds that token.
    """

    s_hidden: Tensor
    t_hidden: Tensor | None
    mask: Tensor
    targets: Tensor
    t_topk: TopK | None = None


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
    reduction: str
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

    def seq_logprob(self, side: Side, teacher: bool) -> Tensor:
        """(B,) mean token log-prob of the side's response under one model.

        Chunked over the response tokens (each chunk's (c, V) logits recomputed in the
        backward rather than kept), so it is as memory-safe as the divergences.
        """
        seq = torch.nonzero(side.mask)[:, 0]  # (N,) sequence of each response token
        if teacher and self.topk:
            assert side.t_topk is not None
            token_lp = side.t_topk.target[side.mask].float()  # stored by the score stage
        else:
            hidden = side.t_hidden if teacher else side.s_hidden
            weight, bias = (self.t_weight, self.t_bias) if teacher else (self.s_weight, self.s_bias)
            assert hidden is not None and weight is not None

            def chunk_lp(h: Tensor, y: Tensor) -> Tensor:
                logits = F.linear(h, weight, bias).float()
                return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

            token_lp = losses.run_chunks(chunk_lp, [hidden[side.mask], side.targets[side.mask]], self.chunk_size)
        total = token_lp.new_zeros(side.mask.shape[0]).index_add(0, seq, token_lp)
        return total / side.mask.sum(1).clamp(min=1).to(token_lp.dtype)


# ---------------------------------------------------------------- adaptive alpha


@dataclass
class AlphaCurriculum:
    """DistiLLM-2's adaptive alpha (docs/METHOD.md), per sequence.

    With p_bar, q_bar the geometric-mean probabilities of a response's tokens under
    teacher and student, and the gap g = p_bar - q_bar on teacher responses
    (q_bar - p_bar on student responses):

        alpha = clip(1 - (1 - alpha_0) * m / (g + eps), alpha_min, alpha_0)

    where m is the mean gap over the first `reference_batches` batches (alpha stays at
    alpha_0 while m is being measured). A sequence with g <= 0 (the student already
    above the teacher there) keeps alpha_0, the formula's limit as m / g -> +inf.
    """

    p: DistiLLM2Params
    gaps_t: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    # Batch mean of a (B,) tensor; under torchrun, the mean over every rank's sequences.
    mean: Callable[[Tensor], float] = lambda x: float(x.mean())

    @property
    def ready(self) -> bool:
        return len(self.gaps_t) >= self.p.reference_batches

    def _alpha(self, gap: Tensor, m: float) -> Tensor:
        raw = 1.0 - (1.0 - self.p.alpha_0) * m / (gap + self.p.alpha_eps)
        alpha = raw.clamp(self.p.alpha_min, self.p.alpha_0)
        return torch.where(gap > 0, alpha, torch.full_like(alpha, self.p.alpha_0))

    def alphas(self, gap_t: Tensor, gap_s: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sequence (alpha_t, alpha_s) for this batch; records gaps until ready."""
        if not self.ready:
            self.gaps_t.append(self.mean(gap_t))
            self.gaps_s.append(self.mean(gap_s))
            return torch.full_like(gap_t, self.p.alpha_0), torch.full_like(gap_s, self.p.alpha_0)
        m_t = sum(self.gaps_t) / len(self.gaps_t)
        m_s = sum(self.gaps_s) / len(self.gaps_s)
        return self._alpha(gap_t, m_t), self._alpha(gap_s, m_s)

    def state(self) -> dict:
        return {"gaps_t": list(self.gaps_t), "gaps_s": list(self.gaps_s)}


# ---------------------------------------------------------------- the methods


@dataclass(kw_only=True)
class Context:
    """What a method gets for one batch."""

    chosen: Side
    rejected: Side
    heads: Heads
    p: MethodParams
    step: int
    total_steps: int
    seed: int
    curriculum: AlphaCurriculum
    micro: int  # index of this micro-batch within the optimizer step
    positions: list[int]  # this process's pairs' positions in the global micro-batch
    global_size: int  # pairs in the global micro-batch (all ranks)
    round_index: int  # on-policy round, 1..rounds
    rounds: int


Result = tuple[Tensor, dict[str, float]]


def _stats(name: str, x: Tensor) -> dict[str, float]:
    return {f"{name}_mean": float(x.mean()), f"{name}_min": float(x.min()), f"{name}_max": float(x.max())}


def sft(c: Context) -> Result:
    nll = -c.heads.seq_logprob(c.chosen, teacher=False)  # (B,)
    if c.p.reduction == "token_mean":
        n = c.chosen.mask.sum(1).to(nll.dtype)
        loss = (nll * n).sum() / n.sum().clamp(min=1)
    else:
        loss = nll[c.chosen.mask.any(1)].mean()
    return loss, {"nll": float(loss.detach())}


def kd(c: Context) -> Result:
    loss, (fkl,) = c.heads.divergences([Term(c.chosen, losses.forward_kl, 1.0)])
    return loss, {"fkl": fkl}


def gkd(c: Context) -> Result:
    """JSD(beta) on the student's response for a lambda share of pairs, else the teacher's.

    The share is drawn per pair of the global micro-batch from a generator seeded by
    (seed, step, micro-batch), so reruns, resumed runs and torchrun runs see the same
    mix. Both sides' terms are weighted by their share of the batch, so the total is a
    mean over all pairs (or all their tokens).
    """
    rng = random.Random((c.seed * 1_000_003 + c.step) * 1_009 + c.micro)
    draws = [rng.random() < c.p.gkd.lmbda for _ in range(c.global_size)]
    on_student = torch.tensor([draws[i] for i in c.positions], device=c.chosen.mask.device)
    teacher_side = replace(c.chosen, mask=c.chosen.mask & ~on_student[:, None])
    student_side = replace(c.rejected, mask=c.rejected.mask & on_student[:, None])
    if c.p.reduction == "token_mean":
        n_t, n_s = float(teacher_side.mask.sum()), float(student_side.mask.sum())
    else:
        n_t, n_s = float(teacher_side.mask.any(1).sum()), float(student_side.mask.any(1).sum())
    total = max(n_t + n_s, 1.0)
    kw = {"beta": c.p.gkd.beta}
    loss, (on_t, on_s) = c.heads.divergences(
        [
            Term(teacher_side, losses.generalized_jsd, n_t / total, kw),
            Term(student_side, losses.generalized_jsd, n_s / total, kw),
        ]
    )
    return loss, {"jsd_teacher_data": on_t, "jsd_student_data": on_s, "student_fraction": n_s / total}


def distillm(c: Context) -> Result:
    kw = {"alpha": c.p.distillm.alpha, "detach_mixture_student": False}
    loss, (on_t, on_s) = c.heads.divergences(
        [
            Term(c.chosen, losses.skew_reverse_kl, 0.5, kw),
            Term(c.rejected, losses.skew_reverse_kl, 0.5, kw),
        ]
    )
    return loss, {"srkl_chosen": on_t, "srkl_rejected": on_s}


def distillm2(c: Context) -> Result:
    d = c.p.distillm2
    beta = d.beta.at(c.step, c.total_steps, c.round_index, c.rounds) if d.beta_ramp else d.beta.start
    if d.adaptive_alpha:
        with torch.no_grad():
            # Geometric-mean token probabilities of each response under both models.
            gap_t = (
                c.heads.seq_logprob(c.chosen, teacher=True).exp() - c.heads.seq_logprob(c.chosen, teacher=False).exp()
            )
            gap_s = (
                c.heads.seq_logprob(c.rejected, teacher=False).exp()
                - c.heads.seq_logprob(c.rejected, teacher=True).exp()
            )
        alpha_t, alpha_s = c.curriculum.alphas(gap_t, gap_s)
    else:  # no log-prob passes needed: alpha stays at alpha_0
        device = c.chosen.mask.device
        alpha_t = torch.full((c.chosen.mask.shape[0],), d.alpha_0, device=device)
        alpha_s = torch.full((c.rejected.mask.shape[0],), d.alpha_0, device=device)
    on_chosen = losses.skew_forward_kl if d.contrastive else losses.skew_reverse_kl
    chosen_kw = (
        {"alpha": alpha_t} if d.contrastive else {"alpha": alpha_t, "detach_mixture_student": d.detach_mixture_student}
    )
    loss, (a, b) = c.heads.divergences(
        [
            Term(c.chosen, on_chosen, 1.0 - beta, chosen_kw),
            Term(
                c.rejected,
                losses.skew_reverse_kl,
                beta,
                {"alpha": alpha_s, "detach_mixture_student": d.detach_mixture_student},
            ),
        ]
    )
    logs = {
        "chosen_term": a,
        "rejected_term": b,
        "beta": beta,
        **_stats("alpha_t", alpha_t),
        **_stats("alpha_s", alpha_s),
    }
    return loss, logs


def dpkd(c: Context) -> Result:
    lq_t = c.heads.seq_logprob(c.chosen, teacher=False)
    lq_s = c.heads.seq_logprob(c.rejected, teacher=False)
    with torch.no_grad():
        lp_t = c.heads.seq_logprob(c.chosen, teacher=True)
        lp_s = c.heads.seq_logprob(c.rejected, teacher=True)
    loss = losses.dpkd_loss(lq_t, lq_s, lp_t, lp_s, c.p.dpkd.beta_d)
    return loss, {"margin": float(((lq_t - lq_s) - (lp_t - lp_s)).mean().detach())}


METHODS: dict[str, Callable[[Context], Result]] = {
    "sft": sft,
    "kd": kd,
    "gkd": gkd,
    "distillm": distillm,
    "distillm2": distillm2,
    "dpkd": dpkd,
}

# Which forward passes a method needs: (teacher on chosen, student+teacher on rejected)
NEEDS_TEACHER = {"sft": False, "kd": True, "gkd": True, "distillm": True, "distillm2": True, "dpkd": True}
NEEDS_REJECTED = {"sft": False, "kd": False, "gkd": True, "distillm": True, "distillm2": True, "dpkd": True}
