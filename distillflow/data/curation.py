"""Pair curation (the curate stage's logic, callable in process: an on-policy round
curates its pairs here).

The filters, in order; each is a function of one pair (and its own state) that returns
None to keep it or the reason to drop it; the first reason wins: empty and truncated
responses, length bounds, the response length ratio, degenerate repetition (word
n-gram repetition ratio of the chosen response), teacher correctness where the prompt
has a reference answer, decontamination against the eval prompts (word n-gram
overlap), the student-matches-teacher policy, exact duplicates, near duplicates
(MinHash LSH, datasketch), and category balancing.

    kept, quarantined, counts = curation.curate(p, pairs, eval_prompts)      # filters only
    result = curation.curate_file(src, out_dir, p, q, train_ids, evals, docs)  # + the gates, streamed

Dropped pairs keep their columns plus `reason` (distillflow/base/quarantine.py).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from distillflow.base import quarantine as q
from distillflow.base.params import check
from distillflow.base import records
from distillflow.base.io import DataError, check_columns, parquet_file
from distillflow.base.stream import ParquetSink
from distillflow import tasks

QUARANTINE_SCHEMA = q.PAIR_SCHEMA


@dataclass(frozen=True)
class NearDuplicateParams:
    """params.yaml `curate.near_duplicates`: MinHash LSH over word n-gram shingles of
    prompt + chosen response (word, not character, shingles: templated prompts that
    differ only in their operands are different tasks, not near duplicates)."""

    enabled: bool  # off: no near-duplicate filter
    threshold: float  # estimated Jaccard similarity at or above which a pair is a near duplicate
    num_perm: int  # MinHash permutations (more: a finer similarity estimate, slower)
    shingle_words: int  # words per shingle

    def __post_init__(self) -> None:
        check(0.0 < self.threshold <= 1.0, "threshold", "must be in (0, 1]")
        check(self.num_perm >= 2, "num_perm", "must be >= 2")
        check(self.shingle_words >= 1, "shingle_words", "must be >= 1")


@dataclass(frozen=True)
class RepetitionParams:
    """params.yaml `curate.repetition`: degenerate repetition in the chosen response."""

    ngram: int  # word n-gram size
    max_ratio: float  # 1 - distinct/total n-grams above this drops the pair
    min_ngrams: int  # responses with fewer n-grams are not judged

    def __post_init__(self) -> None:
        check(self.ngram >= 1, "ngram", "must be >= 1")
        check(0.0 <= self.max_ratio <= 1.0, "max_ratio", "must be in [0, 1]")
        check(self.min_ngrams >= 1, "min_ngrams", "must be >= 1")


@dataclass(frozen=True)
class DecontaminationParams:
    """params.yaml `curate.decontamination`: a training prompt that shares too many word
    n-grams with any eval prompt is dropped. A prompt shorter than `ngram` words is one
    n-gram (so an exact match is always caught)."""

    enabled: bool  # off: no decontamination filter
    ngram: int  # word n-gram size
    max_overlap: float  # share of the prompt's n-grams found among the eval prompts'

    def __post_init__(self) -> None:
        check(self.ngram >= 1, "ngram", "must be >= 1")
        check(0.0 <= self.max_overlap < 1.0, "max_overlap", "must be in [0, 1)")


@dataclass(frozen=True)
class BalanceParams:
    """params.yaml `curate.balance`: at most `max_per_value` pairs per value of `key`
    (kept in input order); key null = off."""

    key: Literal["category"] | None  # category: cap pairs per category; null = off
    max_per_value: int | None  # pairs kept per value of key, at most (in input order)

    def __post_init__(self) -> None:
        if self.key is not None:
            check(
                self.max_per_value is not None and self.max_per_value >= 1,
                "max_per_value",
                "must be >= 1 when balance.key is set",
            )


@dataclass(frozen=True, kw_only=True)
class CurateParams:
    """params.yaml `curate`."""

    drop_duplicates: bool  # same prompt, chosen and rejected text as an earlier pair
    drop_empty_chosen: bool  # drop pairs whose chosen (teacher) response is empty
    drop_empty_rejected: bool  # drop pairs whose rejected (student) response is empty
    drop_truncated_chosen: bool  # the teacher hit max_new_tokens
    drop_truncated_rejected: bool  # the student hit max_new_tokens (often useful signal)
    min_chosen_tokens: int  # drop pairs whose chosen response has fewer tokens
    max_chosen_tokens: int  # drop pairs whose chosen response has more tokens
    max_rejected_tokens: int  # drop pairs whose rejected response has more tokens
    max_length_ratio: float  # (longer + 1) / (shorter + 1) of the two responses' token counts
    require_correct_chosen: bool  # where a reference answer exists (the toy task)
    student_matches_teacher: Literal["keep", "drop"]  # pairs whose rejected text equals the chosen
    repetition: RepetitionParams  # degenerate word n-gram repetition in the chosen response
    decontamination: DecontaminationParams  # word n-gram overlap of the training prompt with the eval prompts
    near_duplicates: NearDuplicateParams  # MinHash LSH near-duplicate removal on word shingles of prompt + chosen
    balance: BalanceParams  # cap pairs per category; key null = off

    def __post_init__(self) -> None:
        check(self.min_chosen_tokens >= 0, "min_chosen_tokens", "must be >= 0")
        check(
            self.max_chosen_tokens >= max(1, self.min_chosen_tokens),
            "max_chosen_tokens",
            "must be >= 1 and >= min_chosen_tokens",
        )
        check(self.max_rejected_tokens >= 1, "max_rejected_tokens", "must be >= 1")
        check(self.max_length_ratio >= 1.0, "max_length_ratio", "must be >= 1")
        check(self.student_matches_teacher in ("keep", "drop"), "student_matches_teacher", "must be keep or drop")


Filter = Callable[[dict[str, Any]], "str | None"]
_WORD = re.compile(r"\w+", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one n-gram (itself)."""
    if len(tokens) < n:
        return [tuple(tokens)] if tokens else []
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_ratio(text: str, n: int) -> tuple[float, int]:
    """(1 - distinct/total word n-grams, total); 0 for text with no repeats."""
    tokens = word_tokens(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0, 0
    return 1.0 - len(set(grams)) / len(grams), len(grams)


def gram_key(gram: tuple[str, ...]) -> int:
    return records.short_digest(*gram)


def eval_ngrams(eval_prompts: list[str], n: int) -> set[int]:
    """The eval prompts' word n-grams, as 64-bit digests (a set of tuples of strings
    took about 500 bytes per n-gram: 400 MB for 100k eval prompts)."""
    return {gram_key(g) for p in eval_prompts for g in ngrams(word_tokens(p), n)}


class NearDuplicates:
    """MinHash LSH over word n-gram shingles of prompt + chosen: a pair that shares a
    band with an earlier kept pair is a near duplicate (estimated Jaccard similarity
    around the threshold or above). Only kept pairs are indexed.

    The MinHash signatures and the band split (b bands of r rows, chosen for the
    threshold) are datasketch's. The band index is a set of 64-bit band digests per
    band rather than datasketch's MinHashLSH, which keeps about 900 bytes per key
    (0.9 GB at a million pairs, measured) to be able to return and remove keys; curate
    only asks "was a band seen?", which 2 x 60 bytes per pair answer the same way.
    """

    def __init__(self, p: NearDuplicateParams):
        from datasketch import MinHash, MinHashLSH

        self.p = p
        bands = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm)
        self.b, self.r = bands.b, bands.r
        self._base = MinHash(num_perm=p.num_perm, seed=1)
        self._minhash = MinHash
        self._seen: list[set[int]] = [set() for _ in range(self.b)]

    def signature(self, text: str) -> Any:
        shingles = {" ".join(g).encode("utf-8") for g in ngrams(word_tokens(text), self.p.shingle_words)}
        m = self._minhash(
            num_perm=self.p.num_perm, seed=1, permutations=self._base.permutations, scheme=self._base.scheme
        )
        m.update_batch(sorted(shingles))
        return m

    def check(self, pair: dict[str, Any]) -> str | None:
        values = self.signature(pair["prompt"] + "\n" + pair["chosen"]).hashvalues
        # blake2b, not hash(): Python's hash of bytes changes per process, and a
        # collision, however rare, must fall the same way on every run
        keys = [
            int.from_bytes(
                hashlib.blake2b(values[i * self.r : (i + 1) * self.r].tobytes(), digest_size=8).digest(), "little"
            )
            for i in range(self.b)
        ]
        if any(k in seen for k, seen in zip(keys, self._seen, strict=True)):
            return "near_duplicate"
        for k, seen in zip(keys, self._seen, strict=True):
            seen.add(k)
        return None


def filters(p: CurateParams, eval_prompts: list[str]) -> list[Filter]:
    """The enabled filters, in order. Each returns None (keep) or a drop reason."""
    seen: set[int] = set()

    def duplicate(pair: dict[str, Any]) -> str | None:
        key = records.short_digest(pair["prompt_id"], pair["chosen"], pair["rejected"])
        if key in seen:
            return "duplicate_pair"
        seen.add(key)
        return None

    def ratio(x: dict[str, Any]) -> str | None:
        a, b = x["chosen_tokens"] + 1, x["rejected_tokens"] + 1
        return "length_ratio" if max(a, b) / min(a, b) > p.max_length_ratio else None

    def repetitive(x: dict[str, Any]) -> str | None:
        share, total = repetition_ratio(x["chosen"], p.repetition.ngram)
        return "repetitive_chosen" if total >= p.repetition.min_ngrams and share > p.repetition.max_ratio else None

    out: list[Filter] = []
    if p.drop_empty_chosen:
        out.append(lambda x: "empty_chosen" if not x["chosen"].strip() else None)
    if p.drop_empty_rejected:
        out.append(lambda x: "empty_rejected" if not x["rejected"].strip() else None)
    if p.drop_truncated_chosen:
        out.append(lambda x: "truncated_chosen" if x["chosen_finish_reason"] == "length" else None)
    if p.drop_truncated_rejected:
        out.append(lambda x: "truncated_rejected" if x["rejected_finish_reason"] == "length" else None)
    out.append(lambda x: "chosen_too_short" if x["chosen_tokens"] < p.min_chosen_tokens else None)
    out.append(lambda x: "chosen_too_long" if x["chosen_tokens"] > p.max_chosen_tokens else None)
    out.append(lambda x: "rejected_too_long" if x["rejected_tokens"] > p.max_rejected_tokens else None)
    out.append(ratio)
    out.append(repetitive)
    if p.require_correct_chosen:
        out.append(
            lambda x: (
                "chosen_incorrect"
                if x["reference"] is not None and not tasks.is_correct(x["chosen"], x["reference"], x["category"])
                else None
            )
        )
    if p.decontamination.enabled:
        d = p.decontamination
        grams = eval_ngrams(eval_prompts, d.ngram)

        def contaminated(x: dict[str, Any]) -> str | None:
            mine = ngrams(word_tokens(x["prompt"]), d.ngram)
            return (
                "eval_overlap" if mine and sum(gram_key(g) in grams for g in mine) / len(mine) > d.max_overlap else None
            )

        out.append(contaminated)
    if p.student_matches_teacher == "drop":
        out.append(lambda x: "student_matches_teacher" if x["rejected"].strip() == x["chosen"].strip() else None)
    if p.drop_duplicates:
        out.append(duplicate)  # after the content filters: a pair dropped for another reason does not mask a later copy
    if p.near_duplicates.enabled:
        out.append(NearDuplicates(p.near_duplicates).check)
    if p.balance.key is not None:
        per_value: Counter[Any] = Counter()
        key, cap = p.balance.key, p.balance.max_per_value

        def balance(x: dict[str, Any]) -> str | None:
            if per_value[x[key]] >= (cap or 0):
                return f"over_{key}_quota"
            per_value[x[key]] += 1
            return None

        out.append(balance)  # last: only pairs that survive everything else count toward the quota
    return out


class Curator:
    """The filters applied to a stream of pairs; counts by reason."""

    def __init__(self, p: CurateParams, eval_prompts: list[str]):
        self.active = filters(p, eval_prompts)
        self.reasons: Counter[str] = Counter()
        self.pairs_in = self.kept = 0

    def split(self, pairs: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        kept: list[dict] = []
        quarantine: list[dict] = []
        for pair in pairs:
            self.pairs_in += 1
            reason = next((r for f in self.active if (r := f(pair)) is not None), None)
            if reason is None:
                kept.append(pair)
            else:
                self.reasons[reason] += 1
                quarantine.append(q.row(pair, reason))
        self.kept += len(kept)
        return kept, quarantine


def curate(
    p: CurateParams, pairs: list[dict[str, Any]], eval_prompts: list[str] | None = None
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(kept, quarantined with `reason`, counts) for an in-memory list of pairs (the
    filters only; main() adds the gates and streams)."""
    c = Curator(p, eval_prompts or [])
    kept, quarantine = c.split(pairs)
    counts = {
        "pairs_in": c.pairs_in,
        "kept": c.kept,
        "quarantined": len(quarantine),
        "dropped_by_reason": dict(sorted(c.reasons.items())),
    }
    if counts["kept"] + counts["quarantined"] != counts["pairs_in"]:
        raise AssertionError("curate: counts do not reconcile")
    return kept, quarantine, counts


def pair_batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """The pairs file in record batches, its columns checked first (io.check_columns)."""
    pf = parquet_file(path)
    want = records.PAIR_SCHEMA
    check_columns(path, pf.schema_arrow, want)
    # nullable: a null in a required field is the input gate's to quarantine, not a cast error
    loose = pa.schema([f.with_nullable(True) for f in want], metadata=want.metadata)
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=want.names):
            yield pa.Table.from_batches([batch]).cast(loose)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: the Parquet data is damaged or truncated ({exc})") from exc
