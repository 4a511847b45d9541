"""kd: forward KL(p || q) on the teacher's responses."""

from __future__ import annotations

from distillflow.training import losses
from distillflow.training.methods.heads import Term
from distillflow.training.methods.method import Method, MicroBatch, Result


def loss(x: MicroBatch, p: None) -> Result:
    total, (fkl,) = x.heads.divergences([Term(x.chosen, losses.forward_kl, 1.0)])
    return total, {"fkl": fkl}


KD = Method(
    name="kd",
    needs_teacher="online_or_topk",
    needs_teacher_samples=True,
    needs_student_samples=False,
    params_section=None,
    loss=loss,
)
