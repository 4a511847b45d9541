"""The openai engine against real OpenAI-compatible servers on 127.0.0.1.

Mostly tests/openai_server.py (a tiny local model behind /v1/chat/completions, with
request counting and injected failures); one test runs `transformers serve` itself
where `accelerate` is importable (its model loading needs it).
"""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distillflow.base import io, models, records
from distillflow.base.config import GenerationParams, OpenAIParams
from distillflow.base.encoding import prompt_ids
from distillflow.engines.generation import Shard, sample_seed
from distillflow.engines.openai_engine import OpenAIEngine
from distillflow.stagekit import genstage
from stages import seed

from .builders import TASK, prompts, seed_params
from .conftest import ROOT
from .openai_server import Server

pytest.importorskip(
    "openai", reason="the openai engine needs the openai client (extra distillflow[openai], in the test extra)"
)


@pytest.fixture(scope="module")
def server(tiny_models: Path) -> Iterator[Server]:
    with Server(tiny_models / "teacher") as s:
        yield s


@pytest.fixture(autouse=True)
def fresh_state(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        st = request.getfixturevalue("server").state
        with st.lock:
            st.delay_s, st.faults, st.requests, st.answered, st.in_flight, st.max_in_flight, st.starts = (
                0.0,
                [],
                0,
                0,
                0,
                0,
                [],
            )


def api(base_url: str, cache: Path, **kw: object) -> GenerationParams:
    o = OpenAIParams(
        base_url=base_url,
        model="tiny",
        api_key_env=None,
        max_concurrency=4,
        requests_per_second=1000.0,
        max_retries=3,
        timeout_s=30.0,
        cache_dir=str(cache),
    )
    base: dict = dict(
        engine="openai",
        batch_size=4,
        max_new_tokens=6,
        temperature=1.0,
        top_p=0.9,
        num_samples=2,
        seed=7,
        tensor_parallel_size=1,
        device="cpu",
        stop=(),
        shard_size=0,
        workers=1,
        openai=o,
    )
    openai_kw = {k[len("openai_") :]: kw.pop(k) for k in list(kw) if k.startswith("openai_")}
    return GenerationParams(**{**base, **kw, "openai": replace(o, **openai_kw)})


def run_all(p: GenerationParams, ps: list[dict]) -> tuple[list[dict], OpenAIEngine]:
    engine = OpenAIEngine(p)
    return engine.generate(ps, Shard(0, tuple(range(len(ps))), 0)), engine


def test_records_tokens_and_a_rerun_served_from_the_cache(server: Server, tiny_models: Path, tmp_path: Path) -> None:
    ps = prompts(5)
    p = api(server.base_url, tmp_path / "cache")
    rows, engine = run_all(p, ps)
    assert server.state.requests == 10 and engine.requests == 10 and engine.cache_hits == 0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 10
    tok = models.load_tokenizer(models.ModelRef("toy", None), tiny_models / "teacher", False)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(pr["prompt_id"], k) for pr in ps for k in (0, 1)]
    for r, pr in zip(rows, [pr for pr in ps for _ in (0, 1)]):
        # the server applied the same chat template the local engines apply
        assert r["prompt_tokens"] == len(prompt_ids(tok, pr["prompt"]))
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["response_tokens"] <= 6
        assert r["engine"].startswith("openai ") and r["model"] == f"openai:tiny@{server.base_url}"
        assert json.loads(r["sampling"]) == {
            "engine": "openai",
            "temperature": 1.0,
            "top_p": 0.9,
            "max_new_tokens": 6,
            "num_samples": 2,
            "seed": 7,
        }
    entry = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
    assert entry["request"]["seed"] in {sample_seed(7, pr["prompt_id"], str(k)) for pr in ps for k in (0, 1)}
    assert entry["response"]["served_model"] == "tiny"

    again, engine2 = run_all(p, ps)
    assert again == rows
    assert server.state.requests == 10 and engine2.requests == 0 and engine2.cache_hits == 10  # a rerun pays nothing
    changed, _ = run_all(api(server.base_url, tmp_path / "cache", seed=8), ps)
    assert server.state.requests == 20  # other seeds: other requests
    assert {r["generation_id"] for r in changed}.isdisjoint({r["generation_id"] for r in rows})


FAST = {"retry-after-ms": "10"}  # the client honours it: retries without its 0.5 s, 1 s, ... backoff


def test_retries_on_429_and_5xx_then_succeeds(server: Server, tmp_path: Path) -> None:
    ps = prompts(3)
    server.state.faults = [(429, FAST), (500, FAST), (503, FAST)]
    rows, engine = run_all(api(server.base_url, tmp_path / "c", num_samples=1, openai_max_concurrency=1), ps)
    assert len(rows) == 3
    assert server.state.requests == 6 and server.state.answered == 3 and engine.requests == 6
    # the same records as without the failures
    again, _ = run_all(api(server.base_url, tmp_path / "fresh", num_samples=1, openai_max_concurrency=1), ps)
    assert again == rows


def test_retry_after_as_an_http_date_is_waited_for(server: Server, tmp_path: Path) -> None:
    """Retry-After: <HTTP date> 3 s ahead (whole seconds: 2 to 3 s from now); the client's own
    backoff would wait 0.5 s at most."""
    server.state.faults = [(429, {"retry-after": email.utils.formatdate(time.time() + 3, usegmt=True)})]
    rows, engine = run_all(api(server.base_url, tmp_path / "c", num_samples=1), prompts(1))
    assert len(rows) == 1 and server.state.requests == 2 and engine.requests == 2
    waited = server.state.starts[1] - server.state.starts[0]
    assert 1.9 <= waited <= 4.0, waited


def test_retries_are_counted_and_rate_limited(server: Server, tmp_path: Path) -> None:
    server.state.faults = [(500, {"retry-after-ms": "1"}), (503, {"retry-after-ms": "1"})]
    p = api(server.base_url, tmp_path / "c", num_samples=1, openai_requests_per_second=4.0)
    rows, engine = run_all(p, prompts(1))
    assert len(rows) == 1 and server.state.requests == 3 and engine.requests == 3
    starts = server.state.starts
    assert all(b - a >= 0.25 * 0.9 for a, b in zip(starts, starts[1:])), starts  # 4 per second, retries too


def test_gives_up_after_max_retries_naming_the_prompt(server: Server, tmp_path: Path) -> None:
    ps = prompts(2)
    server.state.faults = [(500, FAST), (500, FAST), (500, FAST)]
    with pytest.raises(
        RuntimeError,
        match=rf"prompt {ps[0]['prompt_id']}, sample 0: failed after 3 attempts \(openai.max_retries = 2\)",
    ):
        run_all(api(server.base_url, tmp_path / "c", num_samples=1, openai_max_concurrency=1, openai_max_retries=2), ps)
    # the queued request for the second prompt was never sent
    assert server.state.requests == 3


def test_client_errors_are_not_retried(server: Server, tmp_path: Path) -> None:
    server.state.faults = [401]
    with pytest.raises(
        RuntimeError, match=r"HTTP 401, not retried \(check the key in the variable openai.api_key_env names\)"
    ):
        run_all(api(server.base_url, tmp_path / "c", num_samples=1, openai_max_concurrency=1), prompts(1))
    assert server.state.requests == 1


def test_concurrency_cap_is_reached_and_never_exceeded(server: Server, tmp_path: Path) -> None:
    server.state.delay_s = 0.3
    rows, _ = run_all(api(server.base_url, tmp_path / "c", num_samples=3, openai_max_concurrency=3), prompts(3))
    assert len(rows) == 9
    assert server.state.max_in_flight == 3


def test_rate_limit_spaces_request_starts(server: Server, tmp_path: Path) -> None:
    rows, _ = run_all(
        api(server.base_url, tmp_path / "c", num_samples=1, openai_max_concurrency=6, openai_requests_per_second=10.0),
        prompts(6),
    )
    starts = sorted(server.state.starts)
    assert len(rows) == 6 and len(starts) == 6
    assert starts[-1] - starts[0] >= 5 / 10.0 * 0.9  # 6 starts, at most 10 per second


def test_missing_api_key_variable_is_named(tmp_path: Path) -> None:
    os.environ.pop("DISTILLFLOW_TEST_KEY", None)
    with pytest.raises(
        ValueError, match="openai.api_key_env: the environment variable 'DISTILLFLOW_TEST_KEY' is not set"
    ):
        OpenAIEngine(api("http://127.0.0.1:9/v1", tmp_path / "c", openai_api_key_env="DISTILLFLOW_TEST_KEY"))


def test_teacher_stage_with_the_openai_engine(server: Server, tiny_models: Path, tmp_path: Path) -> None:
    """`python -m stages.teacher` end to end against the server; a rerun sends nothing."""
    sp = seed_params(num_train=6, num_eval=1)
    train, _, _, _ = seed.run(TASK, sp, seed.source_rows(TASK, sp))
    io.write_table(tmp_path / "seed" / "train.parquet", train, records.PROMPT_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["teacher"].update(engine="openai", num_samples=2, max_new_tokens=5, shard_size=4)
    params["teacher"]["openai"].update(
        base_url=server.base_url, model="tiny", requests_per_second=100.0, cache_dir=str(tmp_path / "cache")
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "stages.teacher",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prompts",
        str(tmp_path / "seed"),
        "--models",
        str(tiny_models),
        "--out",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    table = pq.read_table(tmp_path / "out" / "generations.parquet")
    assert table.num_rows == 12 and server.state.requests == 12
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["engine"].startswith("openai ") and manifest["sampling"]["seed"] == params["teacher"]["seed"]
    assert manifest["model"] == {
        "endpoint": server.base_url,
        "model": "tiny",
        "fingerprint": f"openai:tiny@{server.base_url}",
    }
    assert "per request" in manifest["seeding"]
    assert not (tmp_path / "out.shards").exists()
    first = (tmp_path / "out" / "generations.parquet").read_bytes()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    assert server.state.requests == 12  # every answer came from the cache
    assert (tmp_path / "out" / "generations.parquet").read_bytes() == first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_transformers_serve(tiny_models: Path, tmp_path: Path) -> None:
    """The engine against `transformers serve` itself (needs accelerate for its loader)."""
    pytest.importorskip(
        "accelerate", reason="transformers serve loads models with a device_map, which needs accelerate"
    )
    exe = shutil.which("transformers")
    if exe is None:
        pytest.skip("no `transformers` command on PATH")
    port = free_port()
    model = str(tiny_models / "teacher")
    proc = subprocess.Popen(
        [exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                    raise RuntimeError(f"transformers serve did not come up: {tail}") from None
                time.sleep(0.5)
        ps = prompts(3)
        p = api(f"http://127.0.0.1:{port}/v1", tmp_path / "cache", openai_model=model, num_samples=1, max_new_tokens=5)
        rows, engine = run_all(p, ps)
        tok = models.load_tokenizer(models.ModelRef("toy", None), tiny_models / "teacher", False)
        assert [r["prompt_tokens"] for r in rows] == [len(prompt_ids(tok, pr["prompt"])) for pr in ps]
        assert all(1 <= r["response_tokens"] <= 5 for r in rows) and engine.requests == 3
        again, engine2 = run_all(p, ps)
        assert again == rows and engine2.requests == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_genstage_fingerprint_names_the_endpoint(tmp_path: Path) -> None:
    p = api("http://127.0.0.1:9/v1", tmp_path / "c")
    assert (
        genstage.generation_fingerprint(p, models.ModelRef("toy", None), tmp_path)
        == "openai:tiny@http://127.0.0.1:9/v1"
    )
