"""The teacher's top-k log-probs on curated pairs (the score stage's logic, callable in
process: an on-policy round scores its pairs here).

For both responses of each pair (chosen and rejected), at every response position: the
teacher's `k` most likely next tokens with their log-probs, and its log-prob of the
token actually there; rows follow records.TOPK_SCHEMA.

    for batch in score_batches(teacher, tok, pairs, p):   # one pa.RecordBatch per model batch
        sink.write(batch)

Memory stays bounded by one model batch: each batch's results go straight from torch
tensors into typed Arrow arrays (int32 ids, float32 log-probs, list offsets from the
per-row position counts), never into Python lists. The model runs without its LM head
(`base_model`, no KV cache); the head is applied only at response positions, in chunks
of `HEAD_CHUNK` positions, so no (batch, length, vocabulary) logits tensor exists.
Ids past the tokenizer's length are padding rows of the head and are never scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from distillflow.base import encoding, models, records
from distillflow.base.config import Device, OpenAIParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import DataError
from distillflow.base.params import check
from distillflow.base.teachers import TeacherSet

HEAD_CHUNK = 4096  # response positions per LM-head matmul: (HEAD_CHUNK, vocabulary) float32 logits at a time


@dataclass(frozen=True)
class ScoreParams:
    """params.yaml `score`."""

    k: int  # 0 = off
    batch_size: int  # responses per teacher forward pass (transformers); (pair, side) rows per record batch
    device: Device  # cpu | cuda: where the teacher runs (transformers)
    # transformers: the teacher model (models.teacher) in this process | vllm: the same model loaded by vLLM's
    # offline engine (prompt_logprobs; device: the vLLM build's) | openai: a teacher served behind an
    # OpenAI-compatible completions endpoint that returns prompt_logprobs (vLLM), sharing the student's tokenizer
    engine: Literal["transformers", "vllm", "openai"]
    openai: OpenAIParams  # the served teacher's endpoint (engine openai): distillflow/engines/served.py
    # how the served teacher (engine openai) is asked for log-probs: prompt_logprobs (vLLM's extension: token
    # ids) | echo (the completions API's echo with logprobs: token texts, each mapped to our one id)
    logprobs_via: Literal["prompt_logprobs", "echo"]

    def __post_init__(self) -> None:
        engines = ("transformers", "vllm", "openai")
        check(self.engine in engines, "engine", f"must be one of {list(engines)}, got {self.engine!r}")
        check(
            self.engine != "openai" or self.openai.is_set,
            "openai",
            "engine openai needs openai.base_url and openai.model (the served teacher's endpoint)",
        )
        vias = ("prompt_logprobs", "echo")
        check(self.logprobs_via in vias, "logprobs_via", f"must be one of {list(vias)}, got {self.logprobs_via!r}")
        check(self.k >= 0, "k", "must be >= 0 (0 switches scoring off)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.device in ("cpu", "cuda"), "device", f"must be cpu or cuda, got {self.device!r}")


def _list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=typ))


def to_record_batch(
    keys: list[tuple[str, str]], positions: np.ndarray, k: int, ids: np.ndarray, lps: np.ndarray, target: np.ndarray
) -> pa.RecordBatch:
    """One TOPK_SCHEMA record batch from flat arrays: row i covers `positions[i]` response
    positions; `ids` and `lps` are (sum(positions), k), `target` is (sum(positions),)."""
    n = len(keys)
    if positions.shape != (n,) or ids.shape != (int(positions.sum()), k) or lps.shape != ids.shape:
        raise ValueError(
            f"to_record_batch: {n} rows with {int(positions.sum())} positions at k={k}, "
            f"but ids {ids.shape}, log-probs {lps.shape}, targets {target.shape}"
        )
    if target.shape != (ids.shape[0],):
        raise ValueError(f"to_record_batch: targets {target.shape}, expected ({ids.shape[0]},)")
    if int(positions.sum()) * max(k, 1) >= 2**31:
        raise ValueError(f"to_record_batch: {int(positions.sum())} positions x k={k} overflow int32 list offsets")
    ends = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(positions, out=ends[1:])
    return pa.record_batch(
        [
            pa.array([key[0] for key in keys], type=pa.string()),
            pa.array([key[1] for key in keys], type=pa.string()),
            pa.array(positions, type=pa.int32()),
            pa.array(np.full(n, k, dtype=np.int32), type=pa.int32()),
            _list_array(ends * k, ids.reshape(-1).astype(np.int32, copy=False), pa.int32()),
            _list_array(ends * k, lps.reshape(-1).astype(np.float32, copy=False), pa.float32()),
            _list_array(ends, target.astype(np.float32, copy=False), pa.float32()),
        ],
        schema=records.TOPK_SCHEMA,
    )


@dataclass(frozen=True)
class Mixture:
    """Several teachers scored as one (models.teachers, base/teachers.py): `models[k]` is
    teacher k of `teachers`, on score.device. Under mix each position's target is
    log sum_k w_k p_k; under route and category, the pair's teacher's (its `teacher`
    column)."""

    models: list[torch.nn.Module]
    teachers: TeacherSet

    def log_weights(self, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each pair's log weight per teacher (K,): log w_k under mix, 0 for its teacher
        and -inf for the others under route and category."""
        ts = self.teachers
        if ts.routing == "mix":
            mixed = torch.tensor([t.weight for t in ts.teachers], dtype=torch.float32).log()
            return {pr["pair_id"]: mixed for pr in pairs}
        out = {}
        for row, pr in enumerate(pairs):
            if pr["teacher"] is None:
                raise DataError(
                    f"curated pairs: row {row}, field 'teacher': null, but models.routing is {ts.routing} over "
                    f"{ts.labels}: rerun the teacher stage with models.teachers set"
                )
            w = torch.full((len(ts.teachers),), -math.inf)
            w[ts.index(pr["teacher"])] = 0.0
            out[pr["pair_id"]] = w
        return out


@torch.no_grad()
def score_batches(
    teacher: torch.nn.Module | Mixture, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams
) -> Iterator[pa.RecordBatch]:
    """Top-k record batches (records.TOPK_SCHEMA), one per model batch of `p.batch_size`
    sequences, for every (pair, side) in pair order, chosen before rejected. `teacher`
    (each of a Mixture's) must already be on `p.device`."""
    vocab = len(tok)
    if p.k > vocab:
        raise ParamsError(f"score.k: {p.k} is larger than the vocabulary ({vocab} tokens)")
    members = teacher.models if isinstance(teacher, Mixture) else [teacher]
    logw = teacher.log_weights(pairs) if isinstance(teacher, Mixture) else None
    device = next(members[0].parameters()).device
    for m in members:
        where = next(m.parameters()).device
        if where.type != p.device:
            raise ValueError(f"score.device is {p.device}, but the teacher's parameters are on {where}; move it first")
    heads = [models.lm_head(m, vocab, "teacher") for m in members]
    seqs = []
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        seqs += [(pr["pair_id"], "chosen", (prompt, chosen)), (pr["pair_id"], "rejected", (prompt, rejected))]
    for s in tqdm(range(0, len(seqs), p.batch_size), desc="score teacher", unit="batch", mininterval=5.0):
        chunk = seqs[s : s + p.batch_size]
        b = encoding.collate([c[2] for c in chunk], tok.pad_token_id)
        if s == 0:
            for m in members:
                models.check_plain_head(m, b.input_ids[:1].to(device), b.attention_mask[:1].to(device), "teacher")
        mask = b.response_mask.to(device)
        positions = b.response_mask.sum(dim=1).numpy().astype(np.int32)
        row_w = None if logw is None else torch.stack([logw[c[0]] for c in chunk])  # (B, K)
        w = None if row_w is None else row_w.repeat_interleave(mask.sum(1).cpu(), 0)  # (N, K)
        routed = isinstance(teacher, Mixture) and teacher.teachers.routing != "mix"
        hs = _hiddens(members, b, mask, device, row_w if routed else None)
        targets = b.targets.to(device)[mask]
        ids, lps, tgt = [], [], []
        for c in range(0, int(positions.sum()), HEAD_CHUNK):
            lp = _chunk_logprobs(hs, heads, None if w is None else w[c : c + HEAD_CHUNK].to(device), c)
            top = lp.topk(p.k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            lps.append(top.values.cpu())
            tgt.append(lp.gather(-1, targets[c : c + HEAD_CHUNK, None]).squeeze(-1).cpu())
        k = p.k
        yield to_record_batch(
            [(c[0], c[1]) for c in chunk],
            positions,
            k,
            torch.cat(ids).numpy() if ids else np.zeros((0, k), np.int32),
            torch.cat(lps).numpy() if lps else np.zeros((0, k), np.float32),
            torch.cat(tgt).numpy() if tgt else np.zeros(0, np.float32),
        )


def _hiddens(
    members: list[torch.nn.Module], b: encoding.Batch, mask: torch.Tensor, device: Any, routed: torch.Tensor | None
) -> dict[int, torch.Tensor]:
    """Each teacher's final hidden states (N, H) at the batch's response positions, row
    major (sequence by sequence, positions in order), by teacher index. With `routed`
    (the rows' log weights, (B, K): 0 for a row's teacher, -inf for the others) each
    teacher runs only on its own rows, and its other positions stay zero (their weight
    is -inf, so they never count); otherwise every teacher runs on every row."""
    ids, attn = b.input_ids.to(device), b.attention_mask.to(device)
    if routed is None:
        return {
            k: m.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[mask]
            for k, m in enumerate(members)
        }
    out = {}
    own = torch.isfinite(routed)  # (B, K)
    positions = own.to(device).repeat_interleave(mask.sum(1), 0)  # (N, K)
    for k, m in enumerate(members):
        rows = own[:, k].nonzero().squeeze(1).to(device)
        if rows.numel() == 0:
            continue
        h = m.base_model(input_ids=ids[rows], attention_mask=attn[rows], use_cache=False).last_hidden_state
        full = h.new_zeros((int(mask.sum()), h.shape[-1]))
        full[positions[:, k]] = h[mask[rows]]
        out[k] = full
    return out


def _chunk_logprobs(
    hs: dict[int, torch.Tensor], heads: list[tuple[Any, Any]], w: torch.Tensor | None, c: int
) -> torch.Tensor:
    """(chunk, vocab) log-probs at positions c.. of the batch: the one teacher's (`w`
    None), else log sum_k exp(w[:, k]) p_k, accumulated teacher by teacher (two
    (chunk, vocab) tensors at a time)."""
    lp: torch.Tensor | None = None
    for k, h in hs.items():
        logits = torch.nn.functional.linear(h[c : c + HEAD_CHUNK], *heads[k])
        lpk = torch.log_softmax(logits.float(), dim=-1)
        if w is None:
            return lpk
        lpk = lpk + w[:, k, None]
        lp = lpk if lp is None else torch.logaddexp(lp, lpk)
    assert lp is not None
    return lp


def score(teacher: torch.nn.Module | Mixture, tok: Any, pairs: list[dict[str, Any]], p: ScoreParams) -> pa.Table:
    """Top-k rows for every (pair, side), in pair order, chosen before rejected, as one
    table (small runs and tests; the stage streams score_batches into a file)."""
    batches = list(score_batches(teacher, tok, pairs, p))
    return pa.Table.from_batches(batches, schema=records.TOPK_SCHEMA)
