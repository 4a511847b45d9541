"""Distillation losses as pure tensor functions (see docs/METHOD.md), one module per concern.

    divergences.py  forward / reverse KL, skew KL, skew reverse KL, generalized JSD and
                    TVD from full logits: ``fn(student_logits, teacher_logits, mask,
                    [alpha | beta], *, reduction="token_mean", chunk_size=1024)``
    fused.py        the same divergences from final hidden states and the LM heads,
                    never materialising (N, V) logits (the default training path)
    topk.py         the offline teacher signal: distributions over the teacher's top-k
    sequence.py     sequence log-probs of given labels, the DPKD loss, and per-token
                    returns (on-policy distillation, MiniLLM)
    chunks.py       the one chunking mechanism every path uses, and ``reduce_tokens``
    checks.py       argument checks and the dtype rule (math in float32, float64 kept)

The public names are re-exported here, so callers write ``losses.skew_reverse_kl(...)``.

Run the tests: ``pytest tests/test_losses.py tests/test_losses_topk.py -q``; the memory
benchmark: ``OMP_NUM_THREADS=1 python benchmarks/losses.py``.
"""

from distillflow.training.losses.chunks import DEFAULT_CHUNK_SIZE, reduce_tokens, run_chunks
from distillflow.training.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from distillflow.training.losses.fused import HiddenTerm, chunked_divergences_from_hidden
from distillflow.training.losses.sequence import dpkd_loss, returns_to_go, sequence_logprob, sequence_logprob_sum
from distillflow.training.losses.topk import topk_buckets

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HiddenTerm",
    "chunked_divergences_from_hidden",
    "dpkd_loss",
    "forward_kl",
    "generalized_jsd",
    "reduce_tokens",
    "returns_to_go",
    "reverse_kl",
    "run_chunks",
    "sequence_logprob",
    "sequence_logprob_sum",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_buckets",
    "tvd",
]
