"""Record schemas and content-hash ids shared by every stage.

Ids are content hashes, so joins never touch text and the same content always gets the
same id on any machine:

    prompt_id     = H("prompt", normalised prompt text)
    generation_id = H("generation", prompt_id, model fingerprint, sampling params, sample index)
    pair_id       = H("pair", prompt_id, chosen generation_id, rejected generation_id)
    group id      = H("group", group key): a prompt's split key when it has a group

Schemas are explicit and versioned (`SCHEMA_VERSION` in each schema's metadata); a
reader checks that a file's columns and types match before it trusts a single row.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: the prompt record's `group` column
# Schemas whose version moved past SCHEMA_VERSION; a reader refuses a file of another version.
# 3: generations' and pairs' `teacher` column (several teachers: base/teachers.py); 4: the sampled token ids
# and the sampler's log-prob of each (generations), the responses' token ids (pairs)
GENERATION_VERSION = "4"
ID_HEX_CHARS = 32  # 128 bits: collisions are not a practical concern at any data size


def content_id(kind: str, *parts: str) -> str:
    """A hex digest of `kind` and `parts`, unambiguous under concatenation."""
    h = hashlib.sha256(kind.encode())
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:ID_HEX_CHARS]


def short_digest(*parts: str) -> int:
    """A 64-bit digest of `parts` as an int: the compact key of the dedup sets that
    streaming stages hold for millions of rows (about 60 bytes per entry, against 130
    for a hex id string). Two different keys share a digest with probability about
    n^2 / 2^65: 3e-8 at a million rows."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


def normalise_prompt(text: str) -> str:
    """NFC, strip, and collapse runs of whitespace: what counts as 'the same prompt'."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def prompt_id(normalised_prompt: str) -> str:
    return content_id("prompt", normalised_prompt)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the one serialisation that ids hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generation_id(pid: str, model_fingerprint: str, sampling: dict[str, Any], sample_index: int) -> str:
    return content_id("generation", pid, model_fingerprint, canonical_json(sampling), str(sample_index))


def pair_id(pid: str, chosen_id: str, rejected_id: str) -> str:
    return content_id("pair", pid, chosen_id, rejected_id)


def replicate_seed(seed: int, replicate: int | None) -> int:
    """The seed replicate `replicate` of a stage uses (the comparison's bootstraps,
    comparison/dvc.yaml's `--replicate`): the params' own seed without one, else a
    31-bit hash of both, so each replicate's models and samples come from seeds of
    their own."""
    if replicate is None:
        return seed
    return int(content_id("replicate-seed", str(seed), str(replicate))[:8], 16) & 0x7FFFFFFF


def split_key(pid: str, group: str | None) -> str:
    """The key a prompt's split is a function of: its prompt id when it has no group,
    else its group's id, H("group", group), so every prompt of one group (the phrasings
    of one toy-task instance, the turns of one conversation: `seed.group_by`) lands in
    the same split."""
    return pid if group is None else content_id("group", group)


def split_of(key: str, eval_fraction: float, sft_fraction: float) -> str:
    """'eval', 'train' or 'sft', a pure function of a split key (`split_key`: the
    prompt id, or the group's id when the prompt has a group).

    Every stage that needs a split (bootstrap's training data, seed's prompt sets,
    synthesis) calls this on the same key, so no evaluation prompt, nor any other
    prompt of its group, can appear in any training set. The top `sft_fraction` of the
    hash range is bootstrap's student SFT data (the embedded task's warm student): seed
    keeps it out of the distillation prompts.
    """
    bucket = int(key[:8], 16) / 0x100000000
    if bucket < eval_fraction:
        return "eval"
    return "sft" if bucket >= 1.0 - sft_fraction else "train"


def schema(name: str, fields: list[pa.Field], version: str = SCHEMA_VERSION) -> pa.Schema:
    return pa.schema(fields, metadata={"distillflow.schema": name, "distillflow.schema_version": version})


PROMPT_SCHEMA = schema(
    "prompt",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # Verifiable ground truth where the source has one (the toy task); null otherwise.
        pa.field("reference", pa.string(), nullable=True),
        pa.field("category", pa.string(), nullable=True),
        # Where the prompt came from: "toy", "hf", "jsonl" or "parquet", plus the locator.
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        # The prompt's group (seed.group_by: the toy task's instance, a file's group
        # column), the key of its split; null when prompts are not grouped.
        pa.field("group", pa.string(), nullable=True),
    ],
)

GENERATION_SCHEMA = schema(
    "generation",
    [
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" or "length"
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("response_tokens", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # model fingerprint
        pa.field("engine", pa.string(), nullable=False),  # e.g. "transformers 5.23.0"
        pa.field("sampling", pa.string(), nullable=False),  # canonical JSON, seed included
        # The teacher's label (models.teachers) when several teachers sample; null for one teacher or the student.
        pa.field("teacher", pa.string(), nullable=True),
        # The tokens the engine sampled (response_tokens of them: through the eos or stop string that ended the
        # response) and the sampler's log-prob of each (after temperature and top-p); null where the engine gives
        # no ids (an openai endpoint): the response is then tokenized from its text.
        pa.field("token_ids", pa.list_(pa.int32()), nullable=True),
        pa.field("token_logprobs", pa.list_(pa.float32()), nullable=True),
    ],
    GENERATION_VERSION,
)

PAIR_SCHEMA = schema(
    "pair",
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("chosen_id", pa.string(), nullable=False),
        pa.field("rejected_id", pa.string(), nullable=False),
        # TRL's preference format: prompt, chosen (teacher), rejected (student).
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=True),
        pa.field("category", pa.string(), nullable=True),
        pa.field("chosen_finish_reason", pa.string(), nullable=False),
        pa.field("rejected_finish_reason", pa.string(), nullable=False),
        pa.field("chosen_tokens", pa.int32(), nullable=False),
        pa.field("rejected_tokens", pa.int32(), nullable=False),
        # The chosen response's teacher (its generation's `teacher`): the teacher a routed pair is distilled from.
        pa.field("teacher", pa.string(), nullable=True),
        # Each response's sampled token ids (its generation's `token_ids`): what training and scoring read instead
        # of re-tokenizing the text; null where the engine gave none.
        pa.field("chosen_token_ids", pa.list_(pa.int32()), nullable=True),
        pa.field("rejected_token_ids", pa.list_(pa.int32()), nullable=True),
    ],
    GENERATION_VERSION,
)


def with_reason(base: pa.Schema, name: str) -> pa.Schema:
    """The quarantine schema for `base`: every column plus the reason it was dropped.
    Its columns are nullable: a row quarantined for a null field must fit."""
    version = base.metadata[b"distillflow.schema_version"].decode()
    fields = [*(f.with_nullable(True) for f in base), pa.field("reason", pa.string(), nullable=False)]
    return schema(name, fields, version)


PAIR_QUARANTINE_SCHEMA = with_reason(PAIR_SCHEMA, "pair_quarantine")

# The teacher's offline signal (stages/score.py), one row per pair and side.
TOPK_SCHEMA = schema(
    "teacher_topk",
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),  # "chosen" | "rejected"
        pa.field("positions", pa.int32(), nullable=False),  # response positions scored
        pa.field("k", pa.int32(), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),  # positions * k
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),  # positions * k, descending per position
        pa.field("target_logprob", pa.list_(pa.float32()), nullable=False),  # positions
    ],
)
