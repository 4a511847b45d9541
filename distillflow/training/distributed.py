"""Data parallelism for the train and round stages: PyTorch's own, under a launcher.

    torchrun --nproc_per_node=2 -m stages.train --params params.yaml ...   # gloo on CPU, nccl on GPU

or `train.launcher` (stages/launch.py), which `dvc repro` and `distillflow run` honour.
Each optimizer step's micro-batches are the same global lists of pairs as in one
process; rank r takes every world-th pair of each list and scales its loss by its share
of the pairs, so the averaged gradient is the single-process gradient for the same
global batch (exactly, up to float summation order, for `reduction: sequence_mean`;
`token_mean` weights ranks by pairs, not tokens). Every rank computes the same log
rows; rank 0 alone writes files.

`train.parallel` says how the student is spread:

- `ddp`: `DistributedDataParallel` around `StudentForward`, the one module call of a
  micro-batch (both sides' hidden states and the LM head the fused loss uses), so DDP's
  hooks see the whole forward and overlap the gradient all-reduce with the backward;
  `no_sync` for every micro-batch of a step but the last. Each rank holds the student.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer and on
  `StudentForward`: parameters, gradients and optimizer state are sharded over ranks,
  for a student that does not fit one device. Checkpoints are sharded
  (`torch.distributed.checkpoint`), one file per rank; the saved model is gathered.

The teacher is never wrapped: with `train.teacher_signal: topk` there is none (its
stored top-k signal); online, each rank holds a frozen copy.

Without a launcher (no WORLD_SIZE in the environment) nothing here communicates.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distillflow.base import models, packing
from distillflow.base.errors import ModelError

Tensor = torch.Tensor
# How long a rank waits in a collective: the round stage's other ranks wait while rank 0
# samples, pairs, curates and scores the round's data.
TIMEOUT = timedelta(hours=6)


def init_from_env(device: str) -> None:
    """Join the process group the launcher describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    """This rank's pairs of one global micro-batch."""
    return indices[rank::size]


def barrier() -> None:
    """Every rank waits here for the others (nothing in one process)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity in one process): the log
    rows and the curriculum's means, not gradients."""
    rank, size = rank_and_size()
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class StudentForward(torch.nn.Module):
    """The student's part of one micro-batch as one module call: the final hidden states
    (after the last norm) of each batch, and the LM head cut to the shared vocabulary
    (logits = hidden @ weight.T + bias). DDP and FSDP2 act on this call. With `pad`
    (train.packing) the batches go through the model body as one packed forward
    (base/packing.py); without, batch by batch, padded."""

    def __init__(self, student: torch.nn.Module, vocab: int, pad: int | None) -> None:
        super().__init__()
        self.student = student
        self.vocab = vocab
        self.pad = pad

    def forward(self, batches: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], Tensor, Tensor | None]:
        # The head first: autograd then accumulates the tied embedding's gradients in the
        # order it did when the head was cut once, before any forward (same floats).
        weight, bias = models.lm_head(self.student, self.vocab, "student")
        return packing.hidden_states(self.student.base_model, batches, self.pad), weight, bias


def layers_of(student: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (the classes a transformers model names in `_no_split_modules`),
    FSDP2's units below the root."""
    names = set(getattr(student, "_no_split_modules", None) or [])
    found = [m for m in student.modules() if type(m).__name__ in names]
    if not found:
        raise ModelError(
            f"train.parallel fsdp: {type(student).__name__} names no decoder layer class (_no_split_modules "
            f"{sorted(names)}) to shard; use train.parallel ddp"
        )
    return found


def wrap(fwd: StudentForward, parallel: str, device: str) -> torch.nn.Module:
    """`fwd` as the launcher's ranks train it: itself in one process, else under DDP or
    FSDP2 (`train.parallel`). FSDP2 shards the student's parameters in place: build the
    optimizer after this."""
    _, world = rank_and_size()
    if world == 1:
        return fwd
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DistributedDataParallel(fwd, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for layer in layers_of(fwd.student):
        fully_shard(layer, mesh=mesh)
    fully_shard(fwd, mesh=mesh)
    return fwd


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 shards (some of) the module's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(q, DTensor) for q in module.parameters())


@contextmanager
def accumulating(wrapped: torch.nn.Module, last: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: gradients stay local on every
    micro-batch of a step but the last (DDP's no_sync; FSDP2 does not reduce-scatter
    until the last)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        with nullcontext() if last else wrapped.no_sync():
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(last)
    yield


def full_norm(norm: Tensor) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def gathered(student: torch.nn.Module) -> torch.nn.Module:
    """The trained student whole: itself, or under FSDP2 (a collective) a plain model of
    its class holding the gathered weights on rank 0 (on the other ranks, the sharded
    one: they write nothing)."""
    if not is_sharded(student):
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_size()[0] != 0:
        return student
    cls = next(c for c in type(student).__mro__ if not issubclass(c, FSDPModule))  # fully_shard's subclass
    with torch.device("meta"):
        plain = cls(student.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.generation_config = student.generation_config
    for name, buf in student.named_buffers():  # buffers (rotary tables) are not sharded
        module, _, leaf = name.rpartition(".")
        plain.get_submodule(module).register_buffer(leaf, buf.detach().cpu(), persistent=False)
    return plain


def save_sharded(folder: Path, student: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """The student's and optimizer's shards (torch.distributed.checkpoint, one file per
    rank) into `folder`, written beside it and renamed by rank 0 once every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(student, opt)
    tmp = folder.with_name(folder.name + ".tmp")
    if rank_and_size()[0] == 0 and tmp.exists():
        shutil.rmtree(tmp)  # a killed save's
    barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    barrier()
    if rank_and_size()[0] == 0:
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier()


def load_sharded(folder: Path, student: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What save_sharded wrote, into the sharded student and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(student, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
