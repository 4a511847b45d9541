"""Packing: several sequences in one row, so a forward pass spends no work on padding.

Right-padded batches (encoding.collate) waste the positions after each sequence's end
(42% of the bootstrap teacher's). `pack` lays the same sequences out in as few rows as
first-fit decreasing finds, each row as wide as the longest sequence, with position
ids that restart at 0 for every sequence (and for a row's padding tail). Called with
those position ids and no attention mask, a transformers decoder keeps attention
inside each sequence (transformers' masking_utils reads the sequence starts off the
position ids), so each sequence's hidden states are the ones its padded row gives, up
to float rounding; `Packed.unpack` puts them back in the padded layout (B, T, ...),
zeros at padding. `check_model` verifies that on the model before training relies on
it (a model without that masking would let sequences attend to each other). Which
sequences share a step is unchanged: packing only lays out the batches it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distillflow.base.errors import UsageError


@dataclass(frozen=True)
class Packed:
    """Sequences of one or more right-padded batches, packed into rows.

    input_ids, position_ids: (R, C) long. `index[k]` (B_k, T_k): where position (i, t)
    of batch k sits in the packed rows flattened to R * C; `valid[k]`: its attention
    mask (False at padding, where `index` is 0)."""

    input_ids: Tensor
    position_ids: Tensor
    index: list[Tensor]
    valid: list[Tensor]

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """(R, C, ...) values of the packed rows -> one (B_k, T_k, ...) tensor per batch,
        zeros at padding."""
        flat = packed.reshape(-1, *packed.shape[2:])
        out = []
        for index, valid in zip(self.index, self.valid, strict=True):
            rows = flat[index]
            shape = (*valid.shape, *([1] * (rows.dim() - 2)))
            out.append(torch.where(valid.view(shape), rows, rows.new_zeros(())))
        return out

    @property
    def positions(self) -> int:
        return self.input_ids.numel()

    def forward(self, model: torch.nn.Module) -> Any:
        """`model` (a transformers model or model body) on the packed rows. No attention
        mask and no cache: transformers reads the sequences off the position ids only
        then (with a cache, e.g. `use_cache` left at its default, it does not, and
        packed sequences would see each other)."""
        return model(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False)


def lengths(attention_mask: Tensor) -> list[int]:
    """Each row's length; the mask must be right-padded (ones, then zeros)."""
    n = attention_mask.sum(dim=1)
    width = attention_mask.shape[1]
    prefix = torch.arange(width, device=attention_mask.device)[None, :] < n[:, None]
    if not torch.equal(prefix, attention_mask.bool()):
        raise ValueError("packing needs right-padded batches (an attention mask of ones, then zeros)")
    return n.tolist()


def pack(batches: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> Packed:
    """Pack the sequences of right-padded (input_ids, attention_mask) batches into rows
    as wide as the longest sequence: first-fit decreasing, longest first, ties in batch
    order (deterministic)."""
    seqs = [(k, i, n) for k, (_, attn) in enumerate(batches) for i, n in enumerate(lengths(attn))]
    width = max((n for _, _, n in seqs), default=0)
    rows: list[list[tuple[int, int, int]]] = []
    free: list[int] = []
    for k, i, n in sorted(seqs, key=lambda s: -s[2]):
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append((k, i, n))
        free[row] -= n
    device = batches[0][0].device if batches else torch.device("cpu")
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    index = [torch.zeros(ids.shape, dtype=torch.long, device=device) for ids, _ in batches]
    ar = torch.arange(width, device=device)
    for r, members in enumerate(rows):
        start = 0
        for k, i, n in members:
            input_ids[r, start : start + n] = batches[k][0][i, :n]
            position_ids[r, start : start + n] = ar[:n]
            index[k][i, :n] = r * width + start + ar[:n]
            start += n
        position_ids[r, start:] = ar[: width - start]  # the padding tail: a sequence of its own
    return Packed(input_ids, position_ids, index, [attn.bool() for _, attn in batches])


def hidden_states(
    base_model: torch.nn.Module, batches: Sequence[tuple[Tensor, Tensor]], pad_id: int | None
) -> list[Tensor]:
    """The final hidden states of each right-padded batch, (B_k, T_k, H), of `base_model`
    (a transformers model body): with `pad_id`, in one packed forward pass, zeros at
    padding; without (train.packing off), batch by batch, padded."""
    if pad_id is None:
        return [base_model(input_ids=i, attention_mask=a, use_cache=False).last_hidden_state for i, a in batches]
    p = pack(batches, pad_id)
    return p.unpack(p.forward(base_model).last_hidden_state)


@torch.no_grad()
def check_model(base_model: torch.nn.Module, pad_id: int, role: str) -> None:
    """Refuse packing for a model that does not keep packed sequences apart. Three
    sequences of 6, 3 and 2 tokens pack into rows [6] and [3, 2]: the last one's hidden
    states must not change when the one before it in its row does (isolation), and must
    be its padded hidden states (positions restart), to the model dtype's rounding."""
    gen = torch.Generator().manual_seed(0)
    param = next(base_model.parameters())
    vocab = base_model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (3, 6), generator=gen).to(param.device)
    other = ids.clone()
    other[1] = torch.randint(0, vocab, (6,), generator=gen).to(param.device)  # the row's first sequence
    attn = (torch.arange(6)[None, :] < torch.tensor([6, 3, 2])[:, None]).long().to(param.device)
    was = base_model.training
    base_model.eval()
    try:
        (padded,) = hidden_states(base_model, [(ids, attn)], None)
        (packed,) = hidden_states(base_model, [(ids, attn)], pad_id)
        (changed,) = hidden_states(base_model, [(other, attn)], pad_id)
    finally:
        base_model.train(was)
    last = attn[2].bool()
    scale = max(float(padded[2, last].abs().max()), 1.0)
    leak = float((packed[2, last] - changed[2, last]).abs().max()) / scale
    off = float((packed - padded).abs()[attn.bool()].max()) / scale
    tol = 1e-4 if param.dtype == torch.float32 else 5e-2  # bf16/fp16 round at about 1e-2
    if leak > 1e-6 or off > tol:
        impl = getattr(getattr(base_model, "config", None), "_attn_implementation", "unknown")
        raise UsageError(
            f"train.packing: the {role} model ({type(base_model).__name__}, attention {impl}) does not keep "
            f"packed sequences apart (relative to its padded hidden states: {off:.3g} off; a change in the "
            f"sequence before moves it by {leak:.3g}); set train.packing: false"
        )
