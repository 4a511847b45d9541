"""Online on-policy sampling inside a training run (`train.online`): every K optimizer
steps the student, from its current weights, samples a fresh response for each pair the
next K steps train on, and those responses replace the pairs' stored student responses
(the rejected side) for those steps.

    samples = sample(student, teacher, prompts, seeds, Sampler(vocab=V, max_new_tokens=64,
                     stop={eos}, teacher_mix=0.0, device="cpu", pad=pad_id, batch_size=32))
    # one (token ids, the sampler's log-prob of each) per prompt

Each response is drawn token by token at temperature 1 from the student's next-token
distribution q, or with `teacher_mix` a > 0 from MiniLLM's mix a p + (1 - a) q with the
teacher p, and the log-prob of each drawn token under that distribution is kept (the
behaviour log-prob MiniLLM's importance weights divide by). Each response has its own
generator seeded from (round seed, step, pair), so the draws do not depend on the batch
composition, the process count or a resume (up to float rounding: left padding changes
logits in the last bits), and a run is reproducible on CPU.

The student samples in this process, `batch_size` prompts at a time (left-padded, KV
cached, position ids counting each row's real tokens), between optimizer steps:
generation does not overlap training here. On a GPU machine the same
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
    pad: int  # the id filling a left-padded row (masked out)
    batch_size: int  # prompts decoded at once


def sample_seed(seed: int, step: int, pair: int) -> int:
    """The generator seed of one pair's response drawn at optimizer step `step`."""
    return ((seed * 1_000_003 + step) * 1_000_033 + pair) & 0x7FFFFFFFFFFF


class Stepper:
    """One model decoding a batch of left-padded prompts with its KV cache: `logits` (B, V)
    are the next-token logits of each row. Position ids count each row's real tokens, so
    a row's positions do not depend on the padding the other rows put before it."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], pad: int, device: str) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            self.mask[row, width - len(p) :] = 1
        self.model, self.key, self.device, self.cache = model, models.cache_kwarg(model), device, None
        self.logits = self.feed(ids)

    def feed(self, ids: Tensor) -> Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        kw = {self.key: self.cache} if self.cache is not None else {}
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **kw,
        )
        self.cache = out[self.key]
        return out.logits[:, -1].float().cpu()

    def step(self, tokens: Tensor, live: Tensor) -> None:
        """Append one token per row (rows no longer `live` get a masked-out one)."""
        self.mask = torch.cat([self.mask, live.long()[:, None]], dim=1)
        self.logits = self.feed(tokens[:, None])


def mixed_logprobs(s_logits: Tensor, t_logits: Tensor | None, mix: float, vocab: int) -> Tensor:
    """log of the sampling distribution over the shared vocabulary (last dim): log q, or
    log(a p + (1 - a) q) with the teacher's logits."""
    log_q = s_logits[..., :vocab].log_softmax(-1)
    if t_logits is None or mix == 0.0:
        return log_q
    log_p = t_logits[..., :vocab].log_softmax(-1)
    return torch.logaddexp(math.log(mix) + log_p, math.log1p(-mix) + log_q)


def sample_batch(
    student: torch.nn.Module, teacher: torch.nn.Module | None, prompts: list[list[int]], seeds: list[int], s: Sampler
) -> list[tuple[list[int], list[float]]]:
    """One response per prompt, decoded together: (token ids, the sampler's log-prob of
    each). Each row draws from its own generator, so its tokens depend on its seed only."""
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    steppers = [Stepper(m, prompts, s.pad, s.device) for m in (student, teacher) if m is not None]
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    live = torch.ones(len(prompts), dtype=torch.bool)
    for _ in range(s.max_new_tokens):
        t_logits = steppers[1].logits if len(steppers) > 1 else None
        log_mix = mixed_logprobs(steppers[0].logits, t_logits, s.teacher_mix, s.vocab)
        tokens = torch.full((len(prompts),), s.pad, dtype=torch.long)
        for row in torch.nonzero(live)[:, 0].tolist():
            token = int(torch.multinomial(log_mix[row].exp(), 1, generator=gens[row]))
            tokens[row] = token
            out[row][0].append(token)
            out[row][1].append(float(log_mix[row, token]))
            live[row] = token not in s.stop
        if not live.any():
            break
        for stepper in steppers:
            stepper.step(tokens, live)
    return out


def sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    prompts: list[list[int]],
    seeds: list[int],
    s: Sampler,
) -> list[tuple[list[int], list[float]]]:
    """A response per prompt, from the student's current weights (in eval mode, without
    gradients; its train/eval mode is restored), `s.batch_size` prompts decoded at once.
    `teacher` is only run with a teacher mix."""
    mixing = teacher if s.teacher_mix > 0.0 else None
    was_training = student.training
    student.eval()
    out: list[tuple[list[int], list[float]]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), s.batch_size):
                out += sample_batch(student, mixing, prompts[i : i + s.batch_size], seeds[i : i + s.batch_size], s)
    finally:
        student.train(was_training)
    return out


@dataclass(frozen=True)
class OnlineParams:
    """params.yaml `train.online`."""

    every: int  # K: optimizer steps between samplings from the current student; 0 = off (the pairs' responses)
    max_new_tokens: int  # the longest response sampled
    # who scores the samples: model, the teacher model in this process | served, the teacher behind
    # score.openai (the log-prob of each sampled token only: opd, with teacher_signal topk)
    teacher: Literal["model", "served"]

    @property
    def served(self) -> bool:
        """Online sampling on, its samples scored by the served teacher (score.openai)."""
        return self.every > 0 and self.teacher == "served"

    def __post_init__(self) -> None:
        check(self.teacher in ("model", "served"), "teacher", f"must be model or served, got {self.teacher!r}")
        check(self.every >= 0, "every", "must be >= 0 (0 = train on the pairs' stored student responses)")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
