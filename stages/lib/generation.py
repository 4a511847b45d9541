"""One generation interface, two engines, one record schema.

`generate(...)` takes prompt records and returns generation records
(records.GENERATION_SCHEMA rows), `num_samples` per prompt, in prompt order.

- transformers (default; CPU or GPU): prompts sorted by token length and cut into
  batches (length bucketing, so little compute goes to padding), left-padded,
  KV-cached `generate`, seeded per batch so the same params give the same outputs.
- vllm (extra `distillflow[vllm]`, GPU): `LLM(...).generate` with `SamplingParams`,
  prompts rendered through the same chat template.

Either way each record says why generation stopped ("stop": an eos token; "length":
max_new_tokens reached) and how many tokens the prompt and response have.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import Any, Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.lib import records
from stages.lib.config import GenerationParams
from stages.lib.encoding import prompt_ids

log = logging.getLogger(__name__)


def sampling_record(p: GenerationParams) -> dict[str, Any]:
    """What determines an output besides the model and prompt: hashed into ids."""
    return {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_new_tokens": p.max_new_tokens,
        "num_samples": p.num_samples,
        "seed": p.seed,
        "batch_size": p.batch_size,
    }


def stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a response: the tokenizer's eos and the model's."""
    ids = {tok.eos_token_id}
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    return ids


def _record(prompt: dict[str, Any], k: int, text: str, finish: str, n_prompt: int, n_resp: int, fp: str, engine: str, sampling: dict[str, Any]) -> dict[str, Any]:
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
    }


@torch.no_grad()
def generate_transformers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[dict[str, Any]],
    p: GenerationParams,
    fingerprint: str,
    desc: str = "generate",
) -> list[dict[str, Any]]:
    """Batched, length-bucketed, left-padded generation with the transformers engine."""
    engine = f"transformers {version('transformers')}"
    sampling = sampling_record(p)
    ends = stop_ids(model, tok)
    encoded = [prompt_ids(tok, pr["prompt"]) for pr in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    out: dict[int, list[dict[str, Any]]] = {}
    device = next(model.parameters()).device
    batches = [order[s : s + p.batch_size] for s in range(0, len(order), p.batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=desc, unit="batch", mininterval=2.0)):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attn[row, width - len(encoded[i]) :] = 1
        # One seed per batch: reruns with the same params and prompts repeat exactly.
        torch.manual_seed(p.seed * 1_000_003 + b)
        greedy = p.temperature == 0.0
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=p.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else p.temperature,
            top_p=None if greedy else p.top_p,
            top_k=None,
            num_return_sequences=p.num_samples,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(ends),
        )[:, width:].cpu()
        for row, i in enumerate(idx):
            rows = []
            for k in range(p.num_samples):
                new = generated[row * p.num_samples + k].tolist()
                stop_at = next((j for j, t in enumerate(new) if t in ends), None)
                if stop_at is None:
                    body, finish, n_resp = new, "length", len(new)
                else:
                    body, finish, n_resp = new[:stop_at], "stop", stop_at + 1
                text = tok.decode(body, skip_special_tokens=True)
                rows.append(_record(prompts[i], k, text, finish, len(encoded[i]), n_resp, fingerprint, engine, sampling))
            out[i] = rows
    return [r for i in range(len(prompts)) for r in out[i]]


def generate_vllm(
    where: str,
    revision: str | None,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[dict[str, Any]],
    p: GenerationParams,
    fingerprint: str,
    dtype: str,
    trust_remote_code: bool,
) -> list[dict[str, Any]]:
    """Generation with vLLM's offline API (`LLM.generate`), same records as above.

    Prompts are rendered to token ids with the same chat template as the transformers
    engine and handed over as token prompts, so both engines see identical inputs.
    """
    from vllm import LLM, SamplingParams  # optional extra: imported only when chosen

    engine = f"vllm {version('vllm')}"
    sampling = sampling_record(p)
    llm = LLM(
        model=where,
        revision=revision,
        tokenizer=where,
        tokenizer_revision=revision,
        dtype=dtype,
        seed=p.seed,
        tensor_parallel_size=p.tensor_parallel_size,
        trust_remote_code=trust_remote_code,
    )
    params = SamplingParams(
        n=p.num_samples,
        temperature=p.temperature,
        top_p=p.top_p,
        max_tokens=p.max_new_tokens,
        seed=p.seed,
    )
    encoded = [prompt_ids(tok, pr["prompt"]) for pr in prompts]
    results = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
    rows = []
    for pr, ids, res in zip(prompts, encoded, results):
        for k, o in enumerate(res.outputs):
            finish = "stop" if o.finish_reason == "stop" else "length"
            rows.append(_record(pr, k, o.text, finish, len(ids), len(o.token_ids), fingerprint, engine, sampling))
    return rows
