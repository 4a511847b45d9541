"""A small, real OpenAI-compatible server for tests: a tiny local model behind
`POST /v1/chat/completions` and `POST /v1/completions` (token-id prompts with vLLM's
`prompt_logprobs`, what a served teacher's scores need) on 127.0.0.1 (FastAPI + uvicorn,
already installed for Prefect's server).

Why not `transformers serve`: in transformers 5.23 it always loads models with a
`device_map`, which needs `accelerate`, not a dependency here; and tests need what no
stock server offers: counting requests, measuring how many are in flight, and failing
on purpose (429, 500, with the headers a test gives) to exercise retries. tests/test_openai_engine.py also runs the
engine against `transformers serve` itself wherever `accelerate` is importable.

The model runs with transformers `generate` on the prompt rendered through the
tokenizer's chat template; sampling honours temperature, top_p, max_tokens, seed and
stop, as the OpenAI API describes them. One request generates at a time (a lock), but
requests overlap while they wait `delay_s` first, so concurrency is observable.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass(kw_only=True)
class ServerState:
    delay_s: float = 0.0  # each request waits this long before generating (overlap)
    # what to answer the next requests with: a status code, or (status code, response headers);
    # a bare 429 comes with `retry-after: 0`
    faults: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: int = 0  # every request received, failed ones included
    answered: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    starts: list[float] = field(default_factory=list)  # time.monotonic() at each request's arrival
    lock: threading.Lock = field(default_factory=threading.Lock)
    # /v1/completions: answer vLLM's prompt_logprobs (off: a server without the extension ignores it)
    prompt_logprobs: bool = True
    # /v1/completions: answer `echo` with `logprobs` in the API's own form (off: no logprobs come back)
    echo: bool = True
    echo_shift: int = 0  # echo each prompt token as the id this much higher: a server whose tokens differ
    echo_ids: bool = False  # name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids) instead of their text


def build_app(model_dir: Path, state: ServerState) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    generate_lock = threading.Lock()
    app = FastAPI()

    def complete(body: dict[str, Any]) -> dict[str, Any]:
        text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        temperature = float(body.get("temperature", 1.0))
        stop = body.get("stop") or None
        with generate_lock, torch.no_grad():
            torch.manual_seed(int(body.get("seed", 0)))
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(body["max_tokens"]),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=float(body.get("top_p", 1.0)) if temperature > 0 else None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                stop_strings=stop,
                tokenizer=tok if stop else None,
            )[0, ids.shape[1] :].tolist()
        finish = "length"
        if tok.eos_token_id in out:
            out, finish = out[: out.index(tok.eos_token_id) + 1], "stop"
        content = tok.decode(out, skip_special_tokens=True)
        for s in stop or []:
            if s in content:
                content, finish = content[: content.index(s)], "stop"
        return {
            "id": f"chatcmpl-{state.answered}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "system_fingerprint": "tiny-test-server",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": ids.shape[1],
                "completion_tokens": len(out),
                "total_tokens": ids.shape[1] + len(out),
            },
        }

    def scored(body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's completions with a token-id prompt: one greedy token and, with
        `prompt_logprobs: k`, per prompt position after the first the k most likely tokens
        and the token there, each {logprob, rank, decoded_token}."""
        prompt = body["prompt"]
        ids = torch.tensor([prompt if isinstance(prompt, list) else tok(prompt, add_special_tokens=False)["input_ids"]])
        with generate_lock, torch.no_grad():
            lp = model(input_ids=ids).logits[0, :, : len(tok)].float().log_softmax(-1)  # (T, V)
        k = body.get("prompt_logprobs")
        entries: list[dict[str, Any] | None] = [None]
        for j in range(1, ids.shape[1]):
            row, ranks = lp[j - 1], lp[j - 1].argsort(descending=True).argsort() + 1
            keep = [*row.topk(int(k)).indices.tolist(), int(ids[0, j])] if k else [int(ids[0, j])]
            entries.append(
                {
                    str(t): {"logprob": float(row[t]), "rank": int(ranks[t]), "decoded_token": tok.decode([t])}
                    for t in keep
                }
            )
        choice: dict[str, Any] = {"index": 0, "text": tok.decode([int(lp[-1].argmax())]), "finish_reason": "length"}
        if k is not None and state.prompt_logprobs:
            choice["prompt_logprobs"] = entries
        if body.get("echo") and body.get("logprobs") is not None and state.echo:
            choice["logprobs"] = echoed(ids[0].tolist(), lp, int(body["logprobs"]))
        return {
            "id": f"cmpl-{state.answered}",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": 1, "total_tokens": ids.shape[1] + 1},
        }

    def echoed(prompt: list[int], lp: torch.Tensor, k: int) -> dict[str, Any]:
        """The completions API's `logprobs` with `echo`: per prompt token its text, its
        log-prob and the k most likely tokens' texts and log-probs (None at the first), then
        the one generated token."""

        def name(t: int) -> str:
            return f"token_id:{t}" if state.echo_ids else tok.decode([t])

        shown = [min(t + state.echo_shift, len(tok) - 1) for t in prompt]
        texts = [name(t) for t in shown]
        top: list[dict[str, float] | None] = [None]
        own: list[float | None] = [None]
        for j in range(1, len(prompt)):
            top.append({name(t): float(lp[j - 1, t]) for t in lp[j - 1].topk(k).indices.tolist()})
            own.append(float(lp[j - 1, prompt[j]]))
        nxt = int(lp[-1].argmax())
        return {
            "tokens": [*texts, name(nxt)],
            "token_logprobs": [*own, float(lp[-1, nxt])],
            "top_logprobs": [*top, {name(nxt): float(lp[-1, nxt])}],
            "text_offset": list(range(len(prompt) + 1)),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        with state.lock:
            state.requests += 1
        answer = await run_in_threadpool(scored, await request.json())
        with state.lock:
            state.answered += 1
        return JSONResponse(answer)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        with state.lock:
            state.requests += 1
            state.starts.append(time.monotonic())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            fault = state.faults.pop(0) if state.faults else None
        try:
            await asyncio.sleep(state.delay_s)
            if fault is not None:
                fault, headers = (
                    fault if isinstance(fault, tuple) else (fault, {"retry-after": "0"} if fault == 429 else {})
                )
                return JSONResponse(
                    {"error": {"message": f"injected {fault}", "type": "test", "code": fault}},
                    status_code=fault,
                    headers=headers,
                )
            body = await request.json()
            answer = await run_in_threadpool(complete, body)
            with state.lock:
                state.answered += 1
            return JSONResponse(answer)
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


class Server:
    """The app served by uvicorn in a background thread on 127.0.0.1 (a free port)."""

    def __init__(self, model_dir: Path) -> None:
        self.state = ServerState()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        config = uvicorn.Config(build_app(model_dir, self.state), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test OpenAI server did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
