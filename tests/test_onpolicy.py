"""On-policy distillation (opd), MiniLLM and online sampling in the trainer
(distillflow/training/methods/opd.py, minillm.py, distillflow/training/onpolicy.py).

The methods are checked against exact references by enumeration: on a tiny autoregressive
"model" (a table of next-token logits per prefix, vocabulary 3, length 3) every response
is listed, the method's loss on each is weighted by its probability under the sampler,
and the expected gradient is compared with the exact gradient of the reverse KL.

Run: pytest tests/test_onpolicy.py -q
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from distillflow.training import losses, onpolicy
from distillflow.training.methods import METHODS
from distillflow.training.methods.heads import Heads, Side
from distillflow.training.methods.method import MicroBatch, Progress
from distillflow.training.methods.minillm import MiniLLMParams
from distillflow.training.methods.opd import OPDParams
from distillflow.training.onpolicy import OnlineParams

from .builders import PAIRS, fresh, tp, train_run

V, L, EOS = 3, 3, 2
PREFIXES = [pre for n in range(L) for pre in itertools.product(range(V), repeat=n)]  # every proper prefix
# every complete response: it ends at EOS, or at L tokens; so lengths 1..L, as sampled responses' are
SEQS = [
    list(s)
    for n in range(1, L + 1)
    for s in itertools.product(range(V), repeat=n)
    if EOS not in s[:-1] and (s[-1] == EOS or n == L)
]


def table(seed: int) -> torch.Tensor:
    """Next-token logits (prefixes, V) of one tiny model."""
    return torch.randn(len(PREFIXES), V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rows_of(logits: torch.Tensor, seq: list[int], length: int) -> torch.Tensor:
    """(1, length, V) the model's logits at each position of `seq`."""
    return torch.stack([logits[PREFIXES.index(tuple(seq[:t]))] for t in range(length)])[None]


def seq_logprob(logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
    lp = logits.log_softmax(-1)
    return sum(lp[PREFIXES.index(tuple(seq[:t])), y] for t, y in enumerate(seq))


def batch_of(q: torch.Tensor, p: torch.Tensor, seq: list[int], behaviour: torch.Tensor | None) -> MicroBatch:
    """One response through both "models": the hidden states are the logits and the heads
    identities, so the loss sees exactly the tables' distributions."""
    n = len(seq)
    eye = torch.eye(V, dtype=torch.float64)
    heads = Heads(
        s_weight=eye,
        s_bias=None,
        t_weight=eye,
        t_bias=None,
        chunked=False,
        chunk_size=64,
        reduction="sequence_mean",
        topk=False,
    )
    side = Side(
        s_hidden=rows_of(q, seq, n),
        t_hidden=rows_of(p, seq, n).detach(),
        mask=torch.ones(1, n, dtype=torch.bool),
        targets=torch.tensor([seq]),
        behaviour=behaviour,
    )
    empty = Side(s_hidden=torch.empty(0), t_hidden=None, mask=side.mask[:0], targets=side.targets[:0])
    at = Progress(step=0, total_steps=1, micro=0, round_index=1, rounds=1, seed=0, positions=[0], global_size=1)
    return MicroBatch(chosen=empty, rejected=side, heads=heads, at=at, curriculum=None)  # type: ignore[arg-type]


def expected_gradient(
    method: str, params: object, q: torch.Tensor, p: torch.Tensor, seqs: list[list[int]], mix: float = 0.0
) -> torch.Tensor:
    """sum over responses y of sampler(y) * d/dq loss(y): the method's gradient in
    expectation over the sampler a p + (1 - a) q (a = mix)."""
    with torch.no_grad():
        sampler = (
            torch.logaddexp(math.log(mix) + p.log_softmax(-1), math.log1p(-mix) + q.log_softmax(-1))
            if mix
            else q.log_softmax(-1)
        )
    total = q.new_zeros(())
    for seq in seqs:
        behaviour = torch.stack([sampler[PREFIXES.index(tuple(seq[:t])), y] for t, y in enumerate(seq)])
        loss, _ = METHODS[method].loss(batch_of(q, p, seq, behaviour[None].float()), params)
        total = total + float(behaviour.sum().exp()) * loss
    (grad,) = torch.autograd.grad(total, q)
    return grad


def sequence_reverse_kl(q: torch.Tensor, p: torch.Tensor, seqs: list[list[int]]) -> torch.Tensor:
    return sum(seq_logprob(q, s).exp() * (seq_logprob(q, s) - seq_logprob(p, s)) for s in seqs)


def stepwise_reverse_kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum over the prefixes y<t a response can have (no EOS in them) of q(y<t), held
    fixed, times KL(q(.|y<t) || p(.|y<t))."""
    lq, lp = q.log_softmax(-1), p.log_softmax(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)  # per prefix
    reach = [
        0.0 if EOS in pre else math.exp(sum(float(lq.detach()[PREFIXES.index(pre[:t]), y]) for t, y in enumerate(pre)))
        for pre in PREFIXES
    ]
    return sum(w * kl[i] for i, w in enumerate(reach))


@pytest.fixture
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    return table(0).requires_grad_(True), table(1)


def test_opd_at_discount_1_is_the_sequence_reverse_kl_gradient(tables: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, p = tables
    got = expected_gradient("opd", OPDParams(1.0), q, p, SEQS)
    (want,) = torch.autograd.grad(sequence_reverse_kl(q, p, SEQS), q)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_opd_at_discount_0_is_the_per_step_reverse_kl_gradient(tables: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, p = tables
    got = expected_gradient("opd", OPDParams(0.0), q, p, SEQS)
    (want,) = torch.autograd.grad(stepwise_reverse_kl(q, p), q)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (sequence,) = torch.autograd.grad(sequence_reverse_kl(q, p, SEQS), q)
    assert not torch.allclose(got, sequence, atol=1e-3)  # the two objectives differ: the test can tell them apart


def test_minillm_without_mixing_is_the_sequence_reverse_kl_gradient(tables: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Its single-step decomposition is exact: the per-step KL's gradient plus the
    long-term policy gradient is the sequence-level gradient, without the length
    normalisation; with it (the paper's R^Norm) the long-term term is rescaled."""
    q, p = tables
    got = expected_gradient("minillm", MiniLLMParams(0.0, length_norm=False), q, p, SEQS)
    (want,) = torch.autograd.grad(sequence_reverse_kl(q, p, SEQS), q)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    normalised = expected_gradient("minillm", MiniLLMParams(0.0, length_norm=True), q, p, SEQS)
    assert not torch.allclose(normalised, want, atol=1e-3)


def test_minillm_weighs_each_token_by_the_student_over_the_sampler(tables: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The importance weight of a sampled token is q(y) / p~(y), p~ the sampler's
    (teacher-mixed) probability: what its logged mean weight is on one-token responses."""
    q, p = tables
    mix = 0.4
    sampler = torch.logaddexp(math.log(mix) + p.log_softmax(-1), math.log1p(-mix) + q.log_softmax(-1)).detach()
    for y in range(V):
        behaviour = sampler[0, y].reshape(1, 1).float()
        _, logs = METHODS["minillm"].loss(batch_of(q, p, [y], behaviour), MiniLLMParams(mix, True))
        want = float(q.detach().log_softmax(-1)[0, y].exp() / sampler[0, y].exp())
        assert logs["weight"] == pytest.approx(want, rel=1e-6)


def test_returns_to_go_against_loops() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 2, 2, 3])  # sequence 1 is empty
    got = losses.returns_to_go(values, seq, 4, 0.5)
    by_seq = {0: [1.0, 2.0, 3.0], 2: [4.0, 5.0], 3: [6.0]}
    want = [sum(0.5**k * v for k, v in enumerate(vs[i:])) for vs in by_seq.values() for i in range(len(vs))]
    assert got.tolist() == pytest.approx(want)
    means = losses.returns_to_go(values, seq, 4, 0.5, future_mean=True)
    want = [
        sum(vs[i + 1 :]) / (len(vs) - i - 1) if i + 1 < len(vs) else 0.0
        for vs in by_seq.values()
        for i in range(len(vs))
    ]
    assert means.tolist() == pytest.approx(want)


# ------------------------------------------------------------ sampling in the trainer


def test_the_sampler_mixes_and_reports_the_log_prob_of_what_it_drew(tiny_models: Path) -> None:
    """The sampler's log-prob of each drawn token is log(a p + (1 - a) q) of the models run
    on the whole sequence, unpadded and without a cache (the left-padded, KV-cached batch
    agrees), and a response depends on its own seed only, not on the other prompts
    decoded beside it."""
    student, teacher, tok_s, _ = fresh(tiny_models)
    prompts = [[tok_s.bos_token_id or 1, 5, 6, 7], [tok_s.bos_token_id or 1, 8, 9]]
    vocab = len(tok_s)
    s = onpolicy.Sampler(
        vocab=vocab,
        max_new_tokens=10,
        stop=frozenset({tok_s.eos_token_id}),
        teacher_mix=0.3,
        device="cpu",
        pad=tok_s.pad_token_id,
        batch_size=2,
    )
    both = onpolicy.sample(student, teacher, prompts, [11, 12], s)
    alone = onpolicy.sample(student, teacher, prompts[1:], [12], s)[0]  # not padded: floats may differ in the last bits
    assert alone[0] == both[1][0]
    torch.testing.assert_close(torch.tensor(alone[1]), torch.tensor(both[1][1]), rtol=1e-5, atol=1e-6)
    assert onpolicy.sample(student, teacher, prompts[1:], [13], s)[0][0] != both[1][0]
    for prompt, (ids, lps) in zip(prompts, both):
        assert 1 <= len(ids) <= 10 and len(lps) == len(ids)
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            lq = student(input_ids=full).logits[0, len(prompt) - 1 : -1, :vocab].float().log_softmax(-1)
            lp = teacher(input_ids=full).logits[0, len(prompt) - 1 : -1, :vocab].float().log_softmax(-1)
        mixed = torch.logaddexp(math.log(0.3) + lp, math.log(0.7) + lq)
        want = mixed.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["opd", "minillm"])
def test_online_training_samples_every_k_steps_and_resumes_exactly(
    tiny_models: Path, tmp_path: Path, method: str
) -> None:
    """train.online: the student samples its responses during the run (the rows count the
    sampled tokens), a rerun is the same run, and a run killed after a checkpoint resumes
    to the uninterrupted run's weights."""
    p = tp(method=method, epochs=3, batch_size=4, checkpoint_every=2, online=OnlineParams(2, 8, "model"))
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    before = [q.detach().clone() for q in student.parameters()]
    rows = train_run(student, teacher, tok_s, tok_t, PAIRS, p)
    expected = [q.detach().clone() for q in student.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, expected))
    counts = [r["sampled_tokens"] for r in rows]  # 6 steps; a sampling at steps 0, 2 and 4, 8 responses each
    assert counts[0] == counts[1] < counts[2] == counts[3] < counts[4] == counts[5] <= 3 * 8 * 8
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reverse_kl"]) for r in rows)

    student, teacher, tok_s, tok_t = fresh(tiny_models)
    assert train_run(student, teacher, tok_s, tok_t, PAIRS, p) == rows
    assert all(torch.equal(a, b) for a, b in zip(expected, student.parameters()))

    student, teacher, tok_s, tok_t = fresh(tiny_models)
    with pytest.raises(KeyboardInterrupt):
        train_run(student, teacher, tok_s, tok_t, PAIRS, p, tmp_path, "key", on_step=lambda s: _kill_at(s, 2))
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    assert train_run(student, teacher, tok_s, tok_t, PAIRS, p, tmp_path, "key") == rows
    assert all(torch.equal(a, b) for a, b in zip(expected, student.parameters()))


def _kill_at(step: int, at: int) -> None:
    if step == at:
        raise KeyboardInterrupt("killed")


def test_online_settings_that_cannot_work_name_the_key() -> None:
    with pytest.raises(ValueError, match="online: minillm trains on responses sampled"):
        tp(method="minillm")
    with pytest.raises(ValueError, match="teacher_signal: train.online samples new responses"):
        tp(method="opd", teacher_signal="topk", online=OnlineParams(2, 8, "model"))
    with pytest.raises(ValueError, match="online: kd does not read the student's responses"):
        tp(method="kd", online=OnlineParams(2, 8, "model"))
    with pytest.raises(ValueError, match=r"checkpoint_every: must be a multiple of train.online.every \(3\)"):
        tp(method="opd", checkpoint_every=4, online=OnlineParams(3, 8, "model"))
    with pytest.raises(ValueError, match="discount: must be in"):
        OPDParams(1.5)
    with pytest.raises(ValueError, match="teacher_mix: must be in"):
        MiniLLMParams(1.0, True)
