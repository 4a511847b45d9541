"""The train settings (params.yaml `train`) and the batch plan they imply."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from distillflow.base.config import LauncherParams
from distillflow.base.params import check
from distillflow.training.methods import METHODS
from distillflow.training.methods.distillm import DistiLLMParams
from distillflow.training.methods.distillm2 import DistiLLM2Params
from distillflow.training.methods.dpkd import DPKDParams
from distillflow.training.methods.gkd import GKDParams
from distillflow.training.methods.minillm import MiniLLMParams
from distillflow.training.methods.opd import OPDParams
from distillflow.training.onpolicy import OnlineParams


@dataclass(frozen=True)
class RoundParams:
    """One entry of params.yaml `train.rounds`: an on-policy round after the first."""

    previous: str  # the train output this round starts from (dvc.yaml passes it as --previous)


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    """params.yaml `train`. The methods' own sections (distillm2, distillm, gkd, dpkd) are
    the `params_section`s of distillflow.training.methods.METHODS: every run reads them all."""

    method: str  # a name in distillflow.training.methods.METHODS
    seed: int  # the run's seed (round 1; later rounds derive theirs): the batch order, torch, GKD's draws
    epochs: int  # passes over the pairs per round
    batch_size: int  # pairs per micro-batch
    grad_accum_steps: int  # micro-batches per optimizer step
    lr: float  # peak learning rate: AdamW, linear warmup then cosine decay to 0
    warmup_steps: int  # optimizer steps of linear learning-rate warmup
    max_grad_norm: float  # gradient clipping by total norm
    # sequence_mean: mean per pair, then over pairs | token_mean: over all response tokens
    reduction: Literal["sequence_mean", "token_mean"]
    logits: Literal["full", "chunked"]  # chunked: never materialise (B, T, V) logits
    chunk_size: int  # tokens per loss chunk
    device: Literal["cpu", "cuda"]  # cpu | cuda: where training runs
    # Compute under bf16 autocast. The student's weights are float32 masters either way and are
    # saved in models.dtype; with models.dtype bfloat16 turn this on for bf16 compute (off: float32
    # compute). No float16 autocast (it needs a gradient scaler): float16 models train like this too.
    bf16_autocast: bool
    gradient_checkpointing: bool  # recompute activations in the backward pass (less memory, slower)
    # pack each micro-batch's sequences into rows (position ids restart per sequence, attention stays
    # inside each): the same sequences per step, no work on padding; refused for a model that mixes them
    packing: bool
    checkpoint_every: int  # optimizer steps between resumable checkpoints; 0 = none
    # with several processes: ddp (each holds the student) | fsdp (FSDP2 shards it; sharded checkpoints)
    parallel: Literal["ddp", "fsdp"]
    launcher: LauncherParams  # how the train and round stages start: one process, torchrun or accelerate
    teacher_signal: Literal["online", "topk"]  # topk: data/score's top-k log-probs, no teacher model
    distillm2: DistiLLM2Params  # DistiLLM-2's settings and ablation switches
    distillm: DistiLLMParams  # DistiLLM's settings
    gkd: GKDParams  # GKD's settings
    dpkd: DPKDParams  # DPKD's settings
    opd: OPDParams  # on-policy distillation's settings
    minillm: MiniLLMParams  # MiniLLM's settings
    # Online on-policy sampling: every `every` optimizer steps the current student samples a new
    # response for each pair of the next `every` steps, in place of the pair's stored one (0: off)
    online: OnlineParams
    # Batched on-policy rounds after the first (Algorithm 1), keyed r2..rE; dvc.yaml's
    # round and round_evaluate stages iterate over it (DVC templates cannot count). Keys are names, not
    # numbers: DVC's foreach silently skips integer keys, and `-S` cannot write quoted ones.
    rounds: dict[str, RoundParams]

    @property
    def total_rounds(self) -> int:
        """E: the first round (the train stage) plus one per `rounds` entry."""
        return 1 + len(self.rounds)

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", f"{self.method!r} is not one of {list(METHODS)}")
        check(
            METHODS[self.method].needs_teacher != "online" or self.teacher_signal == "online",
            "teacher_signal",
            f"{self.method} needs the teacher model itself, not its stored top-k: set teacher_signal: online",
        )
        online = self.online.every > 0
        check(
            self.method != "minillm" or online,
            "online",
            "minillm trains on responses sampled from its teacher-mixed distribution during training: "
            "set train.online.every > 0",
        )
        served = self.online.served
        check(
            not online or served or self.teacher_signal == "online",
            "teacher_signal",
            "train.online samples new responses that have no stored scores: set teacher_signal: online, or "
            "online.teacher: served",
        )
        check(
            not served or (self.method == "opd" and self.teacher_signal == "topk"),
            "online",
            "teacher: served scores each sampled token through score.openai, which only opd can train on: set "
            "method: opd and teacher_signal: topk (no teacher model in the process)",
        )
        check(
            not online or METHODS[self.method].needs_student_samples,
            "online",
            f"{self.method} does not read the student's responses, so sampling them online changes nothing: "
            "set train.online.every: 0",
        )
        check(
            not online or self.checkpoint_every % self.online.every == 0,
            "checkpoint_every",
            f"must be a multiple of train.online.every ({self.online.every}), so a resumed run samples where an "
            "uninterrupted one did",
        )
        want = [f"r{e}" for e in range(2, 2 + len(self.rounds))]
        check(
            sorted(self.rounds, key=lambda k: (len(k), k)) == want,
            "rounds",
            f"must be keyed r2..rE, one per round after the first, i.e. {want}; got {list(self.rounds)}",
        )
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        check(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check(self.parallel in ("ddp", "fsdp"), "parallel", f"{self.parallel!r} is not ddp or fsdp")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = no checkpoints)")


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round e: `train.seed` itself in round 1, a distinct one after."""
    return seed + 7919 * (round_index - 1)


def batch_plan(n_pairs: int, p: TrainParams, seed: int) -> list[list[list[int]]]:
    """Optimizer steps, each a list of micro-batches of pair indices.

    The shuffle of each epoch is a pure function of (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would.
    """
    steps: list[list[list[int]]] = []
    for epoch in range(p.epochs):
        order = list(range(n_pairs))
        random.Random(seed * 1000 + epoch).shuffle(order)
        micro = [order[s : s + p.batch_size] for s in range(0, n_pairs, p.batch_size)]
        steps.extend(micro[s : s + p.grad_accum_steps] for s in range(0, len(micro), p.grad_accum_steps))
    return steps
