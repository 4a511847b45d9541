"""Data parallelism for the train stage: the same code under `torchrun`.

    torchrun --nproc_per_node=2 -m stages.train --params params.yaml ...   # gloo on CPU, nccl on GPU

Each optimizer step's micro-batches are the same global lists of pairs as in one
process; rank r takes every world-th pair of each list. Gradients are averaged with
one all-reduce per step after each rank scales its loss by its share of the pairs, so
the update equals the single-process update for the same global batch (exactly, up to
float summation order, for `reduction: sequence_mean`; `token_mean` weights ranks by
pairs, not tokens). Every rank computes the same log rows; rank 0 alone writes files.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    """This rank's pairs of one global micro-batch."""
    return indices[rank::size]


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity in one process)."""
    rank, size = rank_and_size()
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of every parameter's gradient over ranks, in one flattened all-reduce."""
    rank, size = rank_and_size()
    if size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
