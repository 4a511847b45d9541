"""Peak memory of the score stage's output path and train's read-back, new vs old.

New (what stages/score.py and stored_topk.index_scores do now): scoring.score_batches
yields one typed Arrow record batch per model batch, scorestep.stream_topk streams them
into topk.parquet (ParquetSink, row groups of 2 x score.batch_size rows, as main does);
train reads the file with read_table and stored_topk.index_scores (zero-copy numpy views at
the list offsets).
Old (the code they replaced, reimplemented inline below): full (B, T, V) logits,
`.tolist()` of every row's top-k, `pa.Table.from_pylist` of all rows, io.write_table;
train read it back with read_rows (to_pylist) and a torch.tensor per list.

A tiny random toy Llama (the toy character tokenizer, hidden size 16) scores synthetic
pairs whose chosen and rejected responses hold `--positions` response positions in all
(default 1,000,000; `--response-chars` + 1 = 200 per response by default, so 2,500
pairs, 5,000 rows) at k = `--k` (default 16). Each of the four paths runs in its own
process; its peak resident memory (ru_maxrss) is reported absolute and as the growth
over the process's resident memory just before the path started (imports, model and
pairs loaded), with the wall time of the path alone.

Run:
    python benchmarks/score_memory.py                              # 1M positions, k=16 (about 1-2 min on 2 cores)
    python benchmarks/score_memory.py --positions 100000 --old-positions 100000
    python benchmarks/score_memory.py --response-chars 24   # short responses: per-row costs weigh more
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distillflow.base import (  # noqa: E402
    encoding,
    models,  # noqa: E402
    records,
)
from distillflow.base.config import OpenAIParams  # noqa: E402
from distillflow.base.io import read_rows, read_table, write_table  # noqa: E402
from distillflow.engines import scoring  # noqa: E402
from distillflow.stagekit import scorestep  # noqa: E402
from distillflow.training import basics, stored_topk  # noqa: E402

BATCH_SIZE = 256


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def synthetic_pairs(tok: Any, positions: int, chars: int) -> list[dict[str, Any]]:
    """Pairs with both responses `chars` characters long (chars + 1 response positions
    with the toy tokenizer, eos included), enough of them for `positions`."""
    one = len(encoding.encode_pair(tok, pair(0, chars))[1])
    return [pair(i, chars) for i in range(-(-positions // (2 * one)))]


def pair(i: int, chars: int) -> dict[str, Any]:
    letters = "abcdefghij"
    text = "".join(letters[(i * 7 + j * 3) % 10] for j in range(chars))
    return {
        "pair_id": f"p{i:08d}",
        "prompt": f"Reverse {i}.",
        "chosen": text,
        "rejected": text[::-1],
        "chosen_finish_reason": "stop",
        "chosen_token_ids": None,  # no sampled ids: the text is tokenized
        "rejected_token_ids": None,
        "rejected_finish_reason": "stop",
    }


@torch.no_grad()
def old_rows(
    teacher: torch.nn.Module, tok: Any, pairs: list[dict[str, Any]], k: int, batch_size: int
) -> list[dict[str, Any]]:
    """The replaced scorer (full (B, T, V) logits, .tolist() per row): what this benchmark
    measures the streamed path against, and the reference tests/test_score.py checks the
    streamed path reproduces."""
    vocab = len(tok)
    seqs = []
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        seqs += [(pr["pair_id"], "chosen", (prompt, chosen)), (pr["pair_id"], "rejected", (prompt, rejected))]
    rows = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        b = encoding.collate([c[2] for c in chunk], tok.pad_token_id)
        logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
        for i, (pid, side, _) in enumerate(chunk):
            m = b.response_mask[i]
            lp = torch.log_softmax(logits[i][m].float(), dim=-1)
            top = lp.topk(k, dim=-1)
            rows.append(
                {
                    "pair_id": pid,
                    "side": side,
                    "positions": int(m.sum()),
                    "k": k,
                    "topk_ids": top.indices.flatten().tolist(),
                    "topk_logprobs": top.values.flatten().tolist(),
                    "target_logprob": lp.gather(-1, b.targets[i][m][:, None]).squeeze(-1).tolist(),
                }
            )
    return rows


def old_index(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """The replaced reader: a torch tensor per Python list."""
    out = {}
    for r in rows:
        n, k = r["positions"], r["k"]
        out[(r["pair_id"], r["side"])] = (
            k,
            torch.tensor(r["topk_ids"], dtype=torch.long).view(n, k),
            torch.tensor(r["topk_logprobs"], dtype=torch.float32).view(n, k),
            torch.tensor(r["target_logprob"], dtype=torch.float32),
        )
    return out


def child(mode: str, work: Path, positions: int, k: int, chars: int) -> None:
    """One path in this process; prints a JSON line with its measurements."""
    torch.set_num_threads(1)
    ref = models.ModelRef(str(work / "teacher"), None)
    teacher = models.load_model(ref, work / "teacher", False, "float32").eval()
    tok = models.load_tokenizer(ref, work / "teacher", False)
    pairs = synthetic_pairs(tok, positions, chars)
    out = work / f"{mode}.parquet"
    before, start = rss_bytes(), time.perf_counter()
    if mode == "write-new":
        unused = OpenAIParams(None, None, None, 1, 1.0, 0, 1.0, "unused")  # engine transformers: no endpoint
        p = scoring.ScoreParams(
            k=k,
            batch_size=BATCH_SIZE,
            device="cpu",
            engine="transformers",
            openai=unused,
            logprobs_via="prompt_logprobs",
        )
        rows, scored = scorestep.stream_topk(out, scoring.score_batches(teacher, tok, pairs, p), 2 * BATCH_SIZE)
    elif mode == "write-old":
        old = old_rows(teacher, tok, pairs, k, BATCH_SIZE)
        rows, scored = write_table(out, old, records.TOPK_SCHEMA), sum(r["positions"] for r in old)
    elif mode == "read-new":
        index = stored_topk.index_scores(read_table(work / "write-new.parquet", records.TOPK_SCHEMA))
        rows, scored = len(index), sum(v[1].shape[0] for v in index.values())
    elif mode == "read-old":
        index = old_index(read_rows(work / "write-new.parquet", records.TOPK_SCHEMA))
        rows, scored = len(index), sum(v[1].shape[0] for v in index.values())
    else:
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"mode": mode, "rows": rows, "positions": scored, "before": before, "peak": peak_bytes(), "s": seconds}
        )
    )


def run_child(mode: str, work: Path, positions: int, k: int, chars: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--positions", str(positions)]
    cmd += ["--k", str(k), "--response-chars", str(chars)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1_000_000, help="response positions scored (new path)")
    ap.add_argument("--old-positions", type=int, default=None, help="for the old paths (default: --positions)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--response-chars", type=int, default=199, help="per response: this + 1 positions (eos)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child, a.work, a.positions, a.k, a.response_chars)
        return
    old_positions = a.old_positions or a.positions
    with tempfile.TemporaryDirectory(prefix="score_memory.") as tmp:
        work = Path(tmp)
        tok = models.build_char_tokenizer()
        arch = models.ToyArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
        basics.save_model(
            models.build_toy_model(arch, len(tok), tok, seed=0, max_positions=a.response_chars + 64),
            tok,
            work / "teacher",
        )
        results = {}
        for mode, n in (("write-new", a.positions), ("read-new", a.positions)):
            results[mode] = run_child(mode, work, n, a.k, a.response_chars)
        if old_positions != a.positions:  # the old reader reads the new writer's file: write one of the old size
            (work / "write-new.parquet").rename(work / "big.parquet")
            run_child("write-new", work, old_positions, a.k, a.response_chars)
        for mode in ("write-old", "read-old"):
            results[mode] = run_child(mode, work, old_positions, a.k, a.response_chars)
    print(
        f"score output at k={a.k}: toy teacher (vocabulary {len(tok)}), {BATCH_SIZE} sequences per batch, "
        f"{a.response_chars + 1} positions per response"
    )
    print(f"{'path':<46}{'positions':>11}{'rows':>9}{'peak RSS':>12}{'growth':>12}{'seconds':>9}")
    labels = {
        "write-new": "score, new: Arrow batches -> ParquetSink",
        "write-old": "score, old: tolist rows -> from_pylist",
        "read-new": "train read, new: read_table -> index_scores",
        "read-old": "train read, old: read_rows -> torch.tensor",
    }
    for mode in ("write-new", "write-old", "read-new", "read-old"):
        r = results[mode]
        growth = r["peak"] - r["before"]
        print(
            f"{labels[mode]:<46}{r['positions']:>11,}{r['rows']:>9,}{mib(r['peak']):>12}{mib(growth):>12}{r['s']:>9.1f}"
        )
    if old_positions != a.positions:
        print(f"(old paths measured at {old_positions:,} positions, not {a.positions:,}: per-position growth compared)")
    for what in ("write", "read"):
        new, old = results[f"{what}-new"], results[f"{what}-old"]
        per_new = (new["peak"] - new["before"]) / new["positions"]
        per_old = (old["peak"] - old["before"]) / old["positions"]
        print(
            f"{what}: peak growth per position (fixed costs included) {per_old:,.0f} B old vs {per_new:,.0f} B new: "
            f"{per_old / max(per_new, 1e-9):,.1f}x less memory"
        )


if __name__ == "__main__":
    main()
