"""The offline top-k teacher signal: how far the bucketed loss is from the full one."""

import pytest
import torch

from distillflow.training import losses

V, N = 200, 64


def logits(seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g, dtype=torch.float64) * scale


def topk_loss(fn, s: torch.Tensor, t: torch.Tensor, k: int, **kw: float) -> torch.Tensor:
    lp = t.log_softmax(-1)
    top = lp.topk(k, dim=-1)
    s_b, t_b = losses.topk_buckets(s, top.indices, top.values)
    return fn(s_b, t_b, None, **kw)


DIVERGENCES = [
    (losses.forward_kl, {}),
    (losses.reverse_kl, {}),
    (losses.skew_forward_kl, {"alpha": 0.1}),
    (losses.skew_reverse_kl, {"alpha": 0.1}),
]


@pytest.mark.parametrize("fn, kw", DIVERGENCES, ids=lambda x: getattr(x, "__name__", ""))
def test_error_shrinks_as_k_grows_and_vanishes_at_full_vocabulary(fn, kw: dict) -> None:
    s, t = logits(0, 2.0), logits(1, 4.0)  # a peaked teacher, like a trained model
    full = fn(s, t, None, **kw).item()
    errors = {k: abs(full - topk_loss(fn, s, t, k, **kw).item()) for k in (1, 4, 16, 64, V)}
    assert errors[V] < 1e-9
    assert errors[64] < errors[16] < errors[4] < errors[1]
    # Coarsening can only lose information (data processing inequality).
    for k in (1, 4, 16, 64):
        assert topk_loss(fn, s, t, k, **kw).item() <= full + 1e-12


def test_buckets_are_normalised_and_carry_gradients() -> None:
    s = logits(2, 1.0).requires_grad_()
    lp = logits(3, 3.0).log_softmax(-1)
    top = lp.topk(8, dim=-1)
    s_b, t_b = losses.topk_buckets(s, top.indices, top.values)
    assert s_b.shape == t_b.shape == (N, 9)
    torch.testing.assert_close(s_b.exp().sum(-1), torch.ones(N, dtype=s_b.dtype))
    torch.testing.assert_close(t_b.exp().sum(-1), torch.ones(N, dtype=t_b.dtype))
    losses.forward_kl(s_b, t_b, None).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_shape_errors_name_the_arguments() -> None:
    s = logits(0, 1.0)
    with pytest.raises(ValueError, match="teacher_ids .* and teacher_logprobs"):
        losses.topk_buckets(s, torch.zeros(N, 3, dtype=torch.long), torch.zeros(N, 4))
    with pytest.raises(ValueError, match="student_logits must be"):
        losses.topk_buckets(s[:5], torch.zeros(N, 3, dtype=torch.long), torch.zeros(N, 3))
