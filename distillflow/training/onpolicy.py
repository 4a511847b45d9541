"""Online on-policy sampling inside a training run (`train.online`): every K optimizer
steps the student, from its current weights, samples a fresh response for each pair the
next K steps train on, and those responses replace the pairs' stored student responses
(the rejected side) for those steps.

    samples = sample(student, teacher, prompts, seeds, Sampler(vocab=V, max_new_tokens=64,
                     stop={eos}, teacher_mix=0.0, device="cpu"))
    # one (token ids, the sampler's log-prob of each) per prompt

Each response is drawn token by token at temperature 1 from the student's next-token
distribution q, or with `teacher_mix` a > 0 from MiniLLM's mix a p + (1 - a) q with the
teacher p, and the log-prob of each drawn token under that distribution is kept (the
behaviour log-prob MiniLLM's importance weights divide by). Each response has its own
generator seeded from (round seed, step, pair), so the draws do not depend on the batch
composition, the process count or a resume, and a run is reproducible on CPU.

The student samples in this process, one prompt at a time with its KV cache, between
optimizer steps: generation does not overlap training here. On a GPU machine the same
hook is where a vLLM engine holding the student's weights (reloaded every K steps) would
take over; that is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from distillflow.base import models
from distillflow.base.params import check

Tensor = torch.Tensor


@dataclass(frozen=True, kw_only=True)
class Sampler:
    vocab: int  # the shared vocabulary (rows past it are padding and never drawn)
    max_new_tokens: int
    stop: frozenset[int]  # token ids that end a response (kept as its last token)
    teacher_mix: float  # MiniLLM's a: the teacher's share of the sampling distribution
    device: str


def sample_seed(seed: int, step: int, pair: int) -> int:
    """The generator seed of one pair's response drawn at optimizer step `step`."""
    return ((seed * 1_000_003 + step) * 1_000_033 + pair) & 0x7FFFFFFFFFFF


def _next_logits(model: torch.nn.Module, ids: Tensor, cache: object | None) -> tuple[Tensor, object]:
    """The next-token logits after `ids`, fed on top of `cache`, and the grown cache."""
    key = models.cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True, **({key: cache} if cache is not None else {}))
    return out.logits[0, -1].float(), out[key]


def mixed_logprobs(s_logits: Tensor, t_logits: Tensor | None, mix: float, vocab: int) -> Tensor:
    """log of the sampling distribution over the shared vocabulary: log q, or
    log(a p + (1 - a) q) with the teacher's logits."""
    log_q = s_logits[:vocab].log_softmax(-1)
    if t_logits is None or mix == 0.0:
        return log_q
    log_p = t_logits[:vocab].log_softmax(-1)
    return torch.logaddexp(math.log(mix) + log_p, math.log1p(-mix) + log_q)


def sample_one(
    student: torch.nn.Module, teacher: torch.nn.Module | None, prompt: list[int], seed: int, s: Sampler
) -> tuple[list[int], list[float]]:
    """One response to `prompt`: (token ids, the sampler's log-prob of each)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt], device=s.device)
    s_logits, s_cache = _next_logits(student, ids, None)
    t_logits, t_cache = _next_logits(teacher, ids, None) if teacher is not None else (None, None)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(s.max_new_tokens):
        log_mix = mixed_logprobs(s_logits, t_logits, s.teacher_mix, s.vocab)
        token = int(torch.multinomial(log_mix.exp().cpu(), 1, generator=gen))
        tokens.append(token)
        logprobs.append(float(log_mix[token]))
        if token in s.stop:
            break
        nxt = torch.tensor([[token]], device=s.device)
        s_logits, s_cache = _next_logits(student, nxt, s_cache)
        if teacher is not None:
            t_logits, t_cache = _next_logits(teacher, nxt, t_cache)
    return tokens, logprobs


def sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    prompts: list[list[int]],
    seeds: list[int],
    s: Sampler,
) -> list[tuple[list[int], list[float]]]:
    """A response per prompt, from the student's current weights (in eval mode, without
    gradients; its train/eval mode is restored). `teacher` is only run with a teacher mix."""
    mixing = teacher if s.teacher_mix > 0.0 else None
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            return [sample_one(student, mixing, pr, seed, s) for pr, seed in zip(prompts, seeds, strict=True)]
    finally:
        student.train(was_training)


@dataclass(frozen=True)
class OnlineParams:
    """params.yaml `train.online`."""

    every: int  # K: optimizer steps between samplings from the current student; 0 = off (the pairs' responses)
    max_new_tokens: int  # the longest response sampled
    # who scores the samples: model, the teacher model in this process | served, the teacher behind
    # score.openai (the log-prob of each sampled token only: opd, with teacher_signal topk)
    teacher: Literal["model", "served"]

    def __post_init__(self) -> None:
        check(self.teacher in ("model", "served"), "teacher", f"must be model or served, got {self.teacher!r}")
        check(self.every >= 0, "every", "must be >= 0 (0 = train on the pairs' stored student responses)")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
