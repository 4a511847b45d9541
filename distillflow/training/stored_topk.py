"""The teacher's stored top-k signal as the trainer reads it (`train.teacher_signal:
topk`): data/score's rows (records.TOPK_SCHEMA) indexed by (pair_id, side), and laid
out densely over a batch's positions.

    scores = index_scores(read_table(scores_dir / "topk.parquet", records.TOPK_SCHEMA))
    topk = topk_of(batch, [(pair_id, "chosen"), ...], scores)   # heads.TopK (B, T, k)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import torch

from distillflow.base import encoding, records
from distillflow.base.io import DataError, read_table
from distillflow.training.methods.heads import TopK
from distillflow.training.train_params import TrainParams

# (pair_id, side) -> (k, top-k ids (positions, k) int32, top-k log-probs (positions, k), target log-probs (positions,))
Scores = dict[tuple[str, str], tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]


def index_scores(table: pa.Table) -> Scores:
    """The stored top-k signal (records.TOPK_SCHEMA rows) keyed by (pair_id, side), read
    from the Arrow columns: per record batch, zero-copy numpy views of each flattened list
    column, and per row tensor views into them at the list offsets (no Python list per
    entry, no copy of the values). The tensors share the table's read-only buffers: read
    them, never write into them (topk_of copies them into its batch tensors)."""
    out: Scores = {}
    row = 0
    for batch in table.to_batches():
        cols = {name: batch.column(name) for name in ("topk_ids", "topk_logprobs", "target_logprob")}
        flat = {name: col.values.to_numpy(zero_copy_only=True) for name, col in cols.items()}
        offsets = {name: col.offsets.to_numpy() for name, col in cols.items()}
        positions, ks = batch.column("positions").to_numpy(), batch.column("k").to_numpy()
        with warnings.catch_warnings():  # torch warns that the Arrow buffers are not writable
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for i, (pid, side_) in enumerate(
                zip(batch.column("pair_id").to_pylist(), batch.column("side").to_pylist())
            ):
                n, k = int(positions[i]), int(ks[i])
                lengths = tuple(int(o[i + 1] - o[i]) for o in offsets.values())
                if lengths != (n * k, n * k, n):
                    raise DataError(
                        f"data/score: pair {pid} ({side_}), row {row + i}: topk_ids/topk_logprobs/target_logprob "
                        f"have {lengths} entries, expected ({n * k}, {n * k}, {n}) for {n} positions at k={k}"
                    )
                ids, lps, tgt = (torch.from_numpy(flat[c][offsets[c][i] : offsets[c][i + 1]]) for c in cols)
                out[(pid, side_)] = (k, ids.view(n, k), lps.view(n, k), tgt)
        row += batch.num_rows
    return out


def topk_of(batch: encoding.Batch, keys: list[tuple[str, str]], scores: Scores) -> TopK:
    """The stored teacher signal of a batch, laid out densely over (B, T) positions."""
    B, T = batch.response_mask.shape
    k = next(iter(scores.values()))[0]
    ids = torch.zeros((B, T, k), dtype=torch.long)
    lps = torch.zeros((B, T, k), dtype=torch.float32)
    target = torch.zeros((B, T), dtype=torch.float32)
    for row, key in enumerate(keys):
        if key not in scores:
            raise DataError(f"data/score: no teacher scores for pair {key[0]} ({key[1]}); rerun the score stage")
        _, i, lp, tg = scores[key]
        m = batch.response_mask[row]
        if int(m.sum()) != i.shape[0]:
            raise DataError(
                f"data/score: pair {key[0]} ({key[1]}) has {i.shape[0]} scored positions, "
                f"the tokenizer gives {int(m.sum())}"
            )
        ids[row, m], lps[row, m], target[row, m] = i.long(), lp, tg
    return TopK(ids, lps, target)


def load_scores(p: TrainParams, scores_dir: Path) -> Scores | None:
    """The teacher's stored top-k signal (scores_dir/topk.parquet) with `teacher_signal:
    topk`, else None."""
    if p.teacher_signal != "topk":
        return None
    return index_scores(read_table(scores_dir / "topk.parquet", records.TOPK_SCHEMA))


def over_responses(mask: torch.Tensor, rows: list[list[float]]) -> torch.Tensor:
    """(B, T) float32: row b's values at the response positions of mask[b], 0 elsewhere."""
    dense = torch.zeros(mask.shape, dtype=torch.float32)
    for b, values in enumerate(rows):
        dense[b, mask[b]] = torch.tensor(values, dtype=torch.float32)
    return dense


def served_topk(batch: encoding.Batch, target: list[list[float]]) -> TopK:
    """The served teacher's log-prob of each sampled token (train.online.teacher served),
    laid out over the batch's response positions as the stored signal's target; its
    top-k is empty (k = 0: opd, the one method this feeds, reads only the target)."""
    B, T = batch.response_mask.shape
    empty = torch.zeros((B, T, 0))
    return TopK(empty.long(), empty, over_responses(batch.response_mask, target))
