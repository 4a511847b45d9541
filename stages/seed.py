"""seed: the prompt sets, train and eval, disjoint by construction.

    python -m stages.seed --params params.yaml --out data/seed --metrics metrics/seed.json

Sources (params.yaml `seed.source.kind`):
- toy: the embedded task's generator (`task`), with ground-truth answers;
- jsonl / parquet: a local file, prompt text in `seed.source.field`;
- hf: a Hugging Face dataset (`path` = name, `config`, `split`, `revision`, `field`).

Every prompt is normalised (NFC, whitespace collapsed) and gets a content id. Empty
prompts, over-long prompts, prompts of the wrong type and duplicates go to
quarantine.parquet with the reason; the split is a hash of the prompt id
(records.split_of), the same function bootstrap uses, so an eval prompt can never be a
training prompt. Outputs: train.parquet, eval.parquet, quarantine.parquet,
manifest.json; counts reconcile: read = train + eval + quarantined + unused_over_quota.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, models, params
from stages.lib.core.config import Device, Dtype, GenerationParams, ModelParams, TaskParams
from stages.lib.core.models import ModelRef
from stages.lib.core.params import check
from stages.lib.data import records
from stages.lib.data.io import DataError, atomic_dir, write_json
from stages.lib.data.stream import ParquetSink, RowSink
from stages.lib.task import toytask

log = logging.getLogger("seed")

# Rows per Parquet row group. Outputs up to this size are one row group, the layout
# (and bytes) io.write_table gave before seed streamed; larger ones are several.
BATCH_ROWS = 65_536

QUARANTINE_SCHEMA = records.schema(
    "prompt_quarantine",
    [
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=True),  # the raw value, when it is text
        pa.field("prompt_id", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
    ],
)


@dataclass(frozen=True)
class SourceParams:
    """params.yaml `seed.source`."""

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


@dataclass(frozen=True)
class SynthesisParams:
    """params.yaml `seed.synthesis`: self-instruct expansion of the train prompts by
    the teacher (`models.teacher`), off by default."""

    enabled: bool
    num_prompts: int  # synthetic prompts to keep, at most
    max_attempts: int  # teacher generations, at most (each gives one candidate)
    few_shot: int  # train prompts shown as examples per attempt
    engine: Literal["transformers", "vllm"]
    device: Device
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int  # example draws and sampling

    def __post_init__(self) -> None:
        check(self.num_prompts >= 1, "num_prompts", "must be >= 1")
        check(self.max_attempts >= self.num_prompts, "max_attempts", "must be >= num_prompts")
        check(self.few_shot >= 1, "few_shot", "must be >= 1")

    def generation(self) -> GenerationParams:
        return GenerationParams(
            self.engine,
            self.batch_size,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            1,
            self.seed,
            1,
            self.device,
        )


SYNTHESIS_OFF = SynthesisParams(False, 1, 1, 1, "transformers", "cpu", 1, 1, 1.0, 1.0, 0)


@dataclass(frozen=True)
class SeedParams:
    """params.yaml `seed`."""

    source: SourceParams
    seed: int  # toy generator seed
    num_train: int
    num_eval: int
    max_prompt_chars: int
    synthesis: SynthesisParams = SYNTHESIS_OFF  # params files always give it (strict loader)

    def __post_init__(self) -> None:
        check(self.num_train >= 1, "num_train", "must be >= 1")
        check(self.num_eval >= 1, "num_eval", "must be >= 1")
        check(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")
        check(
            not self.synthesis.enabled or self.synthesis.few_shot <= self.num_train,
            "synthesis.few_shot",
            "must be <= num_train (examples are train prompts)",
        )


# models.*: the teacher that synthesis samples (read only when seed.synthesis.enabled).
SECTIONS: dict[str, Any] = {
    "task": TaskParams,
    "seed": SeedParams,
    "models.teacher": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)

# A raw row: (source_ref, raw prompt value, reference answer, category, reader error)
Raw = tuple[str, Any, str | None, str | None, str | None]


def _toy_rows(task: TaskParams, seed: int) -> Iterator[Raw]:
    for i, ex in enumerate(toytask.generate(task.toy(), seed)):
        yield f"toy:seed={seed}:index={i}", ex.prompt, ex.answer, ex.skill, None


def _jsonl_rows(path: Path, field: str) -> Iterator[Raw]:
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            ref = f"{path}:line={n}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield ref, None, None, None, "invalid_utf8"
                continue
            except json.JSONDecodeError:
                yield ref, None, None, None, "invalid_json"
                continue
            if not isinstance(obj, dict) or field not in obj:
                yield ref, None, None, None, f"missing_field:{field}"
                continue
            yield ref, obj[field], None, None, None


def _table_rows(table_iter: Iterator[dict[str, Any]], ref_prefix: str, field: str) -> Iterator[Raw]:
    for n, row in enumerate(table_iter):
        yield f"{ref_prefix}:row={n}", row[field], None, None, None


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
    prefix = f"hf:{s.path}/{s.config}/{s.split}@{s.revision}"
    yield from _table_rows(iter(ds), prefix, s.field)


def source_rows(task: TaskParams, p: SeedParams) -> Iterator[Raw]:
    s = p.source
    if s.kind == "toy":
        return _toy_rows(task, p.seed)
    assert s.path is not None and s.field is not None
    if s.kind == "jsonl":
        return _jsonl_rows(Path(s.path), s.field)
    if s.kind == "parquet":
        return _parquet_rows(Path(s.path), s.field)
    return _hf_rows(s)


class Pool:
    """A uniform sample of up to `size` train prompts (reservoir sampling, seeded):
    synthesis draws its few-shot examples from it without holding every prompt."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, random.Random(seed)
        self.items: list[tuple[str, str]] = []  # (prompt_id, prompt)
        self.offered = 0

    def offer(self, pid: str, text: str) -> None:
        self.offered += 1
        if len(self.items) < self.size:
            self.items.append((pid, text))
            return
        j = self.rng.randrange(self.offered)
        if j < self.size:
            self.items[j] = (pid, text)


@dataclass
class SeedResult:
    counts: dict[str, Any]
    seen: set[bytes]  # 16-byte ids of every valid source prompt (kept or over quota)
    pool: Pool | None


def _reason(p: SeedParams, raw: Any, error: str | None) -> tuple[str | None, str]:
    """(drop reason or None, normalised text) of one raw row."""
    if error is not None:
        return error, ""  # the reader's own reason (invalid_json, missing_field, ...)
    if not isinstance(raw, str):
        return ("not_a_string" if raw is not None else "null_prompt"), ""
    text = records.normalise_prompt(raw)
    if not text:
        return "empty_prompt", text
    if len(text) > p.max_prompt_chars:
        return "prompt_too_long", text
    return None, text


def stream(
    task: TaskParams,
    p: SeedParams,
    rows: Iterator[Raw],
    train: RowSink,
    evals: RowSink,
    quarantine: RowSink,
    pool: Pool | None = None,
) -> SeedResult:
    """Stream `rows` into the train, eval and quarantine sinks, in source order.

    Memory is the dedup set (16 bytes of id per valid prompt) plus the sinks'
    buffers. Reading stops once both quotas are full; a toy stream is endless, so it
    gives up after 50x the quota with an error instead of looping forever. Each id is
    kept at most once and its split is a function of the id, so no prompt can be in
    both sets. `pool`, when given, samples the train prompts for synthesis.
    """
    seen: set[bytes] = set()
    reasons: Counter[str] = Counter()
    read = unused = n_train = n_eval = quarantined = 0
    limit = 50 * (p.num_train + p.num_eval) if p.source.kind == "toy" else None
    for ref, raw, reference, category, error in rows:
        if n_train >= p.num_train and n_eval >= p.num_eval:
            break
        if limit is not None and read >= limit:
            raise ValueError(
                f"seed: the toy task yielded only {n_train} train / {n_eval} eval distinct prompts in {read} draws; widen `task` or lower seed.num_train / seed.num_eval"
            )
        read += 1
        reason, text = _reason(p, raw, error)
        pid = records.prompt_id(text) if reason is None else None
        key = bytes.fromhex(pid) if pid is not None else b""
        if pid is not None and key in seen:
            reason = "duplicate_prompt"
        if reason is not None:
            reasons[reason] += 1
            quarantined += 1
            quarantine.write(
                [
                    {
                        "source_ref": ref,
                        "prompt": raw if isinstance(raw, str) else None,
                        "prompt_id": pid,
                        "reason": reason,
                    }
                ]
            )
            continue
        assert pid is not None
        seen.add(key)
        split = records.split_of(pid, task.eval_fraction)
        if (split == "eval" and n_eval >= p.num_eval) or (split == "train" and n_train >= p.num_train):
            unused += 1  # valid, but its split's quota is already full
            continue
        row = {
            "prompt_id": pid,
            "prompt": text,
            "split": split,
            "reference": reference,
            "category": category,
            "source": p.source.kind,
            "source_ref": ref,
        }
        if split == "eval":
            evals.write([row])
            n_eval += 1
        else:
            train.write([row])
            n_train += 1
            if pool is not None:
                pool.offer(pid, text)
    if not n_train or not n_eval:
        raise DataError(
            f"seed: source {p.source.kind} {p.source.path or ''} gave {n_train} train and {n_eval} eval prompts; both sets need at least one"
        )
    counts = {
        "read": read,
        "train": n_train,
        "eval": n_eval,
        "quarantined": quarantined,
        "unused_over_quota": unused,
        "dropped_by_reason": dict(sorted(reasons.items())),
    }
    return SeedResult(counts, seen, pool)


class ListSink:
    """A RowSink that keeps its rows in a list: for small sets and tests."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.rows = 0

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table | pa.RecordBatch) -> None:
        new = rows.to_pylist() if isinstance(rows, (pa.Table, pa.RecordBatch)) else list(rows)
        self.items.extend(new)
        self.rows += len(new)


def run(
    task: TaskParams, p: SeedParams, rows: Iterator[Raw]
) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """`stream` into lists: (train, eval, quarantine, counts). For small sets (tests,
    other stages' fixtures); main() streams to Parquet instead."""
    train, evals, quarantine = ListSink(), ListSink(), ListSink()
    result = stream(task, p, rows, train, evals, quarantine)
    return train.items, evals.items, quarantine.items, result.counts


# ---------------------------------------------------------------- synthesis

FEW_SHOT_POOL = 4096  # train prompts sampled (reservoir) as the few-shot examples' pool

# One generation record per attempt: given the attempts' prompt records
# ({"prompt_id", "prompt"}), return GENERATION_SCHEMA rows, one per attempt.
Generate = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def few_shot_text(examples: Sequence[str], toy: bool) -> str:
    """The self-instruct prompt: numbered examples, then a request for one more. The
    toy tokenizer has no newline, so the toy task's list is on one line."""
    sep = " " if toy else "\n"
    items = sep.join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return f"Here are example tasks:{sep}{items}{sep}Write task {len(examples) + 1}: one new task, different from these. Reply with the task only."


_ENUMERATOR = re.compile(r"^\s*(?:task\s*)?\d+\s*[.):]\s*", re.IGNORECASE)
_NEXT_ITEM = re.compile(r"\n\s*(?:task\s*)?\d+\s*[.):]\s")


def candidate_text(response: str) -> str:
    """The new task in a response: a leading "4." dropped, cut before a next "5."."""
    text = _ENUMERATOR.sub("", response, count=1)
    return _NEXT_ITEM.split(text, maxsplit=1)[0]


_FIELD_PATTERNS = {"a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)", "w": r"(?P<w>[a-z]+)", "c": r"(?P<c>[a-z])"}
_ANSWERS: dict[str, Callable[[dict[str, str]], str]] = {
    "add": lambda f: str(int(f["a"]) + int(f["b"])),
    "reverse": lambda f: f["w"][::-1],
    "sort": lambda f: "".join(sorted(f["w"])),
    "upper": lambda f: f["w"].upper(),
    "count": lambda f: str(f["w"].count(f["c"])),
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in _FIELD_PATTERNS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


# toytask's phrasings, as regexes (toytask has no parser; its templates are the grammar)
_TOY_PATTERNS = [(skill, _template_regex(t)) for skill, ts in toytask._TEMPLATES.items() for t in ts]


def _fields_fit(fields: dict[str, str], task: TaskParams) -> bool:
    """Within the configured task: operand digits, word lengths, the alphabet."""
    for name in ("a", "b"):
        if name in fields and (len(fields[name]) > task.max_digits or str(int(fields[name])) != fields[name]):
            return False
    w = fields.get("w")
    if w is not None and not (task.min_len <= len(w) <= task.max_len and set(w) <= set(task.alphabet)):
        return False
    return fields.get("c", task.alphabet[0]) in task.alphabet


def parse_toy_prompt(text: str, task: TaskParams) -> tuple[str, str] | None:
    """(skill, reference answer) of a normalised toy-task prompt; None if it is not one
    of the configured skills' phrasings with in-range fields."""
    for skill, pattern in _TOY_PATTERNS:
        m = pattern.fullmatch(text)
        if m is not None and skill in task.skills and _fields_fit(m.groupdict(), task):
            return skill, _ANSWERS[skill](m.groupdict())
    return None


@dataclass
class Candidate:
    """One synthesised prompt, judged: a prompt row (kept) or a reason (quarantined)."""

    reason: str | None
    text: str
    pid: str | None
    reference: str | None = None
    category: str | None = None


def judge(
    response: str, finish_reason: str, task: TaskParams, p: SeedParams, seen: set[bytes], synthetic: set[bytes]
) -> Candidate:
    """Parse and validate one teacher response as a new train prompt."""
    if finish_reason == "length":
        return Candidate("truncated", response, None)
    text = records.normalise_prompt(candidate_text(response))
    if not text:
        return Candidate("empty", text, None)
    if len(text) > p.max_prompt_chars:
        return Candidate("too_long", text, None)
    reference = category = None
    if p.source.kind == "toy":
        parsed = parse_toy_prompt(text, task)
        if parsed is None:
            return Candidate("unparseable", text, None)
        category, reference = parsed
    pid = records.prompt_id(text)
    key = bytes.fromhex(pid)
    if key in seen:
        return Candidate("duplicate_of_seed", text, pid)
    if key in synthetic:
        return Candidate("duplicate_of_synthetic", text, pid)
    if records.split_of(pid, task.eval_fraction) == "eval":
        return Candidate("in_eval_split", text, pid)  # synthetic prompts are train-only
    return Candidate(None, text, pid, reference, category)


def attempts(
    p: SynthesisParams, pool: Pool, toy: bool, start: int, n: int, rng: random.Random
) -> list[tuple[list[str], dict[str, Any]]]:
    """Attempts start..start+n-1: (example prompt ids, prompt record). The record's id
    is per attempt, so equal few-shot texts still get distinct generation ids."""
    out = []
    for i in range(start, start + n):
        examples = rng.sample(pool.items, p.few_shot)
        text = few_shot_text([t for _, t in examples], toy)
        out.append(
            (
                [pid for pid, _ in examples],
                {"prompt_id": records.content_id("synthesis-attempt", str(i), records.prompt_id(text)), "prompt": text},
            )
        )
    return out


def synthesise(
    task: TaskParams,
    p: SeedParams,
    seen: set[bytes],
    pool: Pool,
    generate: Generate,
    model: str,
    train: RowSink,
    quarantine: RowSink,
) -> dict[str, Any]:
    """Self-instruct: ask the teacher for new tasks from few-shot train examples, keep
    the valid, new, train-split ones (source "synthetic"), quarantine the rest.
    Returns the counts: attempted = accepted + rejected."""
    s = p.synthesis
    if len(pool.items) < s.few_shot:
        raise DataError(
            f"seed.synthesis: {len(pool.items)} train prompts to draw examples from; few_shot is {s.few_shot}"
        )
    rng = random.Random(s.seed)
    synthetic: set[bytes] = set()
    reasons: Counter[str] = Counter()
    attempted = accepted = 0
    while accepted < s.num_prompts and attempted < s.max_attempts:
        batch = attempts(s, pool, p.source.kind == "toy", attempted, min(s.batch_size, s.max_attempts - attempted), rng)
        rows = generate([rec for _, rec in batch])
        by_prompt = {r["prompt_id"]: r for r in rows}
        for example_ids, rec in batch:
            if accepted >= s.num_prompts:
                break
            attempted += 1
            gen = by_prompt[rec["prompt_id"]]
            ref = records.canonical_json(
                {"examples": example_ids, "generation_id": gen["generation_id"], "model": model}
            )
            c = judge(gen["response"], gen["finish_reason"], task, p, seen, synthetic)
            if c.reason is not None:
                reasons[c.reason] += 1
                quarantine.write(
                    [
                        {
                            "source_ref": ref,
                            "prompt": gen["response"],
                            "prompt_id": c.pid,
                            "reason": f"synthesis:{c.reason}",
                        }
                    ]
                )
                continue
            assert c.pid is not None
            synthetic.add(bytes.fromhex(c.pid))
            accepted += 1
            train.write(
                [
                    {
                        "prompt_id": c.pid,
                        "prompt": c.text,
                        "split": "train",
                        "reference": c.reference,
                        "category": c.category,
                        "source": "synthetic",
                        "source_ref": ref,
                    }
                ]
            )
    return {
        "attempted": attempted,
        "accepted": accepted,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }


@dataclass(frozen=True)
class Teacher:
    """The teacher synthesis samples: params sections and where bootstrap put it."""

    ref: ModelRef
    model_dir: Path
    lineage_input: Path
    trust_remote_code: bool
    dtype: str


def teacher_of(sections: dict[str, Any], models_dir: Path | None) -> Teacher:
    if models_dir is None:
        raise ValueError("seed: seed.synthesis.enabled needs the models folder: pass --models data/bootstrap")
    ref = sections["models.teacher"].ref()
    return Teacher(
        ref,
        models_dir / "teacher",
        models.lineage_input(ref, models_dir, "teacher"),
        sections["models.trust_remote_code"],
        sections["models.dtype"],
    )


def open_generate(s: SynthesisParams, t: Teacher) -> tuple[Generate, str, dict[str, Any]]:
    """(generate, model fingerprint, manifest details) for the teacher. Imports the
    generation stack (torch, transformers) only here: a run without synthesis never
    loads a model."""
    from stages import genstage
    from stages.lib.engines.generation import SEEDING, engine_version, sampling_record

    gp = s.generation()
    spec = genstage.EngineSpec(
        gp, t.ref, t.model_dir, t.trust_remote_code, t.dtype, genstage.fingerprint(gp, t.ref, t.model_dir)
    )
    engine = genstage.open_engine(spec)
    batches_done = 0

    def generate(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal batches_done
        out: list[dict[str, Any]] = []
        for shard in genstage.plan(spec, prompts):
            # run-wide batch numbers: every round of attempts gets fresh seeds
            out.extend(
                engine.generate(prompts, dataclasses.replace(shard, first_batch=batches_done + shard.first_batch))
            )
        batches_done += -(-len(prompts) // gp.batch_size)
        return out

    details = {
        "model": models.describe(t.ref, t.model_dir),
        "engine": engine_version(gp.engine),
        "sampling": sampling_record(gp),
        "seeding": SEEDING[gp.engine],
    }
    return generate, spec.fingerprint, details


def stream_to(
    folder: Path,
    task: TaskParams,
    p: SeedParams,
    rows: Iterator[Raw],
    synth: tuple[Generate, str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[SeedResult, dict[str, int]]:
    """`stream` into folder/{train,eval,quarantine}.parquet, then, given `synth`
    (generate, model fingerprint), append synthesised prompts to train and their
    rejections to quarantine; (result, rows per file). Synthesis counts land in
    result.counts["synthesis"]."""
    with (
        ParquetSink(folder / "train.parquet", records.PROMPT_SCHEMA, batch_rows) as train,
        ParquetSink(folder / "eval.parquet", records.PROMPT_SCHEMA, batch_rows) as evals,
        ParquetSink(folder / "quarantine.parquet", QUARANTINE_SCHEMA, batch_rows) as quarantine,
    ):
        pool = Pool(FEW_SHOT_POOL, p.synthesis.seed) if synth is not None else None
        result = stream(task, p, rows, train, evals, quarantine, pool)
        if synth is not None:
            assert pool is not None
            result.counts["synthesis"] = synthesise(task, p, result.seen, pool, synth[0], synth[1], train, quarantine)
    return result, {"train.parquet": train.rows, "eval.parquet": evals.rows, "quarantine.parquet": quarantine.rows}


def gate_outputs(tmp: Path, out: Path, q: quality.QualityParams, docs: Path | None) -> dict[str, Any]:
    """The output gates (stages/lib/audit/quality.py): both prompt sets pass the prompt suite,
    and no training prompt is an eval prompt. Rows seed rejects never reach the files
    (they are in quarantine.parquet), so any failure here stops the stage."""
    gates = quality.StageGates(q, docs)
    eval_ids = pq.read_table(tmp / "eval.parquet", columns=["prompt_id"]).column("prompt_id").combine_chunks()
    gates.check_file("eval prompts", tmp / "eval.parquet", "prompt", shown=out / "eval.parquet")
    gates.check_file(
        "train prompts", tmp / "train.parquet", "prompt", shown=out / "train.parquet", refs={"eval": eval_ids}
    )
    return gates.finish()


def main() -> None:
    args = entry.parse_paths(__doc__, "out", "metrics", optional=("models", "docs"))
    sections = params.load_sections(args.params, SECTIONS)
    task, p = sections["task"], sections["seed"]
    inputs = {"source": Path(p.source.path)} if p.source.kind in ("jsonl", "parquet") and p.source.path else {}
    synth, extra = None, {}
    if p.synthesis.enabled:
        teacher = teacher_of(sections, args.models)
        generate, fingerprint, details = open_generate(p.synthesis, teacher)
        synth, extra, inputs["teacher"] = (generate, fingerprint), {"synthesis": details}, teacher.lineage_input
    with atomic_dir(args.out) as tmp:
        result, outputs = stream_to(tmp, task, p, source_rows(task, p), synth)
        validation = gate_outputs(tmp, args.out, sections["quality"], args.docs)
        counts = {**result.counts, "gates": quality.summary(validation)}
        lineage.write_manifest(
            tmp,
            "seed",
            sections,
            inputs=inputs,
            outputs=outputs,
            counts=counts,
            extra={**extra, "validation": validation},
        )
    write_json(args.metrics, counts)
    log.info("seed: %d train, %d eval, %d quarantined", counts["train"], counts["eval"], counts["quarantined"])
    if "synthesis" in counts:
        log.info("seed: synthesis kept %(accepted)d of %(attempted)d attempts", counts["synthesis"])


if __name__ == "__main__":
    entry.run(main)
