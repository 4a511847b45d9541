"""sft: token NLL of the student on the teacher's responses (SeqKD); no teacher signal."""

from __future__ import annotations

from distillflow.training.methods.method import Method, MicroBatch, Result


def loss(x: MicroBatch, p: None) -> Result:
    nll = -x.heads.seq_logprob(x.chosen, teacher=False)  # (B,)
    if x.heads.reduction == "token_mean":
        n = x.chosen.mask.sum(1).to(nll.dtype)
        total = (nll * n).sum() / n.sum().clamp(min=1)
    else:
        total = nll[x.chosen.mask.any(1)].mean()
    return total, {"nll": float(total.detach())}


SFT = Method(
    name="sft",
    needs_teacher="none",
    needs_teacher_samples=True,
    needs_student_samples=False,
    params_section=None,
    loss=loss,
)
