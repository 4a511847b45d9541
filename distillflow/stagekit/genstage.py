"""What the teacher and student stages share: generate responses for the train prompts.

The two stages differ only in which model (`models.teacher` / `models.student`) and
which sampling section (`teacher` / `student`) they use; both write
generations.parquet (records.GENERATION_SCHEMA) and manifest.json into their output
folder. The sampling itself is distillflow/engines/sampling.py (`sampling.sample`,
callable in process without argv); this module is its command line.

Generation runs in resumable shards (distillflow/engines/shards.py) under `<out>.shards/`
beside the output folder; the folder is removed once the output is written. A run
killed half-way and started again generates only the shards it had not finished, and
writes the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from distillflow.audit import lineage, quality
from distillflow.base import models, params, records
from distillflow.base.config import TEACHER_SECTIONS, Dtype, GenerationParams, ModelParams, teachers_of
from distillflow.base.errors import ParamsError
from distillflow.base.io import atomic_dir, read_rows, write_json, write_table
from distillflow.base.models import ModelRef
from distillflow.engines import parts as genparts
from distillflow.engines import sampling
from distillflow.engines.generation import SEEDING, engine_version, sampling_record
from distillflow.engines.parts import work_dir
from distillflow.engines.sampling import generation_fingerprint, sample
from distillflow.stagekit import entry
from distillflow.stagekit.writer import Writer, ids

__all__ = [
    "generation_fingerprint",
    "sample",
    "sections",
    "inputs",
    "write_generations",
    "generate_part",
    "work_dir",
    "main",
]

log = logging.getLogger(__name__)


def sections(role: str) -> dict[str, Any]:
    """The params keys the `role` stage reads: its own model, not the other one (the
    teacher stage: every teacher, base/teachers.py)."""
    return {
        **(TEACHER_SECTIONS if role == "teacher" else {f"models.{role}": ModelParams}),
        "models.trust_remote_code": bool,
        "models.dtype": Dtype,
        role: GenerationParams,
        "quality": quality.QualityParams,
    }


@dataclass(frozen=True, kw_only=True)
class Inputs:
    used: dict[str, Any]
    p: GenerationParams
    ref: ModelRef
    model_dir: Path
    model_input: Path
    prompt_file: Path
    prompts: list[dict[str, Any]]


def inputs(
    role: str,
    params_file: Path,
    prompts_dir: Path,
    models_dir: Path,
    previous: Path | None,
    replicate: int | None = None,
) -> Inputs:
    """Params, model and prompts of the `role` stage. `previous` samples
    previous/model, a model a train stage wrote, instead of `models.<role>` (the
    stage's --previous; the round stage samples its previous round itself).
    `replicate` (the comparison's bootstraps) samples with that replicate's seed
    (records.replicate_seed), which the manifest records."""
    used = params.load_sections(params_file, sections(role))
    if replicate is not None:
        used[role] = dataclasses.replace(used[role], seed=records.replicate_seed(used[role].seed, replicate))
    if previous is None:
        ref: ModelRef = used[f"models.{role}"].ref()
        model_dir, model_input = models_dir / role, models.lineage_input(ref, models_dir, role)
    else:
        ref, model_dir, model_input = models.ModelRef(str(previous / "model"), None), Path(), previous / "model"
    prompt_file = prompts_dir / "train.parquet"
    return Inputs(
        used=used,
        p=used[role],
        ref=ref,
        model_dir=model_dir,
        model_input=model_input,
        prompt_file=prompt_file,
        prompts=read_rows(prompt_file, records.PROMPT_SCHEMA),
    )


def write_generations(
    w: Writer,
    gates: quality.StageGates,
    role: str,
    prompts: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    inputs: dict[str, Path],
    model: dict[str, Any],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """generations.parquet and its manifest. The output gate: ids unique and pointing at
    the prompts, lengths in bounds, and for the teacher the share of truncated responses
    (a weak student may run long). `model`: the sampled model's description; `stats`:
    the shard counts (sampling.sample's)."""
    p: GenerationParams = w.used[role]
    counts = sampling.counts(prompts, rows)
    gates.strict(
        "generations",
        w.out / "generations.parquet",
        "generation",
        pa.Table.from_pylist(rows, schema=records.GENERATION_SCHEMA),
        refs={"prompt_id": ids(prompts, "prompt_id")},
        truncation=role == "teacher",
    )
    validation = gates.finish()
    counts["gates"] = quality.validation_summary(validation)
    with atomic_dir(w.out) as tmp:
        n = write_table(tmp / "generations.parquet", rows, records.GENERATION_SCHEMA)
        lineage.write_manifest(
            tmp,
            role,
            w.only(sections(role)),
            inputs=inputs,
            outputs={"generations.parquet": n},
            counts=counts,
            extra={
                "validation": validation,
                "model": model,
                # engine and version, the sampling record hashed into every generation id,
                # and how the seeds were derived from it
                "engine": rows[0]["engine"] if rows else engine_version(p.engine),
                "sampling": sampling_record(p),
                "seeding": SEEDING[p.engine],
            },
            cost=sampling.generation_cost(p, rows, stats),
            module=w.module,
            step=w.is_step(role),
        )
    return counts


def _sample(role: str, i: Inputs, work: Path, **kwargs: Any) -> list[dict[str, Any]]:
    trust, dtype = i.used["models.trust_remote_code"], i.used["models.dtype"]
    return sample(role, i.p, i.ref, i.prompts, i.model_dir, work, trust_remote_code=trust, dtype=dtype, **kwargs)


def several_teachers(role: str, i: Inputs) -> bool:
    """Whether the `role` stage samples several teachers (models.teachers), refusing
    what cannot: one openai endpoint, --previous."""
    if role != "teacher" or not teachers_of(i.used).several:
        return False
    if i.p.engine == "openai":
        raise ParamsError(
            "models.teachers: several teachers need local models; teacher.engine openai serves one endpoint"
        )
    if i.model_dir == Path():
        raise ParamsError("models.teachers: --previous samples one trained model, not several teachers")
    return True


def sample_teachers(
    i: Inputs, work: Path, stats: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Path]]:
    """Every teacher's generations (models.teachers: all prompts under mix, its routed
    ones under route), each row labelled with its teacher, with the teachers' model
    descriptions and lineage inputs. Teacher k > 0 samples with a seed of its own and
    shards under work/<label>."""
    ts = teachers_of(i.used)
    models_dir = i.model_dir.parent
    rows: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for k, t in enumerate(ts.teachers):
        p = dataclasses.replace(i.p, seed=ts.seed(k, i.p.seed))
        prompts = [pr for pr in i.prompts if ts.samples(k, pr["prompt_id"], pr["category"])]
        one = dataclasses.replace(i, p=p, ref=t.ref, model_dir=models_dir / t.role, prompts=prompts)
        got: dict[str, Any] = {}
        made = _sample("teacher", one, work / t.label, stats=got)
        rows += [{**r, "teacher": t.label} for r in made]
        for key, n in got.items():
            stats[key] = stats.get(key, 0) + n
        info = sampling.describe_model(p, t.ref, one.model_dir, made)
        described[t.label] = {**info, "weight": t.weight, "seed": p.seed, "prompts": len(prompts)}
        files["model" if k == 0 else f"model-{t.label}"] = models.lineage_input(t.ref, models_dir, t.role)
    return rows, {"teachers": described, "routing": ts.routing}, files


def generate_part(
    role: str,
    params_file: Path,
    prompts_dir: Path,
    models_dir: Path,
    out: Path,
    part: int,
    parts: int,
    previous: Path | None = None,
    replicate: int | None = None,
    url: str | None = None,
) -> None:
    """Generate shards part, part + parts, ... of the stage writing `out` into
    `<out>.shards/part-<part>-of-<parts>/` (engines/parts.py), and nothing else: for an
    orchestrator running parts on several machines (`distillflow run --ray-parts`);
    parts.merge then moves them into the stage's work folder, where the stage run
    afterwards finds them done and only gathers. `url` (fsspec): also upload the
    part's folder there, for machines that do not share the checkout's filesystem."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in 0..{parts - 1}, got {part}")
    target = None if url is None else genparts.part_url(url, out, part, parts)  # a bad --out fails first
    i = inputs(role, params_file, prompts_dir, models_dir, previous, replicate)
    work = work_dir(out)
    local = genparts.part_dir(work, part, parts)
    _sample(role, i, local, part=(part, parts), done_in=work)
    if target is not None:
        log.info("%s: uploaded %d shards to %s", local, genparts.upload(local, target), target)


def part_arg(text: str) -> tuple[int, int]:
    """`--part K/N`: part K (from 0) of N."""
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit()) or not 0 <= int(k) < int(n):
        raise ValueError(f"--part: expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def main(role: str, doc: str | None) -> None:
    """`python -m stages.<role> --params P --prompts data/seed --models data/bootstrap --out data/<role>`.

    `--previous DIR` samples DIR/model, a model a train stage wrote, instead of
    `models.<role>`; `--replicate B` samples with bootstrap replicate B's seed.
    `--part K/N` (and `--parts-url URL`) generates only part K of N (generate_part)
    and writes no output: what `distillflow run --ray-parts N` adds to the command.
    """
    args = entry.parse_paths(
        doc,
        "prompts",
        "models",
        "out",
        "metrics",
        optional=("previous", "docs"),
        optional_values={"replicate": int, "part": part_arg, "parts_url": str},
    )
    if args.part is not None:
        if role == "teacher" and teachers_of(params.load_sections(args.params, TEACHER_SECTIONS)).several:
            raise ParamsError("models.teachers: --part (distillflow run --ray-parts) runs one teacher; set it to []")
        where = (args.params, args.prompts, args.models, args.out)
        generate_part(role, *where, *args.part, args.previous, args.replicate, args.parts_url)
        return
    if args.parts_url is not None:
        raise ValueError("--parts-url is for a part (--part K/N)")
    i = inputs(role, args.params, args.prompts, args.models, args.previous, args.replicate)
    w = Writer(out=args.out, module=role, used=i.used, docs=args.docs)
    gates = w.gates()
    # the input, already read by inputs(), checked before any model time is spent
    gates.strict("prompts", i.prompt_file, "prompt", pa.Table.from_pylist(i.prompts, schema=records.PROMPT_SCHEMA))
    work = work_dir(args.out)
    stats: dict[str, Any] = {}
    if several_teachers(role, i):
        rows, model, models_in = sample_teachers(i, work, stats)
    else:
        rows = _sample(role, i, work, stats=stats)
        model, models_in = sampling.describe_model(i.p, i.ref, i.model_dir, rows), {"model": i.model_input}
    files = {"prompts": i.prompt_file, **models_in}
    counts = write_generations(w, gates, role, i.prompts, rows, files, model, stats)
    write_json(args.metrics, counts)
    shutil.rmtree(work)
    finish = counts["finish_reason"]
    log.info("%s: %d generations, %d stopped, %d hit max_new_tokens", role, len(rows), finish["stop"], finish["length"])
