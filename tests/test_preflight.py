"""The pre-flight compatibility gate (models.preflight, run by bootstrap), model identity
(every file that can change outputs) and the identify stage, and the clean `error:` exit
of a model refusal. Tiny real models built locally; each refusal is made for real (a
pickle-only folder, a tokenizer without a chat template, ...), nothing is mocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distillflow.base import encoding, models
from distillflow.base.errors import ModelError
from distillflow.engines import sampling
from distillflow.training import basics

from .builders import ENV, gp, prompts
from .conftest import ROOT


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def gate(teacher: Path, student: Path, tmp: Path) -> dict:
    return models.preflight(
        models.ModelRef(str(teacher), None), models.ModelRef(str(student), None), tmp, False, "none"
    )


def stage(tmp: Path, teacher: Path, student: Path) -> subprocess.CompletedProcess:
    """identify then bootstrap as dvc.yaml runs them, on the smoke profile pointed at two
    model folders; the first one that fails (identify refuses a folder it cannot
    fingerprint, e.g. pickle-only weights), else bootstrap's result."""
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["models"]["teacher"] = {"name": str(teacher), "revision": None}
    params["models"]["student"] = {"name": str(student), "revision": None}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    ident = tmp / "identity.json"
    done = subprocess.run(
        [sys.executable, "-m", "stages.identify", "--params", str(tmp / "params.yaml"), "--out", str(ident)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return done
    cmd = [sys.executable, "-m", "stages.bootstrap", "--params", str(tmp / "params.yaml"), "--identity", str(ident)]
    cmd += ["--out", str(tmp / "out"), "--metrics", str(tmp / "m.json")]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)


def refused(done: subprocess.CompletedProcess, *words: str) -> None:
    """A clean refusal: exit 2, one `error:` line naming `words`, no traceback."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("error: "))
    for w in words:
        assert w in line, line


def test_compatible_models_pass_and_the_findings_are_in_the_manifest(tmp_path: Path, tiny_models: Path) -> None:
    t, s = tiny_models / "teacher", tiny_models / "student"
    done = stage(tmp_path, t, s)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads((tmp_path / "out" / "manifest.json").read_text())["models"]
    tok = models.load_tokenizer(models.ModelRef(str(t), None), t, False)
    assert found["shared_tokenizer"] and found["vocab"] == len(tok) and found["cross_tokenizer"] == "none"
    for role, folder in (("teacher", t), ("student", s)):
        info = found[role]
        assert info["fingerprint"] == models.model_fingerprint(models.ModelRef(str(folder), None), folder)
        assert info["eos_token_ids"] == [tok.eos_token_id] and info["pad_token_id"] == tok.pad_token_id
        assert info["max_positions"] == 64 and info["weights"] == "safetensors"
        assert info["logit_width"] == len(tok) == info["tokenizer_length"]


def test_pickle_only_weights_are_refused_at_the_gate(tmp_path: Path, tiny_models: Path) -> None:
    t, tok = tiny_models / "teacher", models.build_char_tokenizer()
    model = models.load_model(models.ModelRef(str(t), None), t, False, "float32")
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    for f in pickled.glob("*.safetensors"):  # the same model as a pickle-only folder
        f.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(ModelError, match="only pickle weights"):
        gate(pickled, tiny_models / "student", tmp_path)
    refused(stage(tmp_path, pickled, tiny_models / "student"), "pickled", "only pickle weights", "pytorch_model.bin")


def test_a_tokenizer_without_chat_template_is_refused(tmp_path: Path, tiny_models: Path) -> None:
    bare = copy_model(tiny_models / "student", tmp_path / "bare")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    refused(stage(tmp_path, tiny_models / "teacher", bare), "bare", "no chat template")


def test_different_tokenizers_are_refused_naming_both_models(tmp_path: Path, tiny_models: Path) -> None:
    other = copy_model(tiny_models / "student", tmp_path / "other")
    tok = models.build_char_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    refused(
        stage(tmp_path, tiny_models / "teacher", other),
        str(tiny_models / "teacher"),
        str(other),
        "tokenizers differ",
        "cross_tokenizer",
    )


def test_logit_rows_fewer_than_the_tokenizer_are_refused(tmp_path: Path, tiny_models: Path) -> None:
    tok = models.build_char_tokenizer()
    small = models.build_toy_model(models.ToyArch(16, 1, 2, 32), len(tok) - 3, tok, seed=0, max_positions=64)
    basics.save_model(small, tok, tmp_path / "small")
    refused(stage(tmp_path, tmp_path / "small", tiny_models / "student"), "teacher", "logit rows")


def test_padded_logit_rows_pass_by_different_amounts(tmp_path: Path, tiny_models: Path) -> None:
    tok = models.build_char_tokenizer()
    for name, extra in (("t", 64), ("s", 16)):
        m = models.build_toy_model(models.ToyArch(16, 1, 2, 32), len(tok) + extra, tok, seed=0, max_positions=64)
        basics.save_model(m, tok, tmp_path / name)
    found = gate(tmp_path / "t", tmp_path / "s", tmp_path)
    assert (found["teacher"]["logit_width"], found["student"]["logit_width"]) == (len(tok) + 64, len(tok) + 16)
    assert found["vocab"] == len(tok)


def test_max_positions_below_prompt_plus_budget_are_refused_before_generating(
    tmp_path: Path, tiny_models: Path
) -> None:
    t = tiny_models / "teacher"
    ps = prompts(3)
    longest = max(len(encoding.prompt_ids(models.build_char_tokenizer(), p["prompt"])) for p in ps)
    ok, over = gp(max_new_tokens=64 - longest), gp(max_new_tokens=64 - longest + 1)
    spec = lambda p: sampling.EngineSpec(  # noqa: E731
        p=p, ref=models.ModelRef(str(t), None), model_dir=t, trust_remote_code=False, dtype="float32", fingerprint="x"
    )
    assert sampling.prompt_lengths(spec(ok), "teacher", ps) is not None
    with pytest.raises(ModelError, match=r"max positions 64 < the longest prompt .* teacher.max_new_tokens"):
        sampling.prompt_lengths(spec(over), "teacher", ps)
    work = tmp_path / "work"
    with pytest.raises(ModelError, match="max positions"):
        sampling.sample(
            "teacher", over, models.ModelRef(str(t), None), ps, t, work, trust_remote_code=False, dtype="float32"
        )
    assert not list(work.glob("**/*.parquet"))  # nothing was generated


def test_fingerprint_covers_tokenizer_chat_template_and_generation_config(tmp_path: Path, tiny_models: Path) -> None:
    m = copy_model(tiny_models / "teacher", tmp_path / "m")
    ref = models.ModelRef(str(m), None)
    seen = {models.model_fingerprint(ref, m)}
    edits = [
        ("generation_config.json", lambda c: c | {"eos_token_id": [c["eos_token_id"], 0]}),
        ("tokenizer_config.json", lambda c: c | {"chat_template": "{{ messages[0]['content'] }}"}),
        ("tokenizer.json", lambda c: c | {"added_tokens": c["added_tokens"][:-1]}),
    ]
    for name, edit in edits:
        f = m / name
        f.write_text(json.dumps(edit(json.loads(f.read_text()))))
        seen.add(models.model_fingerprint(ref, m))
    assert len(seen) == 4  # each edit changed the identity
    (m / "README.md").write_text("notes")
    (m / ".cache").mkdir()
    (m / ".cache" / "download.lock").write_text("x")
    assert models.model_fingerprint(ref, m) in seen  # docs and hidden caches do not


def test_identify_writes_the_same_bytes_until_a_folder_changes(tmp_path: Path, tiny_models: Path) -> None:
    t = copy_model(tiny_models / "teacher", tmp_path / "t")
    first = stage(tmp_path, t, tiny_models / "student")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "identity.json").read_bytes()
    stage(tmp_path, t, tiny_models / "student")
    assert (tmp_path / "identity.json").read_bytes() == before
    cfg = json.loads((t / "generation_config.json").read_text())
    (t / "generation_config.json").write_text(json.dumps(cfg | {"eos_token_id": [cfg["eos_token_id"], 1]}))
    stage(tmp_path, t, tiny_models / "student")
    after = json.loads((tmp_path / "identity.json").read_text())
    assert (tmp_path / "identity.json").read_bytes() != before
    assert after["teacher"]["fingerprint"] == models.model_fingerprint(models.ModelRef(str(t), None), t)


def test_a_missing_model_folder_is_named_as_such(tmp_path: Path) -> None:
    for where in (str(tmp_path / "nope"), "fixtures/realarch/teacher", "./model"):
        with pytest.raises(ModelError, match="no such model folder"):
            models.model_fingerprint(models.ModelRef(where, None), tmp_path)
    with pytest.raises(ModelError, match="needs a pinned `revision`"):
        models.model_fingerprint(models.ModelRef("Qwen/Qwen2.5-0.5B-Instruct", None), tmp_path)


def test_a_model_whose_logits_are_not_its_head_of_the_hidden_state_is_refused(tiny_models: Path) -> None:
    """train, score and evaluate all make logits as head(final hidden state); a model that
    scales or soft-caps them afterwards (here: a forward that doubles them) is refused."""
    t = tiny_models / "teacher"
    model = models.load_model(models.ModelRef(str(t), None), t, False, "float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    models.check_plain_head(model, ids, torch.ones_like(ids), "teacher")  # a plain Llama passes
    plain = model.forward

    def doubled(*args: object, **kwargs: object) -> object:
        out = plain(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    with pytest.raises(ModelError, match="models.teacher: logits are not the LM head"):
        models.check_plain_head(model, ids, torch.ones_like(ids), "teacher")
