"""Sharded, resumable generation: a killed run starts again where it stopped.

A run's shards live in a work folder beside the stage's output (`data/teacher.shards/`
for `data/teacher`; not a DVC out, removed after a successful run):

    plan.json               what the shards are for: model, sampling, prompts, plan, code
    shard-00000.parquet     one shard's generation records (GENERATION_SCHEMA)
    shard-00000.done        its completion marker: row count and the Parquet's sha256

A shard's Parquet is written atomically, then its marker (atomically too), so a marker
always names a complete file. On a restart, a shard whose marker exists and whose
file still has the marker's digest is skipped; any other is generated again. A plan
for other inputs, params or code is cleared first: old shards are never mixed in.

Shards run in this process (`workers: 1`) or in `workers` spawned processes that each
load the engine once, take their share of the CPU threads (or their own GPUs) and
pull shards from a queue. Outputs do not depend on which process generates a shard
(engines seed by batch, prompt or request, never by process), so the gathered result
equals a one-process run's, byte for byte. Under an orchestrator, several machines
sharing the folder can each take a part of the shards (genstage.generate_part).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from distillflow.base import records
from distillflow.base.io import DataError, atomic_path, digest_path, read_rows, write_table
from distillflow.engines.generation import Engine, Shard
from distillflow.engines.parts import MERGED, PLAN, marker_file, shard_file

log = logging.getLogger(__name__)

__all__ = [
    "PLAN",
    "shard_file",
    "marker_file",
    "plan_text",
    "prepare",
    "done_for",
    "is_done",
    "write_shard",
    "run_shards",
    "gather",
]


def plan_text(key: dict[str, Any]) -> str:
    """What plan.json holds for shards made for `key`."""
    return records.canonical_json(key) + "\n"


def prepare(work: Path, key: dict[str, Any]) -> None:
    """Make `work` hold shards for exactly `key`; shards made for another key are removed,
    unless they were merged there from parts (parts.merge): the parts' machines computed
    another plan (other code, engine or inputs), which is an error, not work to redo."""
    text = plan_text(key)
    plan = work / PLAN
    if plan.is_file() and plan.read_text() != text and (work / MERGED).is_file():
        raise DataError(
            f"{work}: the shards merged from the stage's parts were made for another plan than this "
            f"machine computes (plan.json: {plan.read_text().strip()}; here: {text.strip()}): the parts' "
            "nodes need this checkout, its inputs and the same environment; remove the folder to start over"
        )
    if plan.is_file() and plan.read_text() != text:
        log.warning("%s: its shards were made for other inputs, params or code; removing them and starting over", work)
        shutil.rmtree(work)
    elif not plan.is_file() and work.exists() and any(work.iterdir()):
        log.warning("%s: files without a plan.json (not written by this code); removing them and starting over", work)
        shutil.rmtree(work)
    if not plan.is_file():
        work.mkdir(parents=True, exist_ok=True)
        with atomic_path(plan) as tmp:
            tmp.write_text(text)


def done_for(folder: Path, key: dict[str, Any], indices: Sequence[int]) -> set[int]:
    """Which of `indices` are finished shards in `folder`, if its plan is `key`'s (else none)."""
    plan = folder / PLAN
    if not plan.is_file() or plan.read_text() != plan_text(key):
        return set()
    return {i for i in indices if is_done(folder, i)}


def is_done(work: Path, index: int) -> bool:
    """True when the shard's marker exists and its file has the marker's digest."""
    marker, data = marker_file(work, index), shard_file(work, index)
    if not marker.is_file():
        return False
    want = json.loads(marker.read_text())["sha256"]
    if data.is_file() and digest_path(data) == want:
        return True
    log.warning(
        "%s: %s is missing or differs from its marker's digest; generating shard %d again", marker, data.name, index
    )
    marker.unlink()
    return False


def write_shard(work: Path, index: int, rows: list[dict[str, Any]]) -> None:
    """The shard's records, then its completion marker, each written atomically."""
    data = shard_file(work, index)
    n = write_table(data, rows, records.GENERATION_SCHEMA)
    with atomic_path(marker_file(work, index)) as tmp:
        tmp.write_text(json.dumps({"rows": n, "sha256": digest_path(data)}, sort_keys=True) + "\n")


def run_shards(
    work: Path,
    shards: Sequence[Shard],
    prompts: Sequence[dict[str, Any]],
    open_engine: Callable[[Any], Engine],
    spec: Any,
    workers: int,
    gpus_per_worker: int,
) -> int:
    """Generate every shard of `shards` not done yet into `work`; returns how many.

    `open_engine(spec)` loads the engine (in each worker process when workers > 1; it
    must be a module-level function and `spec` picklable). `gpus_per_worker` > 0 gives
    each worker its own CUDA devices (CUDA_VISIBLE_DEVICES); 0 runs on the CPU, where
    each worker takes its share of this process's torch threads.
    """
    todo = [s for s in shards if not is_done(work, s.index)]
    log.info(
        "%s: %d of %d shards already done (skipped), %d to generate",
        work,
        len(shards) - len(todo),
        len(shards),
        len(todo),
    )
    if not todo:
        return 0
    if workers == 1 or len(todo) == 1:
        engine = open_engine(spec)
        for s in todo:
            write_shard(work, s.index, engine.generate(prompts, s))
            log.info("%s: generated shard %d (%d prompts)", work, s.index, len(s.prompts))
        return len(todo)
    n = min(workers, len(todo))
    gpu_groups = _gpu_groups(n, gpus_per_worker)
    threads = max(1, torch.get_num_threads() // n) if gpus_per_worker == 0 else 1
    ctx = mp.get_context("spawn")  # no forked copies of torch's thread pools or CUDA state
    slots = ctx.Queue()
    for k in range(n):
        slots.put(k)
    with ProcessPoolExecutor(
        max_workers=n,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(slots, open_engine, spec, threads, gpu_groups),
    ) as pool:
        futures: dict[Future[int], Shard] = {
            pool.submit(_work, work, s, {i: prompts[i] for i in s.prompts}): s for s in todo
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(
                        f"{work}: a generation worker failed on shard {futures[f].index}; finished shards are kept, "
                        "rerun to resume"
                    ) from f.exception()
                log.info("%s: generated shard %d (%d prompts)", work, futures[f].index, len(futures[f].prompts))
    return len(todo)


def _gpu_groups(workers: int, per_worker: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each worker: consecutive groups of `per_worker` devices."""
    if per_worker == 0:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = (
        [d for d in visible.split(",") if d]
        if visible is not None
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    if workers * per_worker > len(devices):
        raise ValueError(
            f"workers: {workers} workers x {per_worker} GPU(s) each (tensor_parallel_size) need "
            f"{workers * per_worker} GPUs; {len(devices)} visible"
        )
    return [",".join(devices[k * per_worker : (k + 1) * per_worker]) for k in range(workers)]


_ENGINE: Engine | None = None  # one per worker process, loaded by _init_worker


def _init_worker(
    slots: Any, open_engine: Callable[[Any], Engine], spec: Any, threads: int, gpu_groups: list[str] | None
) -> None:
    global _ENGINE
    slot = slots.get()
    if gpu_groups is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_groups[slot]  # before anything touches CUDA here
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{slot} %(name)s %(levelname)s %(message)s")
    _ENGINE = open_engine(spec)


def _work(work: Path, shard: Shard, prompts: dict[int, dict[str, Any]]) -> int:
    if _ENGINE is None:
        raise RuntimeError("generation worker used before its engine was loaded")
    write_shard(work, shard.index, _ENGINE.generate(prompts, shard))
    return shard.index


def gather(
    work: Path, shards: Sequence[Shard], prompts: Sequence[dict[str, Any]], num_samples: int
) -> list[dict[str, Any]]:
    """Every shard's records, in prompt order (each prompt's samples in index order)."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for s in shards:
        data = shard_file(work, s.index)
        if not is_done(work, s.index):
            raise DataError(f"{data}: shard {s.index} is not complete; run the stage again to generate it")
        rows = read_rows(data, records.GENERATION_SCHEMA)
        if len(rows) != len(s.prompts) * num_samples:
            raise DataError(f"{data}: {len(rows)} rows, expected {len(s.prompts)} prompts x {num_samples} samples")
        for j, i in enumerate(s.prompts):
            chunk = rows[j * num_samples : (j + 1) * num_samples]
            for k, r in enumerate(chunk):
                if r["prompt_id"] != prompts[i]["prompt_id"] or r["sample_index"] != k:
                    raise DataError(
                        f"{data}: row {j * num_samples + k}: (prompt_id, sample_index) = ({r['prompt_id']}, "
                        f"{r['sample_index']}), expected ({prompts[i]['prompt_id']}, {k})"
                    )
            by_prompt[i] = chunk
    missing = [i for i in range(len(prompts)) if i not in by_prompt]
    if missing:
        raise DataError(
            f"{work}: no shard holds prompt {missing[0]} ({len(missing)} prompts uncovered); the shard plan is "
            "inconsistent"
        )
    return [r for i in range(len(prompts)) for r in by_prompt[i]]
