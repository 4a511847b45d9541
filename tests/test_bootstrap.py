import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillflow.base import config, encoding, models
from distillflow.base.config import ModelParams, ModelsParams
from distillflow.stagekit import toymodels
from distillflow.tasks.toy import steps, toytask
from stages import bootstrap

from .builders import TASK, quick_benchmark, seed_params


def tiny(steps: int) -> config.ToyModelParams:
    return config.ToyModelParams(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        steps=steps,
        batch_size=16,
        lr=0.003,
        warmup_steps=2,
        examples=0,
        corrupt_share=0.0,
    )


def boot(teacher: config.ToyModelParams, student: config.ToyModelParams) -> config.BootstrapParams:
    return config.BootstrapParams(
        seed=0,
        max_positions=64,
        workers=1,
        packing=True,
        heldout=8,
        eval_every=10,
        max_new_tokens=8,
        teacher=teacher,
        student=student,
    )


def toy_models() -> ModelsParams:
    return ModelsParams(ModelParams("toy", None), ModelParams("toy", None), False, "float32", "none")


def test_char_tokenizer_round_trips_and_renders_the_chat_template() -> None:
    tok = models.build_char_tokenizer()
    text = "Add 12 and 7. {x}!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>hi<|assistant|>"
    assert encoding.response_ids(tok, "ab", eos=True)[-1] == tok.eos_token_id
    assert encoding.response_ids(tok, "ab", eos=False)[-1] != tok.eos_token_id


def test_toy_models_are_trained_saved_and_loadable(tmp_path: Path) -> None:
    p = boot(tiny(40), tiny(5))
    metrics = bootstrap.run(toy_models(), TASK, p, tmp_path)
    for role in ("teacher", "student"):
        folder = tmp_path / role
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert tok.chat_template is not None
    # 40 SFT steps teach the teacher something: its loss falls well below uniform
    # guessing (ln V) and below the 5-step student's.
    assert metrics["teacher"]["final_loss"] < math.log(len(models.build_char_tokenizer())) - 0.5
    assert metrics["teacher"]["final_loss"] < metrics["student"]["final_loss"]


def test_bootstrap_is_deterministic(tmp_path: Path) -> None:
    p = boot(tiny(3), tiny(2))
    bootstrap.run(toy_models(), TASK, p, tmp_path / "a")
    bootstrap.run(toy_models(), TASK, p, tmp_path / "b")
    for role in ("teacher", "student"):
        assert (tmp_path / "a" / role / "model.safetensors").read_bytes() == (
            tmp_path / "b" / role / "model.safetensors"
        ).read_bytes()


def test_every_toy_teacher_is_trained_from_a_seed_of_its_own(tmp_path: Path) -> None:
    """models.teachers: a second toy teacher lands in teacher-<label>, trained like the
    first from another seed, and passes the pre-flight gate against the student."""
    second = config.TeacherParams(label="b", name="toy", revision=None, weight=1.0)
    first = config.TeacherParams(label="a", name="toy", revision=None, weight=1.0)
    m = dataclasses.replace(toy_models(), teachers=(first, second))
    metrics = bootstrap.run(m, TASK, boot(tiny(3), tiny(2)), tmp_path)
    assert set(metrics) == {"teacher", "student", "teacher-b"}
    a, b = ((tmp_path / r / "model.safetensors").read_bytes() for r in ("teacher", "teacher-b"))
    assert a != b
    gate = models.preflight(models.ModelRef("toy", None), m.student.ref(), tmp_path, False, "none", "teacher-b")
    assert gate["shared_tokenizer"] and gate["teacher"]["name"] == "toy"


def test_training_examples_never_include_eval_prompts() -> None:
    from distillflow.base import records

    for ex, _ in zip(toymodels.training_examples(TASK, 0, "teacher"), range(500)):
        pid = records.prompt_id(records.normalise_prompt(ex.prompt))
        assert records.split_of(records.split_key(pid, ex.group), TASK.eval_fraction, TASK.sft_fraction) == "train"


def test_real_models_are_fingerprinted_not_trained(tmp_path: Path, tiny_models: Path) -> None:
    real = ModelsParams(
        ModelParams(str(tiny_models / "teacher"), None),
        ModelParams(str(tiny_models / "student"), None),
        False,
        "float32",
        "none",
    )
    p = boot(tiny(3), tiny(2))
    assert bootstrap.run(real, TASK, p, tmp_path / "out") == {}
    assert not (tmp_path / "out" / "teacher").exists()
    assert models.model_fingerprint(real.teacher.ref(), tmp_path).startswith("sha256:")


def test_mixed_toy_and_real_models_fail_clearly(tmp_path: Path, tiny_models: Path) -> None:
    mixed = ModelsParams(
        ModelParams("toy", None), ModelParams(str(tiny_models / "student"), None), False, "float32", "none"
    )
    p = boot(tiny(3), tiny(2))
    with pytest.raises(ValueError, match="must all be `toy` or all be real"):
        bootstrap.run(mixed, TASK, p, tmp_path)


def test_hub_model_without_revision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a pinned `revision`"):
        models.model_fingerprint(models.ModelRef("Qwen/Qwen2.5-0.5B-Instruct", None), tmp_path)
    assert (
        models.model_fingerprint(
            models.ModelRef("Qwen/Qwen2.5-0.5B-Instruct", "7ae557604adf67be50417f59c2c2f167def9a775"), tmp_path
        )
        == "hub:Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775"
    )


def test_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no .safetensors weights"):
        models.model_fingerprint(models.ModelRef(str(tmp_path / "m"), None), tmp_path)
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")  # named as such (tests/test_preflight.py)
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\)"):
        models.model_fingerprint(models.ModelRef(str(tmp_path / "m"), None), tmp_path)


STEP_TASK = dataclasses.replace(TASK, skills=("countdown", "walk", "reverse"), min_len=4, max_len=6, sft_fraction=0.3)


def test_a_corrupted_sequence_masks_only_its_wrong_step() -> None:
    tok = models.build_char_tokenizer()
    p = dataclasses.replace(tiny(1), corrupt_share=0.99)
    rng = random.Random(0)
    seen = 0
    for ex in itertools.islice(toytask.examples(toytask.config_of(STEP_TASK), 3), 60):
        prompt_ids, response, masked = toymodels.sequence(tok, ex, rng, p, STEP_TASK.alphabet)
        assert prompt_ids == encoding.prompt_ids(tok, ex.prompt) and response[-1] == tok.eos_token_id
        if not masked:
            continue
        seen += 1
        last = (prompt_ids, response, masked)
        text = tok.decode(response[:-1])
        bad = tok.decode(response[masked.start : masked.stop])
        inst = steps.instance(ex.skill, ex.answer)
        written = steps.split_steps(ex.skill, text)
        j = len(steps.split_steps(ex.skill, tok.decode(response[: masked.start]))) if masked.start else 0
        assert written[j] == bad and bad not in steps.next_steps(inst, written[:j])
        sep = steps.SEPARATOR[ex.skill]
        rest = sep + steps.join_steps(ex.skill, written[j + 1 :]) if j + 1 < len(written) else ""
        assert toymodels.follows_rule(inst, written[: j + 1], rest)
    assert seen > 40
    # the loss mask: every response position but the wrong step's
    b, mask = toymodels._batch(tok, [last])
    scored = b.response_mask[0].nonzero().flatten().tolist()
    assert [t - (len(last[0]) - 1) for t in scored if not mask[0, t]] == list(last[2])
    assert int(mask.sum()) == len(scored) - len(last[2])


def test_follows_rule_checks_every_step_and_the_end() -> None:
    # the prefix ends with its wrong step, as training sequences do: the separator is the model's to write
    inst = steps.instance("countdown", "46 37 28 19 10 1")
    fail = lambda prefix, cont: toymodels.continuation_failure(inst, prefix, cont)  # noqa: E731
    assert toymodels.follows_rule(inst, ["46", "36"], " 27 18 9")  # from the written 36, down to the floor of 1
    assert fail(["46", "36"], " 27 18 9 0") == "past_end"  # 0 is below the floor
    assert fail(["46", "36"], " 28 19 10 1") == "wrong_step"  # back to the answer: not the rule
    assert fail(["46", "36"], " 27 18") == "short"  # stops too early
    assert fail(["46", "36"], "  27 18 9") == "malformed"  # a doubled separator
    assert fail(["46", "36"], " 27 18 9 ") == "malformed"  # a trailing one
    assert fail(["46", "36"], " 27  18 9") == "wrong_step"  # an empty step
    assert fail(["46", "36"], "27 18 9") == "malformed"  # no separator after the written step
    assert fail(["46", "36"], "") == "short"
    walk = steps.instance("walk", "13 14 16")
    assert toymodels.follows_rule(walk, ["13", "12"], " 14 16") and toymodels.follows_rule(
        walk, ["13", "12"], " 13 15 16"
    )
    # a wrong step that overshoots the goal ends the walk there: the right continuation is none
    assert toymodels.follows_rule(walk, ["13", "19"], "")
    assert toymodels.continuation_failure(walk, ["13", "19"], " 20") == "past_end"


def test_the_student_trains_on_its_bucket_which_seed_never_uses() -> None:
    from distillflow.base import records
    from distillflow.data import sources, split

    student = list(itertools.islice(toymodels.training_examples(STEP_TASK, 1, "student"), 200))
    teacher = list(itertools.islice(toymodels.training_examples(STEP_TASK, 1, "teacher"), 200))
    split_of = lambda e: records.split_of(  # noqa: E731
        records.split_key(records.prompt_id(records.normalise_prompt(e.prompt)), e.group),
        STEP_TASK.eval_fraction,
        STEP_TASK.sft_fraction,
    )
    assert {split_of(e) for e in student} == {"sft"} and {split_of(e) for e in teacher} == {"train", "sft"}
    p = seed_params(num_train=200, num_eval=20)
    train, evals, _, counts = split.prompt_sets(STEP_TASK, p, sources.source_rows(STEP_TASK, p))
    assert counts["reserved_for_sft"] > 0
    assert counts["read"] == sum(
        counts[k] for k in ("train", "eval", "quarantined", "unused_over_quota", "reserved_for_sft")
    )
    assert {records.split_of(records.split_key(r["prompt_id"], r["group"]), 0.1, 0.3) for r in train} == {"train"}
    assert {pr.prompt for pr in student}.isdisjoint({r["prompt"] for r in train + evals})
    assert {pr.group for pr in student}.isdisjoint({r["group"] for r in train + evals})  # nor any phrasing of them


def test_step_task_metrics_and_two_workers_are_deterministic(tmp_path: Path) -> None:
    p = dataclasses.replace(boot(dataclasses.replace(tiny(6), corrupt_share=0.25), tiny(4)), workers=2)
    p = dataclasses.replace(p, student=dataclasses.replace(p.student, examples=24))
    a = bootstrap.run(toy_models(), STEP_TASK, p, tmp_path / "a")
    b = bootstrap.run(toy_models(), STEP_TASK, p, tmp_path / "b")
    for role in ("teacher", "student"):
        assert (tmp_path / "a" / role / "model.safetensors").read_bytes() == (
            tmp_path / "b" / role / "model.safetensors"
        ).read_bytes()
        m = a[role]
        assert m["heldout_loss_curve"][-1] == {"step": m["steps"], "loss": m["heldout_loss"]}
        assert m["plain"]["n"] == 8 and 0 <= m["plain"]["accuracy"] <= 1
        assert set(m["after_corruption"]["per_skill"]) <= {"countdown", "walk", "reverse"}
        after = m["after_corruption"]
        assert 0 < after["n"] <= 8
        wrong = sum(n for by_kind in after["failures"].values() for n in by_kind.values())
        assert wrong == round((1 - after["accuracy"]) * after["n"])  # every failure counted by kind
        assert all(set(by_kind) == set(toymodels.FAILURES) for by_kind in after["failures"].values())
        assert set(after["failures"]) <= set(after["per_skill"])
    assert (a["teacher"]["corrupt_share"], a["student"]["examples"]) == (0.25, 24)
    assert {k: v for k, v in a["teacher"].items() if k != "seconds"} == {
        k: v for k, v in b["teacher"].items() if k != "seconds"
    }


def test_step_benchmark_quick_smoke() -> None:
    """benchmarks/bootstrap_step.py on the params.yaml teacher: the variants --quick runs
    side by side, ratios against the padded step, and sorting by length or packing pads
    no more."""
    out = quick_benchmark("bootstrap_step.py")
    rows = {line[9:29].strip(): line.split() for line in out.splitlines() if line[:9].strip() == "1"}
    assert set(rows) == {"padded", "length-sorted", "bf16 autocast", "packed (bootstrap)"}, out
    assert rows["padded"][-3] == "1.00x", out
    assert all(float(cols[-2]) >= 0 for cols in rows.values()), out  # the warm-up's seconds, a number
    real = {name: float(cols[-4]) for name, cols in rows.items()}
    assert real["length-sorted"] >= real["padded"] == real["bf16 autocast"], out
    assert real["packed (bootstrap)"] > real["padded"], out
