from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distillflow.stagekit import rounds
from distillflow.training.methods.distillm2 import AlphaCurriculum, BetaSchedule
from distillflow.training.train_params import RoundParams

from .builders import D2, PAIRS, fresh, live_rows, tp, train_run


def test_beta_schedule_paper_and_official_shapes() -> None:
    paper = BetaSchedule(0.5, 1.0, 0.5, 1.0)  # clip(tau / T, 0.5, 1)
    betas = [paper.at(s, 101) for s in range(101)]
    assert betas[0] == betas[50] == 0.5 and betas[100] == 1.0
    assert betas[75] == pytest.approx(0.75)
    assert all(b1 <= b2 for b1, b2 in zip(betas, betas[1:]))
    official = BetaSchedule(0.5, 0.75, 0.0, 0.5)
    assert official.at(0, 101) == 0.5 and official.at(25, 101) == pytest.approx(0.625) and official.at(100, 101) == 0.75
    with pytest.raises(ValueError, match="ramp_start"):
        BetaSchedule(0.5, 1.0, 0.8, 0.2)


def test_beta_schedule_spans_on_policy_rounds() -> None:
    """With E rounds, beta follows one ramp over all of them (the paper's e/E + tau/T)."""
    paper = BetaSchedule(0.5, 1.0, 0.5, 1.0)
    assert [paper.at(s, 11, 1, 2) for s in (0, 10)] == [0.5, 0.5]  # round 1 of 2: first half, beta held
    assert (
        paper.at(0, 11, 2, 2) == 0.5 and paper.at(5, 11, 2, 2) == pytest.approx(0.75) and paper.at(10, 11, 2, 2) == 1.0
    )
    assert paper.at(0, 7, 3, 3) == pytest.approx(0.5 + 0.5 * (2 / 3 - 0.5) / 0.5)
    assert paper.at(5, 11) == paper.at(5, 11, 1, 1)  # one round: the plain schedule


def test_rounds_must_be_keyed_r2_to_rE_with_string_keys() -> None:
    assert tp(rounds={"r2": RoundParams("data/train"), "r3": RoundParams("data/rounds/r2/train")}).total_rounds == 3
    for bad in (
        {"r3": RoundParams("x")},
        {"r2": RoundParams("x"), "r4": RoundParams("y")},
        {"2": RoundParams("x")},
    ):
        with pytest.raises(ValueError, match=r"rounds: must be keyed r2..rE, one per round after the first"):
            tp(rounds=bad)
    from distillflow.base import params

    raw = {"previous": "data/train"}
    with pytest.raises(ValueError, match=r"train.rounds: keys must be strings, got int 2; quote them"):
        params._convert({2: raw}, dict[str, RoundParams], "train.rounds")
    assert params._convert({"2": raw}, dict[str, RoundParams], "train.rounds") == {"2": RoundParams("data/train")}


def test_alpha_curriculum_formula() -> None:
    cur = AlphaCurriculum(D2)
    gap = torch.tensor([0.2, 0.1, 0.05, 0.0, -0.3])
    # While the reference is measured, alpha stays at alpha_0.
    for _ in range(2):
        a_t, a_s = cur.alphas(gap, gap)
        assert torch.all(a_t == 0.1)
    assert cur.ready and cur.gaps_t == [pytest.approx(0.01)] * 2
    a_t, _ = cur.alphas(gap, gap)
    m = 0.01
    expected = [min(0.1, max(0.01, 1 - 0.9 * m / (g + 1e-5))) for g in (0.2, 0.1, 0.05)]
    assert a_t[:3].tolist() == pytest.approx(expected)
    assert a_t[3:].tolist() == [pytest.approx(0.1)] * 2  # no positive gap: alpha_0


def test_bad_train_params_name_the_key() -> None:
    with pytest.raises(ValueError, match="grad_accum_steps: must be >= 1"):
        tp(grad_accum_steps=0)
    with pytest.raises(ValueError, match="alpha_0: need 0 < alpha_min <= alpha_0 < 1"):
        replace(D2, alpha_0=1.0)


def test_distillm2_run_moves_alpha_and_beta_lowers_loss_and_only_trains_the_student(taught_models: Path) -> None:
    """The released DistiLLM-2 code never ran its curriculum; ours must move alpha and beta."""
    student, teacher, tok_s, tok_t = fresh(taught_models)
    t_before = [q.detach().clone() for q in teacher.parameters()]
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(epochs=12))
    assert len(rows) == 24 and [r["step"] for r in rows] == list(range(24))
    betas = [r["beta"] for r in rows]
    assert betas[0] == 0.5 and betas[-1] == 1.0 and betas == sorted(betas)
    assert rows[0]["alpha_t_mean"] == rows[0]["alpha_t_max"] == pytest.approx(0.1)  # reference batches
    moved = [r for r in rows[2:] if r["alpha_t_min"] < 0.1 - 1e-6 or r["alpha_s_min"] < 0.1 - 1e-6]
    assert moved, "adaptive alpha never left alpha_0"
    assert all(
        0.01 - 1e-6 <= r[k] <= 0.1 + 1e-6
        for r in rows
        for k in ("alpha_t_min", "alpha_t_max", "alpha_s_min", "alpha_s_max")
    )
    for r in rows:
        assert r["loss"] == pytest.approx(
            (1 - r["beta"]) * r["chosen_term"] + r["beta"] * r["rejected_term"], rel=1e-4, abs=1e-6
        )
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))


@pytest.mark.parametrize("method", ["sft", "kd", "gkd", "distillm", "dpkd"])
def test_every_baseline_trains(tiny_models: Path, method: str) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    before = [q.detach().clone() for q in student.parameters()]
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(method=method, epochs=6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    if method != "dpkd":  # DPKD's margin loss need not fall monotonically on 8 pairs; it must move
        assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])


def test_gkd_mixes_student_data_at_lambda(tiny_models: Path) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS * 4, tp(method="gkd", epochs=3, batch_size=8))
    share = sum(r["student_fraction"] for r in rows) / len(rows)
    assert 0.3 < share < 0.7


@pytest.mark.parametrize("method", ["distillm2", "gkd", "kd", "sft", "dpkd"])
def test_chunked_hidden_path_equals_full_logits_path(tiny_models: Path, method: str) -> None:
    """Same loss curve, and the same first-step gradient to 1e-6, with and without full logits."""
    curves, grads = {}, {}
    for mode in ("full", "chunked"):
        student, teacher, tok_s, tok_t = fresh(tiny_models)
        first: list[torch.Tensor] = []

        def grab(step: int, first: list = first, student: torch.nn.Module = student) -> None:
            if step == 0:
                first.extend(q.grad.detach().clone() for q in student.parameters())

        rows = train_run(
            student, teacher, tok_s, tok_t, PAIRS, tp(method=method, logits=mode, chunk_size=5, epochs=2), on_step=grab
        )
        curves[mode], grads[mode] = [r["loss"] for r in rows], first
    assert curves["full"] == pytest.approx(curves["chunked"], rel=1e-5, abs=1e-6)
    for a, b in zip(grads["full"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tiny_models: Path) -> None:
    """batch 4 x 2 micro-batches == batch 8 in one go (same pairs per step, mean of equal halves)."""
    curves = []
    for bs, accum in ((8, 1), (4, 2)):
        student, teacher, tok_s, tok_t = fresh(tiny_models)
        p = tp(batch_size=bs, grad_accum_steps=accum, epochs=3, distillm2=replace(D2, adaptive_alpha=False))
        curves.append([r["loss"] for r in train_run(student, teacher, tok_s, tok_t, PAIRS, p)])
    assert len(curves[0]) == len(curves[1]) == 3
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_adaptive_alpha_off_keeps_alpha_at_alpha_0(tiny_models: Path) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(epochs=3, distillm2=replace(D2, adaptive_alpha=False)))
    for r in rows:
        for k in ("alpha_t_min", "alpha_t_max", "alpha_s_min", "alpha_s_max"):
            assert r[k] == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_killed_run_resumes_to_the_same_final_weights(tiny_models: Path, tmp_path: Path, dtype: str) -> None:
    """bfloat16: models.dtype bfloat16 with bf16 autocast, the float32 masters resumed exactly."""
    p = tp(epochs=4, checkpoint_every=2, bf16_autocast=dtype == "bfloat16")

    def models_of(folder: Path) -> tuple:  # the teacher in models.dtype, the student's masters in float32
        student, teacher, tok_s, tok_t = fresh(folder)
        return student, teacher.to(getattr(torch, dtype)), tok_s, tok_t

    student, teacher, tok_s, tok_t = models_of(tiny_models)
    straight = train_run(student, teacher, tok_s, tok_t, PAIRS, p, live=tmp_path / "straight")
    expected = [q.detach().clone() for q in student.parameters()]
    assert {q.dtype for q in expected} == {torch.float32}

    def crash(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt("killed")

    student, teacher, tok_s, tok_t = models_of(tiny_models)
    with pytest.raises(KeyboardInterrupt):
        train_run(student, teacher, tok_s, tok_t, PAIRS, p, tmp_path, "key", on_step=crash, live=tmp_path / "resumed")
    assert (tmp_path / "state.pt").is_file()
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert {v.dtype for v in saved["student"].values()} == {torch.float32}
    assert len(live_rows(tmp_path / "resumed")) == 5  # logged step by step until the crash
    student, teacher, tok_s, tok_t = models_of(tiny_models)  # a new process: weights from disk again
    resumed = train_run(student, teacher, tok_s, tok_t, PAIRS, p, tmp_path, "key", live=tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert all(torch.equal(a, b) for a, b in zip(expected, student.parameters()))
    # the DVCLive log of the resumed run is the uninterrupted run's, byte for byte
    files = lambda d: {f.relative_to(d): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}  # noqa: E731
    assert files(tmp_path / "resumed") == files(tmp_path / "straight")
    assert {f.name for f in (tmp_path / "straight").rglob("*") if f.is_file()} == {f"{k}.tsv" for k in straight[0]} - {
        "step.tsv"
    }  # no summary, report, dvc.yaml or timestamps: nothing that changes between reruns
    got = live_rows(tmp_path / "straight")
    assert [r["loss"] for r in got] == [round(r["loss"], 6) for r in straight] and len(got) == len(straight)


def test_checkpoint_of_another_configuration_is_ignored(tiny_models: Path, tmp_path: Path) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    with pytest.raises(KeyboardInterrupt):
        train_run(
            student,
            teacher,
            tok_s,
            tok_t,
            PAIRS,
            tp(epochs=4, checkpoint_every=2),
            tmp_path,
            "old",
            on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt()) if s == 3 else None,
        )
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(epochs=4, checkpoint_every=2), tmp_path, "new")
    assert rows[0]["step"] == 0 and len(rows) == 8


def test_different_tokenizers_fail_clearly(tiny_models: Path) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    tok_t.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        train_run(student, teacher, tok_s, tok_t, PAIRS, tp())


def test_wider_teacher_logits_are_cut_to_the_shared_vocabulary(tiny_models: Path) -> None:
    """One family, padded output layers of different widths (like 151,936 vs 152,064)."""
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 28)
    assert teacher.config.vocab_size != student.config.vocab_size
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS[:4], tp(epochs=1))
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_previous_round_checks_the_chain_and_carries_the_curriculum(tmp_path: Path) -> None:
    import json

    from distillflow.base.io import DataError

    prev = tmp_path / "train"
    prev.mkdir()
    p = tp(rounds={"r2": RoundParams(str(prev))})
    with pytest.raises(DataError, match="no manifest.json; --previous must be a train stage's output folder"):
        rounds.previous_round(prev, p)
    (prev / "manifest.json").write_text(json.dumps({"stage": "curate"}))
    with pytest.raises(DataError, match="not a train stage's manifest"):
        rounds.previous_round(prev, p)
    (prev / "manifest.json").write_text(json.dumps({"stage": "train", "round": 2}))
    with pytest.raises(ValueError, match=r"holds round 2, so this is round 3, but train.rounds.r3 is None"):
        rounds.previous_round(prev, p)
    (prev / "manifest.json").write_text(json.dumps({"stage": "train", "round": 1}))
    (prev / "curriculum.json").write_text(json.dumps({"gaps_t": [0.2, 0.3], "gaps_s": [0.1, 0.1]}))
    e, cur = rounds.previous_round(prev, p)
    assert e == 2 and cur.ready and cur.gaps_t == [0.2, 0.3]
    with pytest.raises(ValueError, match="r2 must have previous"):
        rounds.previous_round(prev, tp(rounds={"r2": RoundParams("elsewhere")}))


def bf16_models(tiny_models: Path, root: Path) -> Path:
    """The tiny models stored in bfloat16, as a `models.dtype: bfloat16` run finds hub models."""
    from distillflow.base import models
    from distillflow.training import basics

    for role in ("teacher", "student"):
        ref = models.ModelRef(str(tiny_models / role), None)
        model = models.load_model(ref, tiny_models, False, "bfloat16")
        basics.save_model(model, models.load_tokenizer(ref, tiny_models, False), root / role)
    return root


def changed_share(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """The share of weights whose bfloat16 value (what is saved) moved from the start."""
    changed = sum(int((v.to(torch.bfloat16) != start[k].to(torch.bfloat16)).sum()) for k, v in state.items())
    return changed / sum(v.numel() for v in state.values())


def test_bf16_models_train_float32_master_weights_under_autocast(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.dtype bfloat16 + bf16_autocast at lr 1e-5: the updates land as in float32
    training (a bf16 weight updated directly keeps most of them from moving), the forward
    runs in bf16, and the saved student is bfloat16, the same as the one in memory."""
    import json

    from distillflow.base import models
    from distillflow.training import basics, trainer

    root = bf16_models(tiny_models, tmp_path / "bf16")
    ref = {r: models.ModelRef(str(root / r), None) for r in ("student", "teacher")}
    args = (ref["student"], root / "student", ref["teacher"], root / "teacher", tmp_path / "score", False)
    p = tp(lr=1e-5, epochs=5, warmup_steps=1, bf16_autocast=True)  # 10 steps
    shares: dict[str, float] = {}

    student, teacher, tok_s, tok_t, _ = trainer.load_inputs(p, *args, "bfloat16")
    assert {q.dtype for q in student.parameters()} == {torch.float32}  # the masters
    assert {q.dtype for q in teacher.parameters()} == {torch.bfloat16}  # frozen: stays in models.dtype
    start = {k: v.clone() for k, v in student.state_dict().items()}
    seen: list[torch.dtype] = []
    # the training forwards (with gradients; setup's head check runs in float32, outside autocast)
    down_proj = student.model.layers[0].mlp.down_proj
    hook = down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype) if out.requires_grad else None)
    train_run(student, teacher, tok_s, tok_t, PAIRS, p)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # computed under bf16 autocast
    assert {q.dtype for q in student.parameters()} == {torch.float32}
    shares["master"] = changed_share(student.state_dict(), start)

    basics.export_student(student, tok_s, tmp_path / "out", "bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    saved_ref = models.ModelRef(str(tmp_path / "out"), None)
    saved = models.load_model(saved_ref, Path(), False, "bfloat16")  # as evaluate loads it
    for (k, a), (_, b) in zip(student.state_dict().items(), saved.state_dict().items()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), k
    assert {b.dtype for b in student.buffers()} == {b.dtype for b in saved.buffers()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    assert torch.equal(student(input_ids=ids).logits, saved(input_ids=ids).logits)  # compare evaluates this one

    # float32 reference: the same start, float32 compute
    student, teacher, tok_s, tok_t, _ = trainer.load_inputs(p, *args, "bfloat16")
    train_run(student, teacher, tok_s, tok_t, PAIRS, replace(p, bf16_autocast=False))
    shares["float32"] = changed_share(student.state_dict(), start)

    # the old behaviour: AdamW on the bf16 weights themselves (setup now refuses them)
    student = models.load_model(ref["student"], root, False, "bfloat16")
    with pytest.raises(ValueError, match=r"student has \['torch.bfloat16'\] weights; it must be trained with float32"):
        train_run(student, teacher, tok_s, tok_t, PAIRS, p)
    monkeypatch.setattr(trainer, "check_master_weights", lambda s: None)
    train_run(student, teacher, tok_s, tok_t, PAIRS, p)
    shares["bf16"] = changed_share(student.state_dict(), start)
    print("share of changed bf16 weights after 10 steps at lr 1e-5:", shares)
    assert shares["master"] > 2 * shares["bf16"]
    assert shares["master"] == pytest.approx(shares["float32"], rel=0.1)


def test_float32_export_casts_nothing(tiny_models: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from distillflow.training import basics

    student, _, tok_s, _ = fresh(tiny_models)
    basics.export_student(student, tok_s, tmp_path / "out", "float32")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tiny_models / "student" / "model.safetensors"
    ).read_bytes()
    assert {v.dtype for v in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float32}


def test_checkpoint_of_other_dtype_weights_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    """load_state_dict would cast bf16 weights into the float32 masters without a word."""
    p = tp(epochs=2, checkpoint_every=2)
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    with pytest.raises(KeyboardInterrupt):
        train_run(
            student,
            teacher,
            tok_s,
            tok_t,
            PAIRS,
            p,
            tmp_path,
            "key",
            on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt()) if s == 2 else None,
        )
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["student"] = {k: v.to(torch.bfloat16) for k, v in state["student"].items()}
    torch.save(state, tmp_path / "state.pt")
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    with pytest.raises(
        ValueError, match=r"state.pt holds student weights of another dtype .*torch.bfloat16, the model"
    ):
        train_run(student, teacher, tok_s, tok_t, PAIRS, p, tmp_path, "key")


def test_train_stage_saves_a_bf16_run_in_bfloat16(tiny_models: Path, tmp_path: Path) -> None:
    """The train stage with models.dtype bfloat16: out/model is bfloat16 and says so."""
    import json
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from distillflow.base import io, records

    from .conftest import ROOT

    io.write_table(tmp_path / "curate" / "curated.parquet", PAIRS, records.PAIR_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["models"]["dtype"] = "bfloat16"
    params["train"].update(epochs=1, batch_size=4, lr=1e-5, bf16_autocast=True, checkpoint_every=0, chunk_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml")]
    for flag, path in (
        ("pairs", tmp_path / "curate"),
        ("scores", tmp_path / "score"),
        ("models", bf16_models(tiny_models, tmp_path / "bf16")),
        ("out", out),
        ("metrics", tmp_path / "m.json"),
        ("live", tmp_path / "live"),
    ):
        cmd += [f"--{flag}", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(out / "model" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    start = load_file(tmp_path / "bf16" / "student" / "model.safetensors")
    assert any(not torch.equal(v, start[k]) for k, v in weights.items())  # 2 steps at lr 1e-5 moved it
