"""distillm: skew reverse KL(alpha) on both responses, equal weights (DistiLLM v1)."""

from __future__ import annotations

from dataclasses import dataclass

from distillflow.base.params import check
from distillflow.training import losses
from distillflow.training.methods.heads import Term
from distillflow.training.methods.method import Method, MicroBatch, Result


@dataclass(frozen=True)
class DistiLLMParams:
    """params.yaml `train.distillm`."""

    alpha: float  # skew of the skew reverse KL on both responses

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")


def loss(x: MicroBatch, p: DistiLLMParams) -> Result:
    kw = {"alpha": p.alpha, "detach_mixture_student": False}
    total, (on_t, on_s) = x.heads.divergences(
        [
            Term(x.chosen, losses.skew_reverse_kl, 0.5, kw),
            Term(x.rejected, losses.skew_reverse_kl, 0.5, kw),
        ]
    )
    return total, {"srkl_chosen": on_t, "srkl_rejected": on_s}


DISTILLM = Method(
    name="distillm",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section="distillm",
    loss=loss,
)
