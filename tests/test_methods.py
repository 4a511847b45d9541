"""The method registry (distillflow/training/methods/): one object per method, what each
declares is what the trainer feeds it, and a new method is one object.

Run: pytest tests/test_methods.py -q
"""

from __future__ import annotations

import importlib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import torch

from distillflow.base import encoding
from distillflow.training import losses, stored_topk
from distillflow.training.methods import METHODS
from distillflow.training.methods.gkd import GKDParams
from distillflow.training.methods.heads import Term
from distillflow.training.methods.method import Method, MicroBatch, Result
from distillflow.training.onpolicy import OnlineParams
from distillflow.training.summary import tokens_trained
from distillflow.training.train_params import TrainParams
from stages import score

from .builders import PAIRS, fresh, sp, tp, train_run


def test_each_method_is_one_object_in_its_own_module() -> None:
    assert set(METHODS) == {"sft", "kd", "kd_both", "gkd", "distillm", "distillm2", "dpkd", "opd", "minillm"}
    hints = get_type_hints(TrainParams)
    for name, method in METHODS.items():
        module = importlib.import_module(f"distillflow.training.methods.{name}")
        assert [v for v in vars(module).values() if isinstance(v, Method)] == [method]
        assert method.name == name and method.loss.__module__ == module.__name__
        if method.params_section is None:
            assert not method.switches
            continue
        params = hints[method.params_section]  # train.<section>, a field of TrainParams
        assert params.__module__ == module.__name__  # its params class lives with it
        assert all(get_type_hints(params)[s] is bool for s in method.switches)  # switches: its boolean fields
    sections = {m.params_section for m in METHODS.values()} - {None}
    assert (
        sections
        == {f.name for f in fields(TrainParams) if f.name in METHODS}
        == {"distillm2", "distillm", "gkd", "dpkd", "opd", "minillm"}
    )
    assert METHODS["distillm2"].switches == ("contrastive", "beta_ramp", "adaptive_alpha")


def test_unknown_method_and_unmet_teacher_need_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"method: 'nope' is not one of \['distillm2', 'distillm', 'gkd'"):
        tp(method="nope")
    needs_model = replace(METHODS["kd"], name="kd_hidden", needs_teacher="online")
    monkeypatch.setitem(METHODS, needs_model.name, needs_model)
    assert tp(method="kd_hidden").method == "kd_hidden"
    with pytest.raises(ValueError, match="teacher_signal: kd_hidden needs the teacher model itself"):
        tp(method="kd_hidden", teacher_signal="topk")


@pytest.fixture(scope="module")
def tiny_scores(tiny_models: Path) -> stored_topk.Scores:
    """The tiny teacher's stored top-k signal (k = 4) for PAIRS."""
    _, teacher, _, tok_t = fresh(tiny_models)
    table = score.run(teacher, tok_t, PAIRS, sp(4, 8, "cpu"))
    return stored_topk.index_scores(table)


# every method with the online teacher, and with the stored top-k where it can read that
FEEDS = [
    (n, s) for n in sorted(METHODS) for s in ("online", "topk") if s == "online" or METHODS[n].needs_teacher != "online"
]


@pytest.mark.parametrize(("name", "signal"), FEEDS)
def test_the_trainer_feeds_what_the_method_declares(
    tiny_models: Path, tiny_scores: stored_topk.Scores, monkeypatch: pytest.MonkeyPatch, name: str, signal: str
) -> None:
    method = METHODS[name]
    seen: list[tuple[MicroBatch, Any]] = []

    def spy(x: MicroBatch, p: Any) -> Result:
        seen.append((x, p))
        return method.loss(x, p)

    monkeypatch.setitem(METHODS, name, replace(method, loss=spy))
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    # A model per forward of its body: the student's with gradients (StudentForward, not
    # the pre-flight check of its head, which runs without), the teacher's any.
    ran: list[torch.nn.Module] = []

    def seen_by(model: torch.nn.Module, grad_only: bool) -> Any:
        return lambda *_: ran.append(model) if torch.is_grad_enabled() or not grad_only else None

    student.base_model.register_forward_pre_hook(seen_by(student, True))
    teacher.base_model.register_forward_pre_hook(seen_by(teacher, False))
    # packed with the online teacher, padded with stored top-k: both paths, every method
    # minillm trains on responses sampled in the run (train.online)
    sampled = OnlineParams(1, 6, "model") if name == "minillm" else OnlineParams(0, 6, "model")
    p = tp(
        method=name,
        epochs=1,
        batch_size=4,
        grad_accum_steps=2,
        teacher_signal=signal,
        packing=signal == "online",
        online=sampled,
    )
    online = signal == "online"
    train_run(student, teacher if online else None, tok_s, tok_t, PAIRS, p, scores=None if online else tiny_scores)

    assert len(seen) == 2  # one step of two micro-batches
    reads_teacher = method.needs_teacher != "none"
    assert (teacher in ran) == (reads_teacher and online)  # the teacher runs only for a method that reads it
    for x, params in seen:
        assert params is (getattr(p, method.params_section) if method.params_section else None)
        for side, needed in ((x.chosen, method.needs_teacher_samples), (x.rejected, method.needs_student_samples)):
            assert (side.mask.shape[0] == 4) == needed and (side.s_hidden.numel() > 0) == needed
            assert (side.t_hidden is not None) == (needed and reads_teacher and online)
            assert (side.t_topk is not None) == (needed and reads_teacher and not online)
        assert x.heads.topk == (not online) and x.at.total_steps == 1 and x.at.global_size == 4
    # each side it reads, in each micro-batch; packed, those sides in one forward
    responses = int(method.needs_teacher_samples) + int(method.needs_student_samples)
    assert ran.count(student) == 2 * (1 if p.packing else responses)
    encoded = [encoding.encode_pair(tok_s, q) for q in PAIRS]
    assert tokens_trained(tok_s, PAIRS, p) == sum(
        (len(pr) + len(c)) * method.needs_teacher_samples + (len(pr) + len(r)) * method.needs_student_samples
        for pr, c, r in encoded
    )


# ------------------------------------------------- a new method: one object, nothing else


def student_reverse_kl(x: MicroBatch, p: None) -> Result:
    """Reverse KL(q || p) on the student's own responses only (an on-policy RKL, MiniLLM's divergence)."""
    total, (rkl,) = x.heads.divergences([Term(x.rejected, losses.reverse_kl, 1.0)])
    return total, {"rkl": rkl}


STUDENT_RKL = Method(
    name="student_rkl",
    needs_teacher="online_or_topk",
    needs_teacher_samples=False,
    needs_student_samples=True,
    params_section=None,
    loss=student_reverse_kl,
)


def test_a_new_method_is_one_registered_object(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered, the toy method trains through the trainer's own code path: its first
    step's loss is reverse KL on the student's responses of the untrained models."""
    monkeypatch.setitem(METHODS, STUDENT_RKL.name, STUDENT_RKL)
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    rejected = encoding.collate([encoding.encode_pair(tok_s, q)[::2] for q in PAIRS], tok_s.pad_token_id)
    with torch.no_grad():
        s_logits, t_logits = (
            m(input_ids=rejected.input_ids, attention_mask=rejected.attention_mask).logits for m in (student, teacher)
        )
    want = losses.reverse_kl(s_logits, t_logits, rejected.response_mask, reduction="sequence_mean")
    before = [q.detach().clone() for q in student.parameters()]

    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(method="student_rkl", epochs=2, batch_size=8))

    assert len(rows) == 2 and rows[0]["loss"] == rows[0]["rkl"]
    assert rows[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_kd_both_is_kd_on_each_response_averaged(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kd_both's loss equals the mean of kd's loss on the teacher's responses and kd's
    loss with the student's responses in their place (the same micro-batch)."""
    seen: list[MicroBatch] = []
    both = METHODS["kd_both"]

    def spy(x: MicroBatch, p: Any) -> Result:
        seen.append(x)
        return both.loss(x, p)

    monkeypatch.setitem(METHODS, "kd_both", replace(both, loss=spy))
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    p = tp(method="kd_both", epochs=1, batch_size=4, grad_accum_steps=1)
    train_run(student, teacher, tok_s, tok_t, PAIRS, p)
    x = seen[0]
    total, logged = both.loss(x, None)
    on_chosen, _ = METHODS["kd"].loss(x, None)
    on_rejected, _ = METHODS["kd"].loss(replace(x, chosen=x.rejected), None)
    torch.testing.assert_close(total, 0.5 * (on_chosen + on_rejected), rtol=1e-5, atol=1e-7)
    assert float(logged["fkl_chosen"]) > 0 and float(logged["fkl_rejected"]) > 0


def test_gkd_at_lmbda_0_runs_only_the_teacher_responses_and_is_kd_at_beta_0(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gkd never weighs the student's responses at lmbda 0, so the trainer does not run
    them (Method.reads); at beta 0 its loss is forward KL on the teacher's responses: kd's
    curve."""
    gkd = METHODS["gkd"]
    seen: list[MicroBatch] = []

    def spy(x: MicroBatch, p: Any) -> Result:
        seen.append(x)
        return gkd.loss(x, p)

    monkeypatch.setitem(METHODS, "gkd", replace(gkd, loss=spy))
    curves = {}
    for name in ("gkd", "kd"):
        student, teacher, tok_s, tok_t = fresh(tiny_models)
        p = tp(method=name, gkd=GKDParams(beta=0.0, lmbda=0.0))
        curves[name] = [r["loss"] for r in train_run(student, teacher, tok_s, tok_t, PAIRS, p)]
        if name == "gkd":
            assert tokens_trained(tok_s, PAIRS, p) == tokens_trained(tok_s, PAIRS, tp(method="kd"))
    assert seen and all(x.rejected.s_hidden.numel() == 0 and x.chosen.s_hidden.numel() > 0 for x in seen)
    assert curves["gkd"] == pytest.approx(curves["kd"], rel=1e-5)
