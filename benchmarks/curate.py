"""Scale of the data stages: seed and curate on 10k, 100k and 1M synthetic records.

For each size N, in a scratch folder:
1. a Parquet prompt source of N synthetic prompts (8 to 20 words from a 2,000-word
   vocabulary; 1% exact repeats, which seed quarantines as duplicates);
2. `python -m stages.seed` on it (source kind parquet; every valid prompt is used:
   num_train and num_eval are set to N), with the gates on;
3. N pairs built on the seed's training prompts (1% exact repeats of an earlier pair's
   content under a new id, 1% truncated teacher responses, 1% near-duplicate prompts);
4. `python -m stages.curate` on them, streaming in `quality.batch_rows` batches,
   every filter and both gates on, Data Docs rendered.

Each stage runs as its own process, started the way dvc.yaml starts it; its wall time
and peak resident memory (os.wait4's ru_maxrss, that process alone) are measured.
Rows per second = input rows / wall seconds (process start and imports included).
The table ends with the growth ratios between sizes (time and memory per 10x rows)
and the check against the target: peak memory under 2 GiB at 1M rows on 2 cores.

Run:
    python benchmarks/curate.py                  # 10k, 100k, 1M (about 10 minutes on 2 cores)
    python benchmarks/curate.py --sizes 10000    # one size
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillflow.base import records

TARGET_BYTES = 2 * 1024**3
CHUNK = 50_000


def vocabulary(rng: random.Random, n: int = 2000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def write_source(path: Path, n: int, seed: int) -> None:
    """N prompts, 1% of them exact repeats of an earlier one."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    schema = pa.schema([pa.field("text", pa.string())])
    recent: list[str] = []
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, CHUNK):
            texts = []
            for _ in range(min(CHUNK, n - start)):
                if recent and rng.random() < 0.01:
                    texts.append(rng.choice(recent))
                    continue
                t = f"Explain {' '.join(rng.choice(words) for _ in range(rng.randint(8, 20)))}."
                texts.append(t)
                recent = (recent + [t])[-1000:]
            w.write_table(pa.table({"text": texts}, schema=schema))


def write_pairs(seed_dir: Path, path: Path, n: int, seed: int) -> int:
    """N pairs on the seed's training prompts (cycled), with 1% content repeats under
    new ids, 1% truncated chosen responses and 1% near-duplicate prompts."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    pf = pq.ParquetFile(seed_dir / "train.parquet")
    made = 0
    last: dict[str, Any] | None = None
    with pq.ParquetWriter(path, records.PAIR_SCHEMA, compression="zstd") as w:
        while made < n:
            for batch in pf.iter_batches(batch_size=CHUNK, columns=["prompt_id", "prompt"]):
                rows = []
                for pid, prompt in zip(
                    batch.column("prompt_id").to_pylist(), batch.column("prompt").to_pylist(), strict=True
                ):
                    if made >= n:
                        break
                    k = made
                    made += 1
                    u = rng.random()
                    chosen = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                    rejected = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                    if last is not None and u < 0.01:  # the same content again, under a new pair id
                        pid, prompt, chosen, rejected = (
                            last["prompt_id"],
                            last["prompt"],
                            last["chosen"],
                            last["rejected"],
                        )
                    elif last is not None and u < 0.02:  # a near duplicate of the previous pair
                        chosen = last["chosen"]
                        prompt = last["prompt"].rstrip(".") + " please."
                    c_id = records.generation_id(pid, "bench-teacher", {}, k)
                    r_id = records.generation_id(pid, "bench-student", {}, k)
                    row = {
                        "pair_id": records.pair_id(pid, c_id, r_id),
                        "prompt_id": pid,
                        "chosen_id": c_id,
                        "rejected_id": r_id,
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": rejected,
                        "reference": None,
                        "category": f"c{k % 7}",
                        "chosen_finish_reason": "length" if 0.02 <= u < 0.03 else "stop",
                        "rejected_finish_reason": "stop",
                        "chosen_tokens": len(chosen.split()) + 1,
                        "rejected_tokens": len(rejected.split()) + 1,
                        "teacher": None,
                        "chosen_token_ids": None,
                        "rejected_token_ids": None,
                    }
                    rows.append(row)
                    last = row
                w.write_table(pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA))
    return made


def params_file(folder: Path, source: Path, n: int) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["seed"]["source"] = {
        "kind": "parquet",
        "path": str(source),
        "config": None,
        "split": None,
        "revision": None,
        "field": "text",
    }
    p["seed"]["group_by"] = None  # params.yaml's `instance` is the toy source's; these records are ungrouped
    p["seed"]["num_train"] = n
    p["seed"]["num_eval"] = n
    p["curate"]["require_correct_chosen"] = False  # no reference answers in this data
    p["curate"]["max_chosen_tokens"] = p["curate"]["max_rejected_tokens"] = 64
    p["curate"]["balance"] = {"key": "category", "max_per_value": n}  # on, exercised, caps nothing
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def run_stage(args: list[str]) -> dict[str, float]:
    """Run one stage process; its wall seconds and peak RSS (bytes)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DISTILLFLOW_LINEAGE_DIR": str(Path(args[args.index("--out") + 1]).parent / "lineage"),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "peak_bytes": usage.ru_maxrss * 1024}


def one_size(n: int, scratch: Path) -> dict[str, Any]:
    folder = scratch / f"n{n}"
    folder.mkdir()
    source = folder / "source.parquet"
    write_source(source, n, seed=n)
    params = params_file(folder, source, n)
    seed = run_stage(
        [
            "stages.seed",
            "--params",
            str(params),
            "--out",
            str(folder / "seed"),
            "--metrics",
            str(folder / "seed.json"),
            "--docs",
            str(folder / "docs" / "seed"),
        ]
    )
    (folder / "pairs").mkdir()
    made = write_pairs(folder / "seed", folder / "pairs" / "pairs.parquet", n, seed=n + 1)
    curate = run_stage(
        [
            "stages.curate",
            "--params",
            str(params),
            "--pairs",
            str(folder / "pairs"),
            "--prompts",
            str(folder / "seed"),
            "--out",
            str(folder / "curate"),
            "--metrics",
            str(folder / "curate.json"),
            "--docs",
            str(folder / "docs" / "curate"),
        ]
    )
    s_m, c_m = json.loads((folder / "seed.json").read_text()), json.loads((folder / "curate.json").read_text())
    if c_m["pairs_in"] != made or c_m["kept"] + c_m["quarantined"] != made:
        raise AssertionError(f"curate counts do not reconcile at n={n}: {c_m}")
    return {"n": n, "seed": seed, "curate": curate, "seed_counts": s_m, "curate_counts": c_m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--keep", type=Path, default=None, help="keep the scratch data in this folder")
    a = ap.parse_args()
    scratch = a.keep or Path(tempfile.mkdtemp(prefix="distillflow-bench-curate-"))
    scratch.mkdir(parents=True, exist_ok=True)
    results = [one_size(n, scratch) for n in a.sizes]
    print(
        f"\nseed and curate, one process each, {os.cpu_count()} CPUs; rows/s = input rows / wall s (imports included)\n"
    )
    print("| rows | stage | wall s | rows/s | peak MiB | kept | quarantined (by reason) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        sc, cc = r["seed_counts"], r["curate_counts"]
        print(
            f"| {r['n']:,} | seed | {r['seed']['wall_s']:.1f} | {r['n'] / r['seed']['wall_s']:,.0f} | "
            f"{r['seed']['peak_bytes'] / 2**20:,.0f} | "
            f"{sc['train'] + sc['eval']:,} | {sc['quarantined']:,} {sc['dropped_by_reason']} |"
        )
        print(
            f"| {r['n']:,} | curate | {r['curate']['wall_s']:.1f} | {r['n'] / r['curate']['wall_s']:,.0f} | "
            f"{r['curate']['peak_bytes'] / 2**20:,.0f} | "
            f"{cc['kept']:,} | {cc['quarantined']:,} {cc['dropped_by_reason']} |"
        )
    if len(results) > 1:
        print("\ngrowth between sizes (ratio of the larger to the smaller):\n")
        print("| from | to | rows x | seed time x | seed memory x | curate time x | curate memory x |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for a_, b_ in itertools.pairwise(results):
            print(
                f"| {a_['n']:,} | {b_['n']:,} | {b_['n'] / a_['n']:.0f} | "
                f"{b_['seed']['wall_s'] / a_['seed']['wall_s']:.2f} | "
                f"{b_['seed']['peak_bytes'] / a_['seed']['peak_bytes']:.2f} | "
                f"{b_['curate']['wall_s'] / a_['curate']['wall_s']:.2f} | "
                f"{b_['curate']['peak_bytes'] / a_['curate']['peak_bytes']:.2f} |"
            )
    big = results[-1]
    for stage in ("seed", "curate"):
        peak = big[stage]["peak_bytes"]
        verdict = "meets" if peak < TARGET_BYTES else "MISSES"
        print(f"\n{stage} at {big['n']:,} rows: peak {peak / 2**30:.2f} GiB, {verdict} the 2 GiB target")


if __name__ == "__main__":
    main()
