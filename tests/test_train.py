from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from stages import train
from stages.lib import models

from .test_curate import pair


def tp(**kw: object) -> train.TrainParams:
    base = dict(method="distillm2", seed=0, epochs=2, batch_size=4, lr=0.01, warmup_steps=1, max_grad_norm=1.0, alpha=0.1,
                beta_start=0.5, beta_end=1.0, beta_ramp_start=0.5, beta_ramp_end=1.0, reduction="sequence_mean", detach_mixture_student=True)
    return train.TrainParams(**{**base, **kw})  # type: ignore[arg-type]


def test_beta_schedule_paper_and_official_shapes() -> None:
    paper = tp()  # clip(tau / T, 0.5, 1): flat at 0.5 for the first half, then linear to 1
    betas = [train.beta_at(s, 101, paper) for s in range(101)]
    assert betas[0] == betas[50] == 0.5 and betas[100] == 1.0
    assert betas[75] == pytest.approx(0.75)
    assert all(b1 <= b2 for b1, b2 in zip(betas, betas[1:]))
    official = tp(beta_start=0.5, beta_end=0.75, beta_ramp_start=0.0, beta_ramp_end=0.5)
    assert train.beta_at(0, 101, official) == 0.5
    assert train.beta_at(25, 101, official) == pytest.approx(0.625)
    assert train.beta_at(100, 101, official) == 0.75
    constant = tp(beta_start=0.5, beta_end=0.5)
    assert {train.beta_at(s, 10, constant) for s in range(10)} == {0.5}


def test_bad_train_params_name_the_key() -> None:
    with pytest.raises(ValueError, match="alpha: must be in"):
        tp(alpha=1.0)
    with pytest.raises(ValueError, match="beta_ramp_start"):
        tp(beta_ramp_start=0.8, beta_ramp_end=0.2)


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    ref = models.ModelRef(str(folder), None)
    return models.load_model(ref, folder, False, "float32"), models.load_tokenizer(ref, folder, False)


def test_distillation_lowers_the_loss_moves_only_the_student_and_logs_every_step(tiny_models: Path) -> None:
    student, tok_s = load(tiny_models / "student")
    teacher, tok_t = load(tiny_models / "teacher")
    t_before = [p.detach().clone() for p in teacher.parameters()]
    s_before = [p.detach().clone() for p in student.parameters()]
    pairs = [pair(i, chosen=str(i + 1), rejected=f"{i}x{i}", rf="length" if i % 2 else "stop") for i in range(8)]
    rows = train.run(student, teacher, tok_s, tok_t, pairs, tp(epochs=15, beta_start=0.5, beta_end=0.5))
    assert len(rows) == 15 * 2
    assert [r["step"] for r in rows] == list(range(30))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["skl"] + 0.5 * r["srkl"], rel=1e-5)


def test_beta_rises_during_a_real_run(tiny_models: Path) -> None:
    student, tok_s = load(tiny_models / "student")
    teacher, tok_t = load(tiny_models / "teacher")
    rows = train.run(student, teacher, tok_s, tok_t, [pair(i) for i in range(8)], tp(epochs=3))
    betas = [r["beta"] for r in rows]
    assert betas[0] == 0.5 and betas[-1] == 1.0 and betas == sorted(betas)


def test_training_is_deterministic(tiny_models: Path) -> None:
    out = []
    for _ in range(2):
        student, tok_s = load(tiny_models / "student")
        teacher, tok_t = load(tiny_models / "teacher")
        out.append([r["loss"] for r in train.run(student, teacher, tok_s, tok_t, [pair(i) for i in range(6)], tp(epochs=2))])
    assert out[0] == out[1]


def test_different_tokenizers_fail_clearly(tiny_models: Path, tmp_path: Path) -> None:
    student, tok_s = load(tiny_models / "student")
    teacher, tok_t = load(tiny_models / "teacher")
    tok_t.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        train.run(student, teacher, tok_s, tok_t, [pair(0)], tp())


def test_wider_teacher_logits_are_cut_to_the_shared_vocabulary(tiny_models: Path) -> None:
    """One family, padded output layers of different widths (like 151,936 vs 152,064)."""
    student, tok_s = load(tiny_models / "student")
    teacher, tok_t = load(tiny_models / "teacher")
    teacher.resize_token_embeddings(teacher.config.vocab_size + 28)
    assert teacher.config.vocab_size != student.config.vocab_size
    rows = train.run(student, teacher, tok_s, tok_t, [pair(i) for i in range(4)], tp(epochs=1))
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
