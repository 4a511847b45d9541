"""Pieces every training loop shares: optimizer, schedule, determinism, saving."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
