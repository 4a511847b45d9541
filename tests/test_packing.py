"""Packing (distillflow/base/packing.py): sequences in shared rows give the padded
path's per-sequence losses, in the trainer and in bootstrap, and a model that lets
packed sequences see each other is refused."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distillflow.base import encoding, models, packing
from distillflow.base.config import ToyModelParams
from distillflow.base.errors import UsageError
from distillflow.stagekit import toymodels

from .builders import PAIRS, TASK, fresh, tp, train_run


def batch(lengths: list[int], vocab: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    attn = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * attn, attn  # pad id 0 after each sequence


def test_pack_lays_out_every_sequence_once_with_positions_restarting() -> None:
    a, b = batch([7, 3, 2, 5]), batch([4, 1], seed=1)
    p = packing.pack([a, b], pad_id=0)
    # first-fit decreasing into rows of 7: [7], [5, 2], [4, 3], [1] + a padding tail
    assert p.input_ids.shape == (4, 7)
    assert p.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 0, 1],
        [0, 1, 2, 3, 0, 1, 2],
        [0, 0, 1, 2, 3, 4, 5],
    ]
    # every real token once, in its sequence's order; unpack inverts pack
    a_back, b_back = p.unpack(p.input_ids)
    assert torch.equal(a_back, a[0] * a[1]) and torch.equal(b_back, b[0] * b[1])
    real = sum(int(x[1].sum()) for x in (a, b))
    assert int((p.input_ids != 0).sum()) == real == 22
    hidden = torch.randn(4, 7, 3)
    (ha, _) = p.unpack(hidden)
    assert ha.shape == (4, 7, 3) and torch.equal(ha[1, :3], hidden[2, 4:7]) and not ha[1, 3:].any()


def test_pack_refuses_left_padding() -> None:
    ids, attn = batch([3, 2])
    with pytest.raises(ValueError, match="right-padded"):
        packing.pack([(ids, attn.flip(1))], pad_id=0)


def per_sequence_nll(model: torch.nn.Module, b: encoding.Batch, packed: bool, pad: int) -> torch.Tensor:
    """Each sequence's summed response-token NLL."""
    if packed:
        p = packing.pack([(b.input_ids, b.attention_mask)], pad)
        (logits,) = p.unpack(p.forward(model).logits)
    else:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    nll = F.cross_entropy(logits.transpose(1, 2), b.targets, reduction="none")
    return (nll * b.response_mask).sum(1)


def test_packed_sequences_give_the_padded_per_sequence_losses_and_gradients(tiny_models: Path) -> None:
    student, _, tok, _ = fresh(tiny_models)
    rng = random.Random(0)
    seqs = [
        (
            [rng.randrange(5, len(tok)) for _ in range(rng.randint(3, 12))],
            [rng.randrange(5, len(tok))] * rng.randint(1, 9),
        )
        for _ in range(12)
    ]
    b = encoding.collate(seqs, tok.pad_token_id)
    assert packing.pack([(b.input_ids, b.attention_mask)], tok.pad_token_id).input_ids.shape[0] < 12  # rows shared
    losses, grads = [], []
    for packed in (False, True):
        student.zero_grad()
        nll = per_sequence_nll(student, b, packed, tok.pad_token_id)
        nll.sum().backward()
        losses.append(nll.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "method, settings",
    [
        ("distillm2", {}),
        ("gkd", {}),
        ("sft", {}),
        ("distillm2", {"logits": "full", "gradient_checkpointing": True}),
    ],
)
def test_trainer_packed_equals_padded_step_by_step(tiny_models: Path, method: str, settings: dict) -> None:
    """The same run packed and padded: per-step losses within 1e-5 relative, the same
    batches (one loss curve), final weights within float rounding; also with full logits
    and gradient checkpointing."""
    runs = []
    for pack in (False, True):
        student, teacher, tok_s, tok_t = fresh(tiny_models)
        p = tp(method=method, packing=pack, epochs=3, **settings)
        rows = train_run(student, teacher, tok_s, tok_t, PAIRS, p)
        runs.append((rows, student.state_dict()))
    (padded, w_padded), (packed, w_packed) = runs
    assert len(padded) == len(packed) == 6
    for a, b in zip(padded, packed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a, b)
    for k in w_padded:
        torch.testing.assert_close(w_packed[k], w_padded[k], rtol=1e-4, atol=1e-5)


def test_bootstrap_sft_packed_equals_padded(tiny_models: Path) -> None:
    mp = ToyModelParams(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        steps=4,
        batch_size=16,
        lr=0.01,
        warmup_steps=1,
        examples=0,
        corrupt_share=0.5,
    )
    tok = models.build_char_tokenizer()
    curves = []
    for pack in (False, True):
        model = models.build_toy_model(toymodels.arch(mp), len(tok), tok, 3, 64)
        examples = toymodels.training_examples(TASK, 3, "teacher")
        losses, _ = toymodels.train_toy(
            model,
            tok,
            itertools.islice(examples, 10**6),
            mp,
            "packing test",
            seed=3,
            alphabet=TASK.alphabet,
            heldout=toymodels.heldout_examples(TASK, 3, 4),
            eval_every=mp.steps,
            packing=pack,
        )
        curves.append(losses)
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


class _Mixing(torch.nn.Module):
    """Stands in for a model body without transformers' packed-sequence masking (a
    custom architecture): a causal running mean over the whole row, so a packed
    sequence sees the one before it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 4)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.emb

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kw: torch.Tensor) -> SimpleNamespace:
        x = self.emb(input_ids)
        if "attention_mask" in kw:
            x = x * kw["attention_mask"][..., None]
        steps = torch.arange(1, x.shape[1] + 1)[None, :, None]
        return SimpleNamespace(last_hidden_state=x.cumsum(1) / steps)


def test_a_model_that_mixes_packed_sequences_is_refused(tiny_models: Path) -> None:
    with pytest.raises(UsageError, match="does not keep packed sequences apart.*train.packing: false"):
        packing.check_model(_Mixing(), pad_id=0, role="student")
    student, _, tok, _ = fresh(tiny_models)
    packing.check_model(student.base_model, tok.pad_token_id, "student")  # a Llama keeps them apart
