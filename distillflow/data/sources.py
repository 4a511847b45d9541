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


TOY_GROUP = "instance"  # seed.group_by of the toy source: an example's group (toytask.group_of)


@dataclass(frozen=True, kw_only=True)
class SeedParams:
    """params.yaml `seed`."""

    source: SourceParams  # where the prompts come from
    seed: int  # toy generator seed
    num_train: int  # train prompts to keep
    num_eval: int  # eval prompts to keep
    max_prompt_chars: int  # a longer prompt (after normalisation) is quarantined as prompt_too_long
    # The split's unit (task.eval_fraction and sft_fraction split groups, not prompts):
    # the toy source needs `instance` (a skill and its operands: every phrasing in one
    # split); a file or hf source takes the column of `source` holding the group (a
    # conversation or document id, str() of a non-string; every row needs one) or null
    # (each prompt its own group).
    group_by: str | None  # toy: instance; jsonl, parquet, hf: a column name or null
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
        if self.source.kind == "toy":
            check(
                self.group_by == TOY_GROUP,
                "group_by",
                f"the toy source must be split by {TOY_GROUP!r} (its skill and operands), got {self.group_by!r}: "
                "split otherwise, the phrasings of one instance would fall in different splits and eval instances "
                "would leak into training",
            )
        else:
            check(
                self.group_by != "",
                "group_by",
                f"a {self.source.kind} source takes the name of its group column, or null; got an empty name",
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
    group: str | None  # the row's group (seed.group_by), str() of a non-string value; None: none read
    error: str | None  # the reader's reason it is unusable (invalid_json, missing_field:<f>, ...)
    fields: tuple[str, ...] = ()  # the fields the row has, where a field it needs is missing or null


def _toy_rows(task: TaskParams, seed: int) -> Iterator[Raw]:
    for i, ex in enumerate(tasks.get("toy").examples(task, seed)):
        yield Raw(f"toy:seed={seed}:index={i}", ex.prompt, ex.answer, ex.skill, ex.group, None)


def _group(row: dict[str, Any], group_by: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(the row's group, ()) or, where `group_by` is set and the row's value is missing
    or null, (None, the fields the row has) for the error that names them."""
    if group_by is None:
        return None, ()
    value = row.get(group_by)
    if value is None:
        return None, tuple(str(k) for k in row)
    return (value if isinstance(value, str) else str(value)), ()


def _jsonl_rows(path: Path, field: str, group_by: str | None) -> Iterator[Raw]:
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            ref = f"{path}:line={n}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield Raw(ref, None, None, None, None, "invalid_utf8")
                continue
            except json.JSONDecodeError:
                yield Raw(ref, None, None, None, None, "invalid_json")
                continue
            if not isinstance(obj, dict) or field not in obj:
                has = tuple(str(k) for k in obj) if isinstance(obj, dict) else ()
                yield Raw(ref, None, None, None, None, f"missing_field:{field}", has)
                continue
            group, has = _group(obj, group_by)
            yield Raw(ref, obj[field], None, None, group, None, has)


def _table_rows(
    table_iter: Iterator[dict[str, Any]], ref_prefix: str, field: str, group_by: str | None
) -> Iterator[Raw]:
    for n, row in enumerate(table_iter):
        group, has = _group(row, group_by)
        yield Raw(f"{ref_prefix}:row={n}", row[field], None, None, group, None, has)


def _parquet_rows(path: Path, field: str, group_by: str | None) -> Iterator[Raw]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {names})")
    if group_by is not None and group_by not in names:
        raise DataError(
            f"{path}: seed.group_by column {group_by!r} is missing from the file (columns: {names}); "
            "every row needs a group"
        )
    columns = list(dict.fromkeys([field] if group_by is None else [field, group_by]))
    rows = (row for batch in pf.iter_batches(columns=columns) for row in batch.to_pylist())
    yield from _table_rows(rows, str(path), field, group_by)


def _hf_rows(s: SourceParams, group_by: str | None) -> Iterator[Raw]:
    import datasets  # only real-data runs pay its import

    assert s.path is not None and s.field is not None and s.split is not None  # checked in SourceParams
    ds = datasets.load_dataset(s.path, s.config, split=s.split, revision=s.revision, streaming=True)
    yield from _table_rows(iter(ds), s.where(), s.field, group_by)


def source_rows(task: TaskParams, p: SeedParams, s: SourceParams | None = None) -> Iterator[Raw]:
    """The raw rows of `s` (default `p.source`; e.g. `p.eval_source`), in source order,
    with their groups: seed.group_by is read from `p.source` only (an eval_source's
    rows are all eval prompts: they have no group)."""
    s = p.source if s is None else s
    if s.kind == "toy":
        return _toy_rows(task, p.seed)
    assert s.path is not None and s.field is not None
    group_by = p.group_by if s == p.source else None
    if s.kind == "jsonl":
        return _jsonl_rows(Path(s.path), s.field, group_by)
    if s.kind == "parquet":
        return _parquet_rows(Path(s.path), s.field, group_by)
    return _hf_rows(s, group_by)
