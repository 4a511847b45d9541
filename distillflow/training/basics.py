"""Pieces every training loop shares: optimizer, schedule, determinism, saving.

Precision: the trained student always holds float32 master weights (MASTER_DTYPE), whatever
`models.dtype` says, so AdamW's small updates land (at lr 1e-5 most would round away in a
bfloat16 weight); `train.bf16_autocast` decides the compute dtype; `export_student` casts
the result to `models.dtype` when it is saved."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The dtype the trained student is loaded in and updated in (see the module docstring).
MASTER_DTYPE = "float32"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def optimizer_and_schedule(
    model: torch.nn.Module, lr: float, warmup_steps: int, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warmup then cosine decay to zero at `total_steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer: an ordinary HF model folder."""
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def export_student(model: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path, dtype: str) -> None:
    """Save a trained student as `dtype` (params.yaml `models.dtype`): its parameters are
    cast in place on the CPU, so the in-memory model is the saved one (compare evaluates
    it) and its config's `dtype` says `dtype`. Buffers keep their dtype, as from_pretrained
    leaves them (Llama's float32 rotary `inv_freq`). float32: nothing is cast."""
    target = getattr(torch, dtype)
    model.to("cpu")
    for name, prm in model.named_parameters():
        if prm.dtype == target or not prm.is_floating_point():
            continue
        prm.data = prm.data.to(target)
        if not torch.isfinite(prm.data).all():
            raise ValueError(
                f"train: the trained student's {name} does not fit models.dtype {dtype} (non-finite after the "
                "cast); save it as float32 or bfloat16"
            )
    save_model(model, tok, folder)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
