"""Tests for distillflow/training/losses/: naive float64 references, limits, masking, chunking;
and every registered method's loss (distillflow/training/methods/) against the same references.

Run: pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distillflow.training import losses as L
from distillflow.training.methods import METHODS
from distillflow.training.methods.distillm import DistiLLMParams
from distillflow.training.methods.distillm2 import AlphaCurriculum, BetaSchedule, DistiLLM2Params
from distillflow.training.methods.dpkd import DPKDParams
from distillflow.training.methods.gkd import GKDParams
from distillflow.training.methods.heads import Heads, Side
from distillflow.training.methods.method import MicroBatch, Progress
from distillflow.training.methods.minillm import MiniLLMParams
from distillflow.training.methods.opd import OPDParams

from .builders import quick_benchmark

Tensor = torch.Tensor
B, T, V = 3, 5, 11


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Tiny tensors: intra-op threads only add OpenMP hand-offs, which get very slow
    # when another process keeps the cores busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------- naive float64 references
# Plain probabilities, explicit sums and loops; no log-space tricks.


def ref_softmax(logits: Tensor) -> Tensor:
    x = logits.double()
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(a || b) over the last dim, from probabilities."""
    return (a * (torch.log(a) - torch.log(b))).sum(-1)


def ref_token(name: str, s: Tensor, t: Tensor, coef: Tensor | float, detach: bool = False) -> Tensor:
    """Per-position divergence (..., V) -> (...); coef broadcast as (..., 1) or float."""
    q, p = ref_softmax(s), ref_softmax(t)
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "skew_forward_kl":
        return ref_kl(p, coef * p + (1 - coef) * q)
    if name == "skew_reverse_kl":
        q_mix = q.detach() if detach else q
        return ref_kl(q, (1 - coef) * p + coef * q_mix)
    if name == "generalized_jsd":
        if coef == 0:
            return ref_kl(p, q)
        if coef == 1:
            return ref_kl(q, p)
        m = coef * p + (1 - coef) * q
        return coef * ref_kl(p, m) + (1 - coef) * ref_kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def ref_reduce(per_pos: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "token_mean":
        total, count = per_pos.new_zeros(()), 0
        for idx in mask.nonzero().tolist():
            total = total + per_pos[tuple(idx)]
            count += 1
        return total / count
    seq_means = []
    for b in range(mask.shape[0]):
        vals = [per_pos[b, t] for t in range(mask.shape[1]) if mask[b, t]]
        if vals:
            seq_means.append(sum(vals) / len(vals))
    return sum(seq_means) / len(seq_means)


def ref_loss(
    name: str,
    s: Tensor,
    t: Tensor,
    mask: Tensor,
    reduction: str,
    coef: object = None,
    detach: bool = False,
) -> Tensor:
    if isinstance(coef, Tensor) and coef.ndim == 1:
        # per-sequence (B,) for 3-D, per-row (N,) for 2-D: one value per position
        coef = coef.double().reshape(coef.shape + (1,) * (s.ndim - 1))
    return ref_reduce(ref_token(name, s, t, coef, detach), mask, reduction)


# --------------------------------------------------------------------------- fixtures

SKEW = ("skew_forward_kl", "skew_reverse_kl")
ALL = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd", "tvd")


def call(name: str, s: Tensor, t: Tensor, mask: Tensor | None, coef: object = None, **kw: object) -> Tensor:
    fn = getattr(L, name)
    if name in SKEW:
        return fn(s, t, mask, 0.3 if coef is None else coef, **kw)
    if name == "generalized_jsd":
        return fn(s, t, mask, 0.5 if coef is None else coef, **kw)
    return fn(s, t, mask, **kw)


def default_coef(name: str) -> object:
    return 0.3 if name in SKEW else 0.5 if name == "generalized_jsd" else None


def make(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 2.0
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, V, generator=g)).to(dtype)
    t = (scale * torch.randn(*shape, V, generator=g)).to(dtype)
    mask = torch.rand(*shape, generator=g) > 0.35
    mask.view(-1)[0] = True  # at least one token
    if len(shape) == 2:
        mask[1] = False  # one sequence with no token at all
    return s, t, mask


# ---------------------------------------------------------------- against references


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "shape,reduction", [((B, T), "token_mean"), ((B, T), "sequence_mean"), ((B * T,), "token_mean")]
)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_value_matches_float64_reference(
    name: str, shape: tuple[int, ...], reduction: str, chunk_size: int | None
) -> None:
    s, t, mask = make(shape)
    got = call(name, s, t, mask, reduction=reduction, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.ndim == 0
    want = ref_loss(name, s, t, mask, reduction, default_coef(name))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,coef,detach",
    [
        ("forward_kl", None, False),
        ("reverse_kl", None, False),
        ("skew_forward_kl", 0.3, False),
        ("skew_reverse_kl", 0.3, False),
        ("skew_reverse_kl", 0.3, True),
        ("generalized_jsd", 0.5, False),
        ("generalized_jsd", 0.9, False),
        ("tvd", None, False),
    ],
)
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gradient_matches_float64_reference(name: str, coef: object, detach: bool, reduction: str) -> None:
    # float64 inputs stay float64 inside the losses, so gradients can be checked tightly.
    s, t, mask = make((B, T), dtype=torch.float64)
    s.requires_grad_(True)
    kw = {"detach_mixture_student": True} if detach else {}
    got = torch.autograd.grad(call(name, s, t, mask, coef, reduction=reduction, chunk_size=4, **kw), s)[0]
    want = torch.autograd.grad(ref_loss(name, s, t, mask, reduction, coef, detach), s)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_sequence_logprob_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, 0], mask[2] = True, False
    labels[~mask] = -100  # ignored positions may hold the ignore index
    for chunk_size in (None, 3):
        mean = L.sequence_logprob(logits, labels, mask, chunk_size=chunk_size)
        total = L.sequence_logprob_sum(logits, labels, mask, chunk_size=chunk_size)
        probs = ref_softmax(logits)
        for b in range(B):
            lps = [math.log(probs[b, t, labels[b, t]].item()) for t in range(T) if mask[b, t]]
            want_sum = sum(lps)
            want_mean = want_sum / len(lps) if lps else 0.0  # documented: no token -> 0
            assert mean[b].item() == pytest.approx(want_mean, abs=1e-5)
            assert total[b].item() == pytest.approx(want_sum, abs=1e-5)
        assert mean.dtype == torch.float32 and mean.shape == (B,)


def test_dpkd_loss_matches_reference() -> None:
    g = torch.Generator().manual_seed(2)
    sc, sr, tc, tr = (torch.randn(4, generator=g) for _ in range(4))
    beta_d = 0.7
    want = (
        sum(-math.log(1.0 / (1.0 + math.exp(-beta_d * ((sc[i] - sr[i]) - (tc[i] - tr[i])).item()))) for i in range(4))
        / 4
    )
    assert L.dpkd_loss(sc, sr, tc, tr, beta_d).item() == pytest.approx(want, abs=1e-6)
    empty = torch.zeros(0, requires_grad=True)
    zero = L.dpkd_loss(empty, empty, empty, empty, beta_d)
    assert zero.item() == 0.0 and zero.requires_grad


# ------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ALL)
def test_identical_distributions_give_zero(name: str) -> None:
    s, _, mask = make((B, T))
    for coef in [None] if default_coef(name) is None else [default_coef(name), 0.0, 0.99]:
        if name == "generalized_jsd" and coef == 0.99:
            coef = 1.0
        assert abs(call(name, s, s.clone(), mask, coef).item()) < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_non_negative_per_token(name: str) -> None:
    s, t, mask = make((B, T), scale=4.0)
    assert (call(name, s, t, mask, reduction="none") >= -1e-6).all()


@pytest.mark.parametrize("name,plain", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_alpha_zero_equals_plain_divergence(name: str, plain: str) -> None:
    s, t, mask = make((B, T))
    s.requires_grad_(True)
    skew = call(name, s, t, mask, 0.0)
    base = call(plain, s, t, mask)
    assert torch.equal(skew, base)
    assert torch.equal(torch.autograd.grad(skew, s)[0], torch.autograd.grad(base, s)[0])
    assert call(name, s, t, mask, 1e-10).item() == pytest.approx(base.item(), rel=1e-6)


def test_skew_forward_kl_tends_to_zero_as_alpha_tends_to_one() -> None:
    s, t, mask = make((B, T))
    values = [L.skew_forward_kl(s, t, mask, a).item() for a in (0.0, 0.5, 0.9, 0.999999)]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 1e-4


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    s, t, mask = make((B, T))
    assert torch.equal(L.generalized_jsd(s, t, mask, 0.0), L.forward_kl(s, t, mask))
    assert torch.equal(L.generalized_jsd(s, t, mask, 1.0), L.reverse_kl(s, t, mask))
    # the interior formula itself tends to 0 at both ends: the endpoints are special cases
    assert L.generalized_jsd(s, t, mask, 1e-6).item() < 1e-4
    assert L.generalized_jsd(s, t, mask, 1 - 1e-6).item() < 1e-4


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_masked_positions_are_ignored(name: str, reduction: str) -> None:
    s, t, mask = make((B, T))
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 50 * torch.randn_like(s2[~mask])
    t2[~mask] = float("nan")  # even garbage in padding must not leak
    s.requires_grad_(True)
    s2.requires_grad_(True)
    a = call(name, s, t, mask, reduction=reduction)
    b = call(name, s2, t2, mask, reduction=reduction)
    assert torch.equal(a, b)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s2)[0]
    assert torch.equal(ga[mask], gb[mask])
    assert (gb[~mask] == 0).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_all_false_mask_gives_zero_without_nan(name: str, reduction: str) -> None:
    s, t, _ = make((B, T))
    s.requires_grad_(True)
    loss = call(name, s, t, torch.zeros(B, T, dtype=torch.bool), reduction=reduction)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, s)
    assert (grad == 0).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32_results(name: str, dtype: torch.dtype) -> None:
    s, t, mask = make((B, T))
    s_h, t_h = s.to(dtype), t.to(dtype)
    got = call(name, s_h, t_h, mask)
    assert got.dtype == torch.float32
    # upcasting is exact, so bf16 inputs match float32 inputs holding the same values
    torch.testing.assert_close(got, call(name, s_h.float(), t_h.float(), mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, call(name, s, t, mask), rtol=5e-2, atol=1e-2)
    # mixed: bf16 teacher with float32 student (a source of negative JSD elsewhere)
    assert call(name, s, t_h, mask, reduction="none").min() >= -1e-6


@pytest.mark.parametrize("name", SKEW)
def test_per_sequence_alpha_equals_each_sequence_separately(name: str) -> None:
    s, t, mask = make((B, T))
    mask[:, 0] = True
    alpha = torch.tensor([0.05, 0.3, 0.6])
    per_seq = [call(name, s[b : b + 1], t[b : b + 1], mask[b : b + 1], alpha[b].item()) for b in range(B)]
    got = call(name, s, t, mask, alpha, reduction="sequence_mean")
    torch.testing.assert_close(got, torch.stack(per_seq).mean(), rtol=1e-6, atol=1e-6)
    counts = mask.sum(1).float()
    got_tok = call(name, s, t, mask, alpha, reduction="token_mean")
    torch.testing.assert_close(got_tok, (torch.stack(per_seq) * counts).sum() / counts.sum(), rtol=1e-6, atol=1e-6)
    # the same for 2-D input with a per-row alpha
    rows_alpha = alpha.repeat_interleave(T)
    got_2d = call(name, s.reshape(-1, V), t.reshape(-1, V), mask.reshape(-1), rows_alpha)
    torch.testing.assert_close(got_2d, got_tok, rtol=1e-6, atol=1e-6)
    want = ref_loss(name, s, t, mask, "sequence_mean", alpha)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_detach_mixture_student_changes_gradient_not_value() -> None:
    s, t, mask = make((B, T))
    s.requires_grad_(True)
    full = L.skew_reverse_kl(s, t, mask, 0.3)
    detached = L.skew_reverse_kl(s, t, mask, 0.3, detach_mixture_student=True)
    assert torch.equal(full, detached)
    g_full = torch.autograd.grad(full, s)[0]
    g_det = torch.autograd.grad(detached, s)[0]
    assert (g_full - g_det).abs().max() > 1e-3


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_chunked_equals_unchunked(name: str, reduction: str) -> None:
    s, t, mask = make((4, 9), seed=3)  # ~23 masked-in tokens: none of 1..7 divides evenly
    s.requires_grad_(True)
    coef = torch.tensor([0.1, 0.2, 0.3, 0.4]) if name in SKEW else None
    plain = call(name, s, t, mask, coef, reduction=reduction, chunk_size=None)
    g_plain = torch.autograd.grad(plain, s)[0]
    for chunk_size in (1, 2, 5, 7, 64):
        chunked = call(name, s, t, mask, coef, reduction=reduction, chunk_size=chunk_size)
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(chunked, s)[0], g_plain, rtol=1e-6, atol=1e-6)


def fused_one(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None,
    divergence: object,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    reduction: str = "token_mean",
    chunk_size: int = L.DEFAULT_CHUNK_SIZE,
    **kwargs: object,
) -> Tensor:
    """One divergence on the fused head path (a single-term chunked_divergences_from_hidden)."""
    term = L.HiddenTerm(
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        mask=mask,
        divergence=divergence,
        weight=1.0,
        reduction=reduction,
        kwargs=kwargs,
    )
    total, _ = L.chunked_divergences_from_hidden(
        [term],
        student_weight,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        chunk_size=chunk_size,
    )
    return total


HIDDEN_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": torch.tensor([0.05, 0.2, 0.5])}),
    ("skew_reverse_kl", {"alpha": torch.tensor([0.05, 0.2, 0.5])}),
    ("skew_reverse_kl", {"alpha": 0.1, "detach_mixture_student": True}),
    ("generalized_jsd", {"beta": 0.5}),
]


@pytest.mark.parametrize("name,kwargs", HIDDEN_CASES)
@pytest.mark.parametrize("layout,reduction", [("3d", "token_mean"), ("3d", "sequence_mean"), ("2d", "token_mean")])
def test_hidden_state_path_equals_logits_path(name: str, kwargs: dict, layout: str, reduction: str) -> None:
    g = torch.Generator().manual_seed(4)
    hs, ht, vocab = 6, 4, 37
    h_s = torch.randn(B, T, hs, generator=g, requires_grad=True)
    w_s = (0.5 * torch.randn(vocab, hs, generator=g)).requires_grad_(True)
    b_s = (0.1 * torch.randn(vocab, generator=g)).requires_grad_(True)
    h_t, w_t = torch.randn(B, T, ht, generator=g), torch.randn(vocab, ht, generator=g)
    b_t = 0.1 * torch.randn(vocab, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    kw = dict(kwargs)
    if layout == "2d":
        h_s_in, h_t_in, mask_in = h_s.reshape(-1, hs), h_t.reshape(-1, ht), mask.reshape(-1)
        if isinstance(kw.get("alpha"), Tensor):
            kw["alpha"] = kw["alpha"].repeat_interleave(T)
    else:
        h_s_in, h_t_in, mask_in = h_s, h_t, mask
    fn = getattr(L, name)
    plain = fn(
        h_s_in @ w_s.T + b_s,
        h_t_in @ w_t.T + b_t,
        mask_in,
        reduction=reduction,
        chunk_size=None,
        **kw,
    )
    params = (h_s, w_s, b_s)
    g_plain = torch.autograd.grad(plain, params)
    for chunk_size in (3, 7, 100):
        fused = fused_one(
            h_s_in,
            w_s,
            h_t_in,
            w_t,
            mask_in,
            fn,
            student_bias=b_s,
            teacher_bias=b_t,
            reduction=reduction,
            chunk_size=chunk_size,
            **kw,
        )
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
        for got, want in zip(torch.autograd.grad(2.5 * fused, params), g_plain, strict=True):
            torch.testing.assert_close(got, 2.5 * want, rtol=1e-6, atol=1e-6)


def test_shared_head_terms_equal_weighted_sum_of_plain_terms() -> None:
    # DistiLLM-2's step: SKL on teacher responses + SRKL on student responses, one call.
    g = torch.Generator().manual_seed(6)
    vocab, hs, ht = 29, 5, 7
    w_s = torch.randn(vocab, hs, generator=g, requires_grad=True)
    w_t = torch.randn(vocab, ht, generator=g)
    h_c = torch.randn(B, T, hs, generator=g, requires_grad=True)
    h_r = torch.randn(2, 4, hs, generator=g, requires_grad=True)
    t_c, t_r = torch.randn(B, T, ht, generator=g), torch.randn(2, 4, ht, generator=g)
    m_c, m_r = torch.rand(B, T, generator=g) > 0.3, torch.rand(2, 4, generator=g) > 0.3
    m_c[:, 0] = m_r[:, 0] = True
    a_c, a_r, beta = torch.tensor([0.1, 0.05, 0.2]), torch.tensor([0.1, 0.3]), 0.6
    terms = [
        L.HiddenTerm(
            student_hidden=h_c,
            teacher_hidden=t_c,
            mask=m_c,
            divergence=L.skew_forward_kl,
            weight=1 - beta,
            reduction="sequence_mean",
            kwargs={"alpha": a_c},
        ),
        L.HiddenTerm(
            student_hidden=h_r,
            teacher_hidden=t_r,
            mask=m_r,
            divergence=L.skew_reverse_kl,
            weight=beta,
            reduction="sequence_mean",
            kwargs={"alpha": a_r, "detach_mixture_student": True},
        ),
    ]
    total, parts = L.chunked_divergences_from_hidden(terms, w_s, w_t, chunk_size=4)
    skl = L.skew_forward_kl(h_c @ w_s.T, t_c @ w_t.T, m_c, a_c, reduction="sequence_mean")
    srkl = L.skew_reverse_kl(h_r @ w_s.T, t_r @ w_t.T, m_r, a_r, reduction="sequence_mean", detach_mixture_student=True)
    plain = (1 - beta) * skl + beta * srkl
    torch.testing.assert_close(total, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts, torch.stack([skl, srkl]).detach(), rtol=1e-6, atol=1e-6)
    assert not parts.requires_grad
    params = (h_c, h_r, w_s)
    for got, want in zip(torch.autograd.grad(total, params), torch.autograd.grad(plain, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_hidden_state_path_allows_one_backward_only() -> None:
    h = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = fused_one(h, w, torch.randn(2, 3, 4), torch.randn(9, 4), None, L.forward_kl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_hidden_state_path_edge_cases() -> None:
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    ht, wt = torch.randn(B, T, 3, generator=g), torch.randn(9, 3, generator=g)
    empty = torch.zeros(B, T, dtype=torch.bool)
    zero = fused_one(h, w, ht, wt, empty, L.forward_kl, chunk_size=2)
    assert zero.item() == 0.0
    grads = torch.autograd.grad(zero, (h, w))
    assert all((x == 0).all() for x in grads)
    with torch.no_grad():
        value = fused_one(h, w, ht, wt, None, L.reverse_kl, chunk_size=4)
    assert value.item() == pytest.approx(L.reverse_kl(h @ w.T, ht @ wt.T, None).item(), rel=1e-6)
    frozen_head = w.detach()  # e.g. LoRA: only hidden states get gradients
    loss = fused_one(h, frozen_head, ht, wt, None, L.forward_kl, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, h)
    (gh_ref,) = torch.autograd.grad(L.forward_kl(h @ frozen_head.T, ht @ wt.T, None), h)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------- the methods, on fixed batches

D2 = DistiLLM2Params(
    contrastive=True,
    beta_ramp=True,
    adaptive_alpha=False,
    alpha_0=0.1,
    alpha_min=0.01,
    alpha_eps=1e-5,
    reference_batches=1,
    beta=BetaSchedule(0.5, 1.0, 0.0, 1.0),
    detach_mixture_student=True,
)
PARAMS = {
    "distillm2": D2,
    "distillm": DistiLLMParams(0.2),
    "gkd": GKDParams(0.3, 0.0),
    "dpkd": DPKDParams(0.7),
    "opd": OPDParams(0.5),
    "minillm": MiniLLMParams(0.2, length_norm=True),
}


def method_batch(reduction: str, chunked: bool, curriculum: AlphaCurriculum | None = None) -> MicroBatch:
    """B pairs with response masks, both models' final hidden states and LM heads, at step 3 of 7."""
    g = torch.Generator().manual_seed(7)
    hs, ht = 6, 4
    w_s, b_s, w_t, b_t = (torch.randn(*shape, generator=g) for shape in ((V, hs), (V,), (V, ht), (V,)))
    heads = Heads(
        s_weight=w_s.requires_grad_(True),  # the student's head is trained
        s_bias=b_s.requires_grad_(True),
        t_weight=w_t,
        t_bias=b_t,
        chunked=chunked,
        chunk_size=4,
        reduction=reduction,
        topk=False,
    )
    sides = []
    for length in (T, T - 1):  # chosen, rejected
        mask = torch.rand(B, length, generator=g) > 0.35
        mask[:, 0] = True
        h_s, h_t = torch.randn(B, length, hs, generator=g), torch.randn(B, length, ht, generator=g)
        y = torch.randint(0, V, (B, length), generator=g)
        behaviour = -torch.rand(B, length, generator=g) * 3  # a sampler's log-probs (minillm reads them)
        sides.append(Side(s_hidden=h_s.requires_grad_(True), t_hidden=h_t, mask=mask, targets=y, behaviour=behaviour))
    at = Progress(step=3, total_steps=7, micro=0, round_index=1, rounds=1, seed=0, positions=[0, 1, 2], global_size=B)
    return MicroBatch(
        chosen=sides[0], rejected=sides[1], heads=heads, at=at, curriculum=curriculum or AlphaCurriculum(D2)
    )


def ref_logits(x: MicroBatch, side: Side, teacher: bool) -> Tensor:
    h = x.heads
    hidden, w, b = (side.t_hidden, h.t_weight, h.t_bias) if teacher else (side.s_hidden, h.s_weight, h.s_bias)
    return hidden.double() @ w.double().T + b.double()


def ref_seq_logprob(x: MicroBatch, side: Side, teacher: bool) -> Tensor:
    """(B,) mean log-prob of the side's response tokens, from float64 probabilities."""
    lp = torch.log(ref_softmax(ref_logits(x, side, teacher))).gather(-1, side.targets[..., None]).squeeze(-1)
    return (lp * side.mask).sum(1) / side.mask.sum(1)


def ref_method(name: str, x: MicroBatch, p: object, alphas: tuple[object, object] | None = None) -> Tensor:
    """docs/METHOD.md's formula of each method, from the float64 references above."""
    c, r, red = x.chosen, x.rejected, x.heads.reduction
    sc, tc, sr, tr = (ref_logits(x, side, t) for side in (c, r) for t in (False, True))
    if name == "sft":
        nll, n = -ref_seq_logprob(x, c, False), c.mask.sum(1)
        return (nll * n).sum() / n.sum() if red == "token_mean" else nll.mean()
    if name == "kd":
        return ref_loss("forward_kl", sc, tc, c.mask, red)
    if name == "kd_both":
        return 0.5 * ref_loss("forward_kl", sc, tc, c.mask, red) + 0.5 * ref_loss("forward_kl", sr, tr, r.mask, red)
    if name == "gkd":  # lmbda 0: every pair on the teacher's response; 1: on the student's
        s, t, m = (sc, tc, c.mask) if p.lmbda == 0.0 else (sr, tr, r.mask)
        return ref_loss("generalized_jsd", s, t, m, red, p.beta)
    if name == "distillm":
        return 0.5 * ref_loss("skew_reverse_kl", sc, tc, c.mask, red, p.alpha) + 0.5 * ref_loss(
            "skew_reverse_kl", sr, tr, r.mask, red, p.alpha
        )
    if name == "distillm2":
        beta = p.beta.at(x.at.step, x.at.total_steps)
        a_t, a_s = alphas or (p.alpha_0, p.alpha_0)
        return (1 - beta) * ref_loss("skew_forward_kl", sc, tc, c.mask, red, a_t) + beta * ref_loss(
            "skew_reverse_kl", sr, tr, r.mask, red, a_s
        )
    if name in ("opd", "minillm"):
        return ref_on_policy(name, x, p)
    assert name == "dpkd"
    lq_t, lq_s, lp_t, lp_s = (ref_seq_logprob(x, side, t) for t in (False, True) for side in (c, r))
    return -F.logsigmoid(p.beta_d * ((lq_t - lq_s) - (lp_t - lp_s))).mean()


def ref_on_policy(name: str, x: MicroBatch, p: object) -> Tensor:
    """opd and minillm on the student's responses, token by token in float64 (docs/METHOD.md):
    a response's tokens are its masked positions in order."""
    r, per_seq = x.rejected, []
    lq_all = torch.log(ref_softmax(ref_logits(x, r, False)))
    lp_all = torch.log(ref_softmax(ref_logits(x, r, True)))
    for b in range(B):
        pos = [t for t in range(r.mask.shape[1]) if r.mask[b, t]]
        lq = [lq_all[b, t, r.targets[b, t]] for t in pos]
        lp = [lp_all[b, t, r.targets[b, t]] for t in pos]
        cost = [float(a.detach() - c) for a, c in zip(lq, lp)]
        terms = []
        for i, t in enumerate(pos):
            if name == "opd":
                to_go = sum(p.discount ** (j - i) * cost[j] for j in range(i, len(pos)))
                terms.append(to_go * lq[i])
            else:
                w = math.exp(float(lq[i].detach()) - float(r.behaviour[b, t]))
                later = [-c for c in cost[i + 1 :]]
                future = sum(later) / len(later) if later else 0.0
                kl = (lq_all[b, t].exp() * (lq_all[b, t] - lp_all[b, t])).sum()
                terms.append(w * kl - w * future * lq[i])
        per_seq.append(terms)
    # a sum per response, a mean over responses, whatever train.reduction says
    return sum(sum(ts) for ts in per_seq if ts) / sum(1 for ts in per_seq if ts)


def formula(name: str, x: MicroBatch, p: object) -> Tensor:
    """Each method as one expression of the public loss functions on full float32 logits:
    the arithmetic of the replaced objectives.py dispatch, for the bitwise check."""
    h, c, r = x.heads, x.chosen, x.rejected
    kw = {"reduction": h.reduction, "chunk_size": h.chunk_size}
    sc, sr = F.linear(c.s_hidden, h.s_weight, h.s_bias), F.linear(r.s_hidden, h.s_weight, h.s_bias)
    tc, tr = F.linear(c.t_hidden, h.t_weight, h.t_bias), F.linear(r.t_hidden, h.t_weight, h.t_bias)
    if name == "sft":
        nll = -h.seq_logprob(c, teacher=False)
        n = c.mask.sum(1).to(nll.dtype)
        return (nll * n).sum() / n.sum().clamp(min=1) if h.reduction == "token_mean" else nll[c.mask.any(1)].mean()
    if name == "kd":
        return L.forward_kl(sc, tc, c.mask, **kw)
    if name == "kd_both":
        return 0.5 * L.forward_kl(sc, tc, c.mask, **kw) + 0.5 * L.forward_kl(sr, tr, r.mask, **kw)
    if name == "gkd":  # lmbda 0: weights 1 and 0
        return L.generalized_jsd(sc, tc, c.mask, p.beta, **kw)
    if name == "distillm":
        return 0.5 * L.skew_reverse_kl(sc, tc, c.mask, p.alpha, **kw) + 0.5 * L.skew_reverse_kl(
            sr, tr, r.mask, p.alpha, **kw
        )
    if name == "distillm2":
        beta, alpha = p.beta.at(x.at.step, x.at.total_steps), torch.full((B,), p.alpha_0)
        return (1.0 - beta) * L.skew_forward_kl(sc, tc, c.mask, alpha, **kw) + beta * L.skew_reverse_kl(
            sr, tr, r.mask, alpha, detach_mixture_student=True, **kw
        )
    if name in ("opd", "minillm"):
        lq, seq = h.token_logprobs(r, teacher=False)
        lp, _ = h.token_logprobs(r, teacher=True)
        cost = lq.detach() - lp
        if name == "opd":
            return L.reduce_tokens(L.returns_to_go(cost, seq, B, p.discount) * lq, seq, B, "sequence_sum")
        w = torch.exp(lq.detach() - r.behaviour[r.mask])
        future = L.returns_to_go(-cost, seq, B, 1.0, future_mean=True)
        kl = h.token_reverse_kl(r)  # chunked from the hidden states (its float64 check: ref_on_policy)
        return L.reduce_tokens(w * kl - w * future * lq, seq, B, "sequence_sum")
    assert name == "dpkd"
    lq_t, lq_s = h.seq_logprob(c, teacher=False), h.seq_logprob(r, teacher=False)
    return L.dpkd_loss(lq_t, lq_s, h.seq_logprob(c, teacher=True), h.seq_logprob(r, teacher=True), p.beta_d)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("chunked", [False, True])
def test_method_loss_matches_float64_reference(name: str, reduction: str, chunked: bool) -> None:
    method = METHODS[name]
    p = PARAMS.get(method.params_section)
    x = method_batch(reduction, chunked)
    got, _ = method.loss(x, p)
    assert got.dtype == torch.float32 and got.ndim == 0 and got.requires_grad
    torch.testing.assert_close(got.double(), ref_method(name, x, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_method_loss_is_bitwise_its_formula_on_full_logits(name: str, reduction: str) -> None:
    """Loss and gradients (student hidden states and head) bit for bit."""
    method = METHODS[name]
    p = PARAMS.get(method.params_section)
    x = method_batch(reduction, chunked=False)
    leaves = [x.chosen.s_hidden, x.rejected.s_hidden, x.heads.s_weight, x.heads.s_bias]
    got, want = method.loss(x, p)[0], formula(name, x, p)
    assert torch.equal(got, want), (got.item(), want.item())
    g_got = torch.autograd.grad(got, leaves, allow_unused=True)
    g_want = torch.autograd.grad(want, leaves, allow_unused=True)
    for leaf, a, b in zip(leaves, g_got, g_want, strict=True):  # unused: no gradient, or an all-zero one
        assert torch.equal(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if b is None else b)


def test_gkd_on_student_responses_matches_reference() -> None:
    p = GKDParams(0.3, 1.0)
    x = method_batch("sequence_mean", chunked=True)
    got, logs = METHODS["gkd"].loss(x, p)
    assert logs["student_fraction"] == 1.0
    torch.testing.assert_close(got.double(), ref_method("gkd", x, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_distillm2_adaptive_alpha_matches_reference(chunked: bool) -> None:
    """With the reference gaps m_t, m_s measured, alpha per sequence is docs/METHOD.md's clip."""
    p = replace(D2, adaptive_alpha=True)
    cur = AlphaCurriculum(p, gaps_t=[0.05], gaps_s=[0.0015])  # m_t, m_s
    x = method_batch("sequence_mean", chunked, cur)
    got, logs = METHODS["distillm2"].loss(x, p)
    q_c, p_c = ref_seq_logprob(x, x.chosen, False).exp(), ref_seq_logprob(x, x.chosen, True).exp()
    q_r, p_r = ref_seq_logprob(x, x.rejected, False).exp(), ref_seq_logprob(x, x.rejected, True).exp()

    def alpha(gap: Tensor, m: float) -> Tensor:
        return torch.where(gap > 0, (1 - 0.9 * m / (gap + 1e-5)).clamp(0.01, 0.1), torch.full_like(gap, 0.1))

    a_t, a_s = alpha(p_c - q_c, 0.05), alpha(q_r - p_r, 0.0015)
    assert logs["alpha_t_mean"] == pytest.approx(a_t.mean().item(), rel=1e-5)
    assert logs["alpha_s_min"] == pytest.approx(a_s.min().item(), rel=1e-5)
    every = torch.cat([a_t, a_s]).detach()
    assert every.min() == 0.01 and every.max() == 0.1 and ((every > 0.01) & (every < 0.1)).any()  # clipped, and not
    torch.testing.assert_close(got.double(), ref_method("distillm2", x, p, (a_t, a_s)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("bad_alpha", [-0.1, 1.0, 1.5, float("nan"), torch.tensor([0.1, 1.0, 0.2])])
@pytest.mark.parametrize("name", SKEW)
def test_alpha_out_of_range_raises(name: str, bad_alpha: object) -> None:
    s, t, mask = make((B, T))
    with pytest.raises(ValueError, match="alpha"):
        call(name, s, t, mask, bad_alpha)


def test_bad_arguments_raise_value_error_naming_the_argument() -> None:
    s, t, mask = make((B, T))
    with pytest.raises(ValueError, match="alpha"):
        L.skew_forward_kl(s, t, mask, torch.tensor([0.1, 0.2]))  # not (B,)
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, t, mask, 1.2)
    with pytest.raises(ValueError, match="reduction"):
        L.forward_kl(s, t, mask, reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        L.forward_kl(s.reshape(-1, V), t.reshape(-1, V), mask.reshape(-1), reduction="sequence_mean")
    with pytest.raises(ValueError, match="teacher_logits"):
        L.reverse_kl(s, t[:, :-1], mask)
    with pytest.raises(ValueError, match="vocabulary"):
        L.reverse_kl(s, t[..., :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        L.tvd(s, t, mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        L.tvd(s, t, mask.long())
    with pytest.raises(ValueError, match="chunk_size"):
        L.forward_kl(s, t, mask, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        L.sequence_logprob(s, torch.full((B, T), V), mask)
    with pytest.raises(ValueError, match="teacher_rejected_lp"):
        L.dpkd_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.1)
    w = torch.randn(V, 4)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_one(torch.randn(B, T, 4), w, torch.randn(B, T, 4), w[:-1], mask, L.forward_kl)
    with pytest.raises(ValueError, match="mask"):
        fused_one(torch.randn(B, T, 4), w, torch.randn(B, T, 4), w, mask.T, L.forward_kl)


# ----------------------------------------------------------------------------- bench


def test_benchmark_quick_smoke() -> None:
    out = quick_benchmark("losses.py")
    assert "memory reduction" in out and "abs diff" in out
