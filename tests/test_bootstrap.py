import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import bootstrap
from stages.lib.core import models
from stages.lib.core.config import ModelParams, ModelsParams
from stages.lib.data import encoding

from .builders import TASK


def tiny(steps: int) -> bootstrap.ToyModelParams:
    return bootstrap.ToyModelParams(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        steps=steps,
        batch_size=16,
        lr=0.003,
        warmup_steps=2,
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
    p = bootstrap.BootstrapParams(seed=0, max_positions=64, teacher=tiny(40), student=tiny(5))
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
    p = bootstrap.BootstrapParams(seed=0, max_positions=64, teacher=tiny(3), student=tiny(2))
    bootstrap.run(toy_models(), TASK, p, tmp_path / "a")
    bootstrap.run(toy_models(), TASK, p, tmp_path / "b")
    for role in ("teacher", "student"):
        assert (tmp_path / "a" / role / "model.safetensors").read_bytes() == (
            tmp_path / "b" / role / "model.safetensors"
        ).read_bytes()


def test_training_examples_never_include_eval_prompts() -> None:
    from stages.lib.data import records

    for ex, _ in zip(bootstrap.training_examples(TASK, 0), range(500)):
        assert records.split_of(records.prompt_id(records.normalise_prompt(ex.prompt)), TASK.eval_fraction) == "train"


def test_real_models_are_fingerprinted_not_trained(tmp_path: Path, tiny_models: Path) -> None:
    real = ModelsParams(
        ModelParams(str(tiny_models / "teacher"), None),
        ModelParams(str(tiny_models / "student"), None),
        False,
        "float32",
        "none",
    )
    p = bootstrap.BootstrapParams(seed=0, max_positions=64, teacher=tiny(3), student=tiny(2))
    assert bootstrap.run(real, TASK, p, tmp_path / "out") == {}
    assert not (tmp_path / "out" / "teacher").exists()
    assert models.model_fingerprint(real.teacher.ref(), tmp_path).startswith("sha256:")


def test_mixed_toy_and_real_models_fail_clearly(tmp_path: Path, tiny_models: Path) -> None:
    mixed = ModelsParams(
        ModelParams("toy", None), ModelParams(str(tiny_models / "student"), None), False, "float32", "none"
    )
    p = bootstrap.BootstrapParams(seed=0, max_positions=64, teacher=tiny(3), student=tiny(2))
    with pytest.raises(ValueError, match="both be `toy` or both be real"):
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
