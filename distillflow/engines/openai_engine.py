"""The `openai` generation engine: any OpenAI-compatible chat endpoint as a black box.

Black-box teachers (hosted APIs, or a vLLM / `transformers serve` server elsewhere)
answer `POST {base_url}/chat/completions`. Each (prompt, sample) is one request:

    {"model": openai.model, "messages": [{"role": "user", "content": prompt}],
     "temperature", "top_p", "max_tokens": max_new_tokens, "seed": per-request seed,
     "stop": stop strings (when any)}

so the server applies the model's chat template, and servers without `n` (transformers
serve) work. The per-request seed is `sample_seed(seed, prompt_id, sample_index)`.

- Concurrency: at most `max_concurrency` requests in flight (a thread pool).
- Rate: request starts (retries included) at most `requests_per_second`.
- Retries: the openai client's own (`max_retries` = openai.max_retries): 408, 409,
  429, 5xx, timeouts and connection errors, waiting 0.5 s doubled per retry up to
  8 s, less up to 25% jitter, or what the server's Retry-After / retry-after-ms says
  (seconds or an HTTP date, up to 120 s; longer is not retried); other errors (400,
  401, 404, ...) fail at once, naming the prompt. Every attempt passes an httpx request
  hook, which waits for the rate limiter and counts it, so retries are limited and
  counted like first attempts.
- Cache: every successful response is stored as a file under `cache_dir`, keyed by
  the hash of (base_url, the request body): endpoint, model, messages, sampling and the
  sample's seed. A rerun, or a resumed shard, sends only the requests not answered
  before. The cache sits outside DVC's outs (data/.cache/ by default, ignored by git),
  so the stage's outputs stay a function of its inputs; delete it to pay again.

Token counts come from the response's `usage`; the record's `model` column is
`openai:<model>@<base_url>`, its engine "openai <client version>". The openai Python
client (extra `distillflow[openai]`) does the HTTP and the retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distillflow.base import records
from distillflow.base.config import GenerationParams, OpenAIParams
from distillflow.base.io import DataError, atomic_path
from distillflow.engines.generation import Prompts, Shard, engine_version, record, sample_seed, sampling_record

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429}  # and every 5xx: what the openai client retries
FINISH = {"stop": "stop", "length": "length"}


def endpoint_fingerprint(o: OpenAIParams) -> str:
    """The model's identity in records: the same id at another endpoint may be another model."""
    return f"openai:{o.model}@{o.base_url}"


class RateLimiter:
    """Request starts spaced at least 1 / per_second apart, across threads."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class ResponseCache:
    """One JSON file per answered request: `<dir>/<key[:2]>/<key>.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        f = self.path(key)
        if not f.is_file():
            return None
        try:
            entry = json.loads(f.read_text())
            return entry["response"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"{f}: not a response cache entry ({exc}); delete the file to request it again") from exc

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        with atomic_path(self.path(key)) as tmp:
            tmp.write_text(
                json.dumps({"request": request, "response": response}, sort_keys=True, ensure_ascii=False, indent=1)
                + "\n"
            )


class Endpoint:
    """One OpenAI-compatible endpoint (`<role>.openai`): the client with its retries, the
    rate limiter, the response cache and the counters every request goes through. The
    generation engine (chat completions) and the served teacher's scorer (completions,
    distillflow/engines/served.py) both send through `cached`."""

    def __init__(self, o: OpenAIParams | None, role: str) -> None:
        import openai  # optional extra: imported only when chosen

        if o is None or not o.is_set:
            raise ValueError(f"{role}: engine openai needs openai.base_url and openai.model")
        self.o = o
        self.fingerprint = endpoint_fingerprint(o)
        self.openai = openai
        self.limiter = RateLimiter(o.requests_per_second)
        self.cache = ResponseCache(Path(o.cache_dir))
        self.requests = 0  # sent to the endpoint, retries included
        self.cache_hits = 0
        self.count_lock = threading.Lock()
        self.failed = threading.Event()  # set when a request gave up: send no more
        self.call = threading.local()  # the request this thread's create() is sending: where, attempts
        self.client = openai.OpenAI(
            base_url=o.base_url,
            api_key=self.api_key(),
            max_retries=o.max_retries,
            timeout=o.timeout_s,
            # the client's defaults (timeouts, limits, redirects), plus the hook every attempt passes
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [self.on_request]}),
        )

    def on_request(self, request: Any) -> None:
        """Every HTTP attempt, first or retry: wait for the rate limiter, count it."""
        self.limiter.wait()
        with self.count_lock:
            self.requests += 1
        self.call.attempts = getattr(self.call, "attempts", 0) + 1
        if self.call.attempts > 1:
            log.warning("%s: attempt %d (retry %d)", self.call.where, self.call.attempts, self.call.attempts - 1)

    def api_key(self) -> str:
        env = self.o.api_key_env
        if env is None:
            return "none"  # local servers take any key; the client insists on one
        key = os.environ.get(env)
        if not key:
            raise ValueError(
                f"openai.api_key_env: the environment variable {env!r} is not set (it must hold the endpoint's API key)"
            )
        return key

    def cache_key(self, body: dict[str, Any]) -> str:
        return hashlib.sha256(records.canonical_json({"base_url": self.o.base_url, "body": body}).encode()).hexdigest()

    def cached(
        self, where: str, body: dict[str, Any], send: Callable[..., Any], parse: Callable[[Any], dict[str, Any]]
    ) -> dict[str, Any]:
        """The parsed response to `body`: from the cache, or sent with `send(**body)` (a
        client method), parsed and cached. `where` names the request in errors."""
        key = self.cache_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            with self.count_lock:
                self.cache_hits += 1
            return cached
        if self.failed.is_set():
            raise RuntimeError(f"{where}: not sent, an earlier request failed")
        response = parse(self.request(where, body, send))
        self.cache.put(key, {"base_url": self.o.base_url, **body}, response)
        return response

    def request(self, where: str, body: dict[str, Any], send: Callable[..., Any]) -> Any:
        self.call.where, self.call.attempts = where, 0
        try:
            return send(**body)
        except self.openai.APIStatusError as exc:
            self.failed.set()
            status, attempts = exc.status_code, self.call.attempts
            if attempts == 1 and not (status in RETRY_STATUS or status >= 500):
                hint = " (check the key in the variable openai.api_key_env names)" if status in (401, 403) else ""
                raise RuntimeError(f"{where}: HTTP {status}, not retried{hint}: {exc.message}") from exc
            raise RuntimeError(self.gave_up(where, attempts, exc)) from exc
        except (self.openai.APIConnectionError, self.openai.APITimeoutError) as exc:  # timeouts are both
            self.failed.set()
            raise RuntimeError(self.gave_up(where, self.call.attempts, exc)) from exc

    def gave_up(self, where: str, attempts: int, error: Exception) -> str:
        return f"{where}: failed after {attempts} attempts (openai.max_retries = {self.o.max_retries}): {error}"


class OpenAIEngine(Endpoint):
    """Chat completions from an OpenAI-compatible endpoint, cached per request."""

    def __init__(self, p: GenerationParams) -> None:
        super().__init__(p.openai, "openai")
        self.p = p
        self.name = engine_version("openai")
        self.sampling = sampling_record(p)

    def body(self, prompt: dict[str, Any], k: int) -> dict[str, Any]:
        p = self.p
        body: dict[str, Any] = {
            "model": self.o.model,
            "messages": [{"role": "user", "content": prompt["prompt"]}],
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens,
            "seed": sample_seed(p.seed, prompt["prompt_id"], str(k)),
        }
        if p.stop:
            body["stop"] = list(p.stop)
        return body

    def complete(self, prompt: dict[str, Any], k: int) -> dict[str, Any]:
        """The response for (prompt, sample k): from the cache, or from the endpoint."""
        where = f"openai engine ({self.o.base_url}), prompt {prompt['prompt_id']}, sample {k}"
        return self.cached(
            where, self.body(prompt, k), self.client.chat.completions.create, lambda r: self.parse(prompt, k, r)
        )

    def parse(self, prompt: dict[str, Any], k: int, resp: Any) -> dict[str, Any]:
        where = f"openai engine ({self.o.base_url}), prompt {prompt['prompt_id']}, sample {k}"
        if not resp.choices:
            raise DataError(f"{where}: the response has no choices")
        choice = resp.choices[0]
        if choice.finish_reason not in FINISH:
            raise DataError(f"{where}: finish_reason {choice.finish_reason!r}; only 'stop' and 'length' make a record")
        if choice.message.content is None:
            raise DataError(f"{where}: the response's message has no content")
        if resp.usage is None:
            raise DataError(f"{where}: the response has no `usage`; token counts come from it")
        if resp.usage.completion_tokens > self.p.max_new_tokens:
            raise DataError(
                f"{where}: {resp.usage.completion_tokens} completion tokens > max_new_tokens"
                f" {self.p.max_new_tokens}; the endpoint ignored max_tokens"
            )
        return {
            "text": choice.message.content,
            "finish_reason": FINISH[choice.finish_reason],
            "prompt_tokens": resp.usage.prompt_tokens,
            "completion_tokens": resp.usage.completion_tokens,
            "served_model": resp.model,
            "system_fingerprint": resp.system_fingerprint,
        }

    def generate(self, prompts: Prompts, shard: Shard) -> list[dict[str, Any]]:
        jobs = [(i, k) for i in shard.prompts for k in range(self.p.num_samples)]
        sent, hits = self.requests, self.cache_hits
        with ThreadPoolExecutor(max_workers=self.o.max_concurrency) as pool:
            futures = [pool.submit(self.complete, prompts[i], k) for i, k in jobs]
            try:
                answers = [f.result() for f in futures]
            except BaseException:
                # requests in flight finish (and are cached); queued ones are never sent
                self.failed.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        log.info(
            "openai engine: shard %d: %d answers, %d from the cache, %d requests sent",
            shard.index,
            len(jobs),
            self.cache_hits - hits,
            self.requests - sent,
        )
        return [
            record(
                prompts[i],
                k,
                a["text"],
                a["finish_reason"],
                a["prompt_tokens"],
                a["completion_tokens"],
                self.fingerprint,
                self.name,
                self.sampling,
            )
            for (i, k), a in zip(jobs, answers, strict=True)
        ]
