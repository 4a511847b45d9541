"""Self-instruct synthesis of train prompts by the teacher (seed.synthesis): few-shot
train examples in, one new task out per attempt; the valid, new, train-split ones are
kept (source "synthetic"), the rest quarantined with `synthesis:<reason>`. A synthetic
toy prompt's split is its instance's (its group, from the parse), so a new phrasing of
an eval instance is refused; another source's synthetic prompt is its own group."""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.base import quarantine as q
from distillflow.base import models
from distillflow.base.config import TaskParams
from distillflow.base.models import ModelRef
from distillflow.base import records
from distillflow.base.io import DataError
from distillflow.data.sources import SeedParams, SynthesisParams
from distillflow.base.stream import RowSink
from distillflow import tasks

FEW_SHOT_POOL = 4096  # train prompts sampled (reservoir) as the few-shot examples' pool

# One generation record per attempt: given the attempts' prompt records
# ({"prompt_id", "prompt"}), return GENERATION_SCHEMA rows, one per attempt.
Generate = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


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


def few_shot_text(examples: Sequence[str], toy: bool) -> str:
    """The self-instruct prompt: numbered examples, then a request for one more. The
    toy tokenizer has no newline, so the toy task's list is on one line."""
    sep = " " if toy else "\n"
    items = sep.join(f"{i}. {e}" for i, e in enumerate(examples, start=1))
    return (
        f"Here are example tasks:{sep}{items}{sep}Write task {len(examples) + 1}: one new task, different from "
        "these. Reply with the task only."
    )


_ENUMERATOR = re.compile(r"^\s*(?:task\s*)?\d+\s*[.):]\s*", re.IGNORECASE)
_NEXT_ITEM = re.compile(r"\n\s*(?:task\s*)?\d+\s*[.):]\s")


def candidate_text(response: str) -> str:
    """The new task in a response: a leading "4." dropped, cut before a next "5."."""
    text = _ENUMERATOR.sub("", response, count=1)
    return _NEXT_ITEM.split(text, maxsplit=1)[0]


@dataclass(kw_only=True)
class Candidate:
    """One synthesised prompt, judged: a prompt row (kept) or a reason (quarantined)."""

    reason: str | None
    text: str
    pid: str | None
    reference: str | None = None
    category: str | None = None
    group: str | None = None  # the toy task's instance (the parse's group); None: the prompt is its own group


def judge(
    response: str, finish_reason: str, task: TaskParams, p: SeedParams, seen: set[bytes], synthetic: set[bytes]
) -> Candidate:
    """Parse and validate one teacher response as a new train prompt."""
    if finish_reason == "length":
        return Candidate(reason="truncated", text=response, pid=None)
    text = records.normalise_prompt(candidate_text(response))
    if not text:
        return Candidate(reason="empty", text=text, pid=None)
    if len(text) > p.max_prompt_chars:
        return Candidate(reason="too_long", text=text, pid=None)
    reference = category = group = None
    if p.source.kind == "toy":
        parsed = tasks.get("toy").parse_prompt(text, task)
        if parsed is None:
            return Candidate(reason="unparseable", text=text, pid=None)
        category, reference, group = parsed
    pid = records.prompt_id(text)
    key = bytes.fromhex(pid)
    if key in seen:
        return Candidate(reason="duplicate_of_seed", text=text, pid=pid, group=group)
    if key in synthetic:
        return Candidate(reason="duplicate_of_synthetic", text=text, pid=pid, group=group)
    sft = task.sft_fraction if p.source.kind == "toy" else 0.0
    split = records.split_of(records.split_key(pid, group), task.eval_fraction, sft)
    if split != "train":  # synthetic prompts are train-only
        return Candidate(reason=f"in_{split}_split", text=text, pid=pid, group=group)
    return Candidate(reason=None, text=text, pid=pid, reference=reference, category=category, group=group)


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


def _synthetic_row(c: Candidate, ref: str) -> dict[str, Any]:
    return {
        "prompt_id": c.pid,
        "prompt": c.text,
        "split": "train",
        "reference": c.reference,
        "category": c.category,
        "source": "synthetic",
        "source_ref": ref,
        "group": c.group,
    }


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
                row = q.prompt_row(
                    f"synthesis:{c.reason}",
                    source="synthetic",
                    source_ref=ref,
                    prompt=gen["response"],
                    prompt_id=c.pid,
                    group=c.group,
                )
                quarantine.write([row])
                continue
            assert c.pid is not None
            synthetic.add(bytes.fromhex(c.pid))
            accepted += 1
            train.write([_synthetic_row(c, ref)])
    return {
        "attempted": attempted,
        "accepted": accepted,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }


@dataclass(frozen=True, kw_only=True)
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
        ref=ref,
        model_dir=models_dir / "teacher",
        lineage_input=models.lineage_input(ref, models_dir, "teacher"),
        trust_remote_code=sections["models.trust_remote_code"],
        dtype=sections["models.dtype"],
    )


def open_generate(s: SynthesisParams, t: Teacher) -> tuple[Generate, str, dict[str, Any]]:
    """(generate, model fingerprint, manifest details) for the teacher. Imports the
    generation stack (torch, transformers) only here: a run without synthesis never
    loads a model."""
    from distillflow.engines import sampling
    from distillflow.engines.generation import SEEDING, engine_version, sampling_record

    gp = s.generation()
    spec = sampling.EngineSpec(
        p=gp,
        ref=t.ref,
        model_dir=t.model_dir,
        trust_remote_code=t.trust_remote_code,
        dtype=t.dtype,
        fingerprint=sampling.generation_fingerprint(gp, t.ref, t.model_dir),
    )
    engine = sampling.open_engine(spec)
    batches_done = 0

    def generate(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal batches_done
        out: list[dict[str, Any]] = []
        lengths = sampling.prompt_lengths(spec, "seed.synthesis", prompts)
        for shard in sampling.shard_plan(spec, prompts, lengths):
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
