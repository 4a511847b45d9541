"""kd_both: forward KL(p || q) on both responses, equal weights: KD given the tokens
DistiLLM-2 trains on (the teacher's and the student's response of each pair), the
comparison's compute-matched KD (compare.runs.kd_matched)."""

from __future__ import annotations

from distillflow.training import losses
from distillflow.training.methods.heads import Term
from distillflow.training.methods.method import Method, MicroBatch, Result


def loss(x: MicroBatch, p: None) -> Result:
    total, (on_t, on_s) = x.heads.divergences(
        [Term(x.chosen, losses.forward_kl, 0.5), Term(x.rejected, losses.forward_kl, 0.5)]
    )
    return total, {"fkl_chosen": on_t, "fkl_rejected": on_s}


KD_BOTH = Method(
    name="kd_both",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=True,
    params_section=None,
    loss=loss,
)
