"""distillm2: (1 - beta) SKL(alpha_t) on the teacher's responses + beta SRKL(alpha_s) on the
student's, beta rising over training, alpha adapted per sequence (DistiLLM-2's contrastive
loss; docs/METHOD.md), with its three ablation switches (`SWITCHES`, which
`compare.runs.<run>.disable` turns off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.heads import Heads, Side, Term
from distillflow.training.methods.method import Method, MicroBatch, Result

Tensor = torch.Tensor

# The ablation switches: boolean fields of DistiLLM2Params, each on in the full method.
SWITCHES = ("contrastive", "beta_ramp", "adaptive_alpha")


@dataclass(frozen=True)
class BetaSchedule:
    """beta_start until ramp_start (a fraction of training), linear to beta_end at
    ramp_end, then held. The paper's single-round clip(tau/T, 0.5, 1) is 0.5, 1.0,
    0.5, 1.0; the official code's ramp is 0.5, 0.75, 0.0, 0.5."""

    start: float  # beta until ramp_start
    end: float  # beta from ramp_end on
    ramp_start: float  # fraction of the whole training (all rounds) where the linear ramp starts
    ramp_end: float  # fraction of the whole training where the ramp reaches end

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
    alpha_0: float  # the skew mixture's alpha at the start, and the adaptive alpha's upper bound
    alpha_min: float  # the adaptive alpha's lower bound
    alpha_eps: float  # eps in the adaptive alpha's denominator (g + eps)
    reference_batches: int  # batches whose mean gaps set m_t, m_s; alpha_0 meanwhile
    beta: BetaSchedule  # the weight schedule between the chosen and the rejected terms (beta_ramp on)
    detach_mixture_student: bool  # official DistiLLM-2 code: true; DistiLLM v1: false

    def __post_init__(self) -> None:
        check(0.0 < self.alpha_min <= self.alpha_0 < 1.0, "alpha_0", "need 0 < alpha_min <= alpha_0 < 1")
        check(self.alpha_eps > 0.0, "alpha_eps", "must be > 0")
        check(self.reference_batches >= 1, "reference_batches", "must be >= 1")


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
    The trainer keeps one for every run, saves it in checkpoints, and the train stage
    hands it to the next on-policy round.
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


def gaps(heads: Heads, chosen: Side, rejected: Side) -> tuple[Tensor, Tensor]:
    """(B,) teacher-over-student gaps of the geometric-mean token probabilities on the
    teacher's responses, and student-over-teacher on the student's."""
    with torch.no_grad():
        gap_t = heads.seq_logprob(chosen, teacher=True).exp() - heads.seq_logprob(chosen, teacher=False).exp()
        gap_s = heads.seq_logprob(rejected, teacher=False).exp() - heads.seq_logprob(rejected, teacher=True).exp()
    return gap_t, gap_s


def _stats(name: str, x: Tensor) -> dict[str, float]:
    return {f"{name}_mean": float(x.mean()), f"{name}_min": float(x.min()), f"{name}_max": float(x.max())}


def loss(x: MicroBatch, p: DistiLLM2Params) -> Result:
    at = x.at
    beta = p.beta.at(at.step, at.total_steps, at.round_index, at.rounds) if p.beta_ramp else p.beta.start
    if p.adaptive_alpha:
        alpha_t, alpha_s = x.curriculum.alphas(*gaps(x.heads, x.chosen, x.rejected))
    else:  # no log-prob passes needed: alpha stays at alpha_0
        device = x.chosen.mask.device
        alpha_t = torch.full((x.chosen.mask.shape[0],), p.alpha_0, device=device)
        alpha_s = torch.full((x.rejected.mask.shape[0],), p.alpha_0, device=device)
    srkl_kw = {"detach_mixture_student": p.detach_mixture_student}
    on_chosen = losses.skew_forward_kl if p.contrastive else losses.skew_reverse_kl
    chosen_kw = {"alpha": alpha_t} if p.contrastive else {"alpha": alpha_t, **srkl_kw}
    total, (a, b) = x.heads.divergences(
        [
            Term(x.chosen, on_chosen, 1.0 - beta, chosen_kw),
            Term(x.rejected, losses.skew_reverse_kl, beta, {"alpha": alpha_s, **srkl_kw}),
        ]
    )
    logs = {
        "chosen_term": a,
        "rejected_term": b,
        "beta": beta,
        **_stats("alpha_t", alpha_t),
        **_stats("alpha_s", alpha_s),
    }
    return total, logs


DISTILLM2 = Method(
    name="distillm2",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section="distillm2",
    loss=loss,
    switches=SWITCHES,
)
