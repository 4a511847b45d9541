"""The teacher's top-k log-probs on curated pairs (the score stage's logic, callable in
process: an on-policy round scores its pairs here).

For both responses of each pair (chosen and rejected), at every response position: the
teacher's `k` most likely next tokens with their log-probs, and its log-prob of the
token actually there; rows follow records.TOPK_SCHEMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from stages.lib.core.errors import ParamsError
from stages.lib.core.params import check
from stages.lib.data import encoding


@dataclass(frozen=True)
class ScoreParams:
    """params.yaml `score`."""

    k: int  # 0 = off
    batch_size: int

    def __post_init__(self) -> None:
        check(self.k >= 0, "k", "must be >= 0 (0 switches scoring off)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


@torch.no_grad()
def score(teacher: torch.nn.Module, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams) -> list[dict[str, Any]]:
    """Top-k rows for every (pair, side), in pair order, chosen before rejected."""
    vocab = len(tok)
    if p.k > vocab:
        raise ParamsError(f"score.k: {p.k} is larger than the vocabulary ({vocab} tokens)")
    device = next(teacher.parameters()).device
    seqs = []
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        seqs += [(pr["pair_id"], "chosen", (prompt, chosen)), (pr["pair_id"], "rejected", (prompt, rejected))]
    rows = []
    for s in tqdm(range(0, len(seqs), p.batch_size), desc="score teacher", unit="batch", mininterval=5.0):
        chunk = seqs[s : s + p.batch_size]
        b = encoding.collate([c[2] for c in chunk], tok.pad_token_id)
        logits = teacher(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits[
            ..., :vocab
        ]
        for i, (pid, side, _) in enumerate(chunk):
            m = b.response_mask[i].to(device)
            lp = torch.log_softmax(logits[i][m].float(), dim=-1)  # (positions, V)
            top = lp.topk(p.k, dim=-1)
            target = lp.gather(-1, b.targets[i].to(device)[m][:, None]).squeeze(-1)
            rows.append(
                {
                    "pair_id": pid,
                    "side": side,
                    "positions": int(m.sum()),
                    "k": p.k,
                    "topk_ids": top.indices.flatten().tolist(),
                    "topk_logprobs": top.values.flatten().tolist(),
                    "target_logprob": target.tolist(),
                }
            )
    return rows
