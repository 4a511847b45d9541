"""Parts of a generation stage on other machines, and their shards brought back.

A generation stage's shards (shards.py) can be generated in n parts, part k taking
shards k, k + n, k + 2n, ... (genstage.generate_part; `distillflow run --ray ADDRESS
--ray-parts N` runs the parts as Ray tasks). Part k works in a folder of its own,
`<out>.shards/part-k-of-n/`, so parts never race on one folder, and a retried part
resumes there. Where the machines share the checkout's filesystem that folder is all
there is; otherwise (`--ray-parts-url URL`, any fsspec URL: s3://, gs://, file://) the
part uploads its folder to `URL/<out>.shards/part-k-of-n/` and the flow downloads it.
`merge` then moves every part's finished shards into `<out>.shards/`, where the stage,
run as always, finds them done and only gathers: its output is a one-machine run's,
byte for byte (engines seed by prompt or batch, never by machine).

No torch here: the flow's process calls `merge` and `download`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distillflow.base.io import DataError, atomic_path

PLAN = "plan.json"
MERGED = "merged.json"  # in a work folder whose shards came (also) from parts: shards.prepare then never clears it


def shard_file(work: Path, index: int) -> Path:
    return work / f"shard-{index:05d}.parquet"


def marker_file(work: Path, index: int) -> Path:
    return work / f"shard-{index:05d}.done"


def work_dir(out: Path) -> Path:
    """Where a stage writing `out` keeps its shards: beside it, never inside a DVC out."""
    return out.with_name(out.name + ".shards")


def part_dir(work: Path, part: int, parts: int) -> Path:
    """Where part `part` of `parts` keeps its shards: inside the stage's work folder."""
    return work / f"part-{part}-of-{parts}"


def part_url(url: str, out: Path, part: int, parts: int) -> str:
    """Where part `part` of the stage writing `out` (relative to the checkout) uploads."""
    if out.is_absolute():
        raise ValueError(f"--parts-url needs the stage's --out relative to the checkout, got {out}")
    return f"{url.rstrip('/')}/{out.as_posix()}.shards/part-{part}-of-{parts}"


def upload(local: Path, url: str) -> int:
    """Replace what is at `url` with the files of `local` (a part's folder): the plan,
    then each shard's Parquet before its marker, so a marker never names a missing
    file. Returns the number of finished shards sent."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    fs.put_file(str(local / PLAN), f"{root}/{PLAN}")
    markers = sorted(local.glob("shard-*.done"))
    for marker in markers:
        data = marker.with_suffix(".parquet")
        fs.put_file(str(data), f"{root}/{data.name}")
        fs.put_file(str(marker), f"{root}/{marker.name}")
    return len(markers)


def download(url: str, local: Path) -> int:
    """The files a part uploaded to `url`, into `local` (emptied first); how many."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/{PLAN}"):
        raise DataError(f"{url}: no {PLAN}: the part did not upload its shards there")
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    names = [Path(p).name for p in fs.ls(root, detail=False)]
    for name in names:
        fs.get_file(f"{root}/{name}", str(local / name))
    return len(names)


def merge(work: Path, parts: int) -> int:
    """Move the finished shards of parts 0..parts-1 into `work`, then remove the part
    folders; returns how many shards moved. The parts must hold one plan (the same
    inputs, params and code); shards in `work` made for another plan are removed first.
    A shard without its marker (a part stopped mid-shard) is left to the stage."""
    dirs = [part_dir(work, k, parts) for k in range(parts)]
    missing = [d for d in dirs if not (d / PLAN).is_file()]
    if missing:
        raise DataError(f"{work}: parts without a {PLAN}: {', '.join(d.name for d in missing)}")
    plans = {(d / PLAN).read_text() for d in dirs}
    if len(plans) != 1:
        raise DataError(f"{work}: the parts were made for different inputs, params or code ({len(plans)} plans)")
    (plan,) = plans
    own = work / PLAN
    if not own.is_file() or own.read_text() != plan:
        for f in work.iterdir():
            if f.is_file():
                f.unlink()
        with atomic_path(own) as tmp:
            tmp.write_text(plan)
    (work / MERGED).write_text(f'{{"parts": {parts}}}\n')
    moved = 0
    for d in dirs:
        for marker in sorted(d.glob("shard-*.done")):
            os.replace(marker.with_suffix(".parquet"), work / marker.with_suffix(".parquet").name)
            os.replace(marker, work / marker.name)
            moved += 1
        shutil.rmtree(d)
    return moved
