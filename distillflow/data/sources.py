"""Seed's params and prompt sources: raw rows from the toy task, a local file or a
Hugging Face dataset, each with where it came from (stages/seed.py builds the prompt
sets from them, distillflow/data/split.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from distillflow.base.config import Device, GenerationParams, TaskParams
from distillflow.base.params import check
from distillflow.base.io import DataError
from distillflow import tasks


@dataclass(frozen=True, kw_only=True)
class SourceParams:
    """params.yaml `seed.source`."""

    # toy (the embedded task) | jsonl | parquet (local files) | hf (a Hugging Face dataset)
    kind: Literal["toy", "jsonl", "parquet", "hf"]
    path: str | None  # file path (jsonl/parquet) or dataset name (hf)
    config: str | None  # hf dataset config
    split: str | None  # hf split
    revision: str | None  # hf dataset revision
    field: str | None  # the prompt column / key

    def __post_init__(self) -> None:
        if self.kind != "toy":
            check(self.path is not None, "path", f"source kind {self.kind!r} needs a path")
            check(self.field is not None, "field", f"source kind {self.kind!r} needs the prompt field name")
        if self.kind == "hf":
            check(self.split is not None, "split", "an hf source needs a split")

    def where(self) -> str:
        """The source as error messages name it: the file, the dataset or the toy task."""
        if self.kind == "hf":
            return f"hf:{self.path}/{self.config}/{self.split}@{self.revision}"
        return str(self.path) if self.kind != "toy" else "the toy task"


@dataclass(frozen=True, kw_only=True)
class SynthesisParams:
    """params.yaml `seed.synthesis`: self-instruct expansion of the train prompts by
    the teacher (`models.teacher`), off by default."""

    enabled: bool  # on: seed loads models.teacher and adds synthetic train prompts (stage run with --models)
    num_prompts: int  # synthetic prompts to keep, at most
    max_attempts: int  # teacher generations, at most (each gives one candidate)
    few_shot: int  # train prompts shown as examples per attempt
    engine: Literal["transformers", "vllm"]  # transformers | vllm
    device: Device  # cpu | cuda: where the teacher generates
    batch_size: int  # attempts per generate call
    max_new_tokens: int  # budget of one synthetic prompt in tokens
    temperature: float  # sampling temperature of the attempts; 0 = greedy
    top_p: float  # nucleus sampling of the attempts; 1.0 = off
    seed: int  # example draws and sampling

    def __post_init__(self) -> None:
        check(self.num_prompts >= 1, "num_prompts", "must be >= 1")
        check(self.max_attempts >= self.num_prompts, "max_attempts", "must be >= num_prompts")
        check(self.few_shot >= 1, "few_shot", "must be >= 1")

    def generation(self) -> GenerationParams:
        return GenerationParams(
            engine=self.engine,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            num_samples=1,
            seed=self.seed,
            tensor_parallel_size=1,
            device=self.device,
        )


SYNTHESIS_OFF = SynthesisParams(
    enabled=False,
    num_prompts=1,
    max_attempts=1,
    few_shot=1,
    engine="transformers",
    device="cpu",
    batch_size=1,
    max_new_tokens=1,
    temperature=1.0,
    top_p=1.0,
    seed=0,
)


@dataclass(frozen=True, kw_only=True)
class SeedParams:
    """params.yaml `seed`."""

    source: SourceParams  # where the prompts come from
    seed: int  # toy generator seed
    num_train: int  # train prompts to keep
    num_eval: int  # eval prompts to keep
    max_prompt_chars: int  # a longer prompt (after normalisation) is quarantined as prompt_too_long
    # A held-out eval set (a benchmark): its prompts are the eval prompts and `source`
    # gives only train prompts (any of them that is an eval prompt is quarantined as
    # eval_prompt); null: `source` is split by task.eval_fraction.
    eval_source: SourceParams | None = None  # params files always give it (strict loader)
    synthesis: SynthesisParams = SYNTHESIS_OFF  # params files always give it (strict loader)

    def __post_init__(self) -> None:
        check(
            self.eval_source is None or self.eval_source.kind != "toy",
            "eval_source",
            "must be a jsonl, parquet or hf source (the toy task is split by task.eval_fraction); null: no eval source",
        )
        check(self.num_train >= 1, "num_train", "must be >= 1")
        check(self.num_eval >= 1, "num_eval", "must be >= 1")
        check(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")
        check(
            not self.synthesis.enabled or self.synthesis.few_shot <= self.num_train,
            "synthesis.few_shot",
            "must be <= num_train (examples are train prompts)",
        )


class Raw(NamedTuple):
    """One source row before it is judged."""

    source_ref: str  # where it came from: file and line or row, dataset and row, toy seed and index
    value: Any  # the raw prompt value
    reference: str | None  # ground-truth answer (the toy task)
    category: str | None
    error: str | None  # the reader's reason it is unusable (invalid_json, missing_field:<f>, ...)
    fields: tuple[str, ...] = ()  # with a missing field: the fields the row does have


def _toy_rows(task: TaskParams, seed: int) -> Iterator[Raw]:
    for i, ex in enumerate(tasks.get("toy").examples(task, seed)):
        yield Raw(f"toy:seed={seed}:index={i}", ex.prompt, ex.answer, ex.skill, None)


def _jsonl_rows(path: Path, field: str) -> Iterator[Raw]:
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            ref = f"{path}:line={n}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield Raw(ref, None, None, None, "invalid_utf8")
                continue
            except json.JSONDecodeError:
                yield Raw(ref, None, None, None, "invalid_json")
                continue
            if not isinstance(obj, dict) or field not in obj:
                has = tuple(str(k) for k in obj) if isinstance(obj, dict) else ()
                yield Raw(ref, None, None, None, f"missing_field:{field}", has)
                continue
            yield Raw(ref, obj[field], None, None, None)


def _table_rows(table_iter: Iterator[dict[str, Any]], ref_prefix: str, field: str) -> Iterator[Raw]:
    for n, row in enumerate(table_iter):
        yield Raw(f"{ref_prefix}:row={n}", row[field], None, None, None)


def _parquet_rows(path: Path, field: str) -> Iterator[Raw]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
    rows = (row for batch in pf.iter_batches(columns=[field]) for row in batch.to_pylist())
    yield from _table_rows(rows, str(path), field)


def _hf_rows(s: SourceParams) -> Iterator[Raw]:
    import datasets  # only real-data runs pay its import

    assert s.path is not None and s.field is not None and s.split is not None  # checked in SourceParams
    ds = datasets.load_dataset(s.path, s.config, split=s.split, revision=s.revision, streaming=True)
    yield from _table_rows(iter(ds), s.where(), s.field)


def source_rows(task: TaskParams, p: SeedParams, s: SourceParams | None = None) -> Iterator[Raw]:
    """The raw rows of `s` (default `p.source`; e.g. `p.eval_source`), in source order."""
    s = p.source if s is None else s
    if s.kind == "toy":
        return _toy_rows(task, p.seed)
    assert s.path is not None and s.field is not None
    if s.kind == "jsonl":
        return _jsonl_rows(Path(s.path), s.field)
    if s.kind == "parquet":
        return _parquet_rows(Path(s.path), s.field)
    return _hf_rows(s)
