"""evaluate: teacher, initial student and distilled student on the held-out prompts.

    python -m stages.evaluate --params params.yaml --prompts data/seed --models data/bootstrap \
        --trained data/train --out data/evaluate --metrics metrics/evaluate.json

For each model, responses to every eval prompt (greedy unless `evaluate.temperature`
says otherwise) and, where prompts carry reference answers (the toy task), exact-match
accuracy overall and per skill. For both students, the token-level KL(teacher ||
student) on the teacher's held-out responses. The eval prompts come from
data/seed/eval.parquet, which is disjoint from every training prompt (checked here
against data/seed/train.parquet again, not assumed).

Outputs: predictions.parquet (one row per model and prompt, with correctness),
manifest.json, and the metrics file (DVC metrics).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from stages.lib.audit import lineage
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, GenerationParams, ModelParams
from stages.lib.core.params import check
from stages.lib.data import encoding, records
from stages.lib.data.io import DataError, atomic_dir, read_rows, write_json, write_table
from stages.lib.engines.generation import generate_transformers
from stages.lib.task import toytask
from stages.lib.training import losses

log = logging.getLogger("evaluate")

PREDICTION_SCHEMA = records.schema(
    "prediction",
    [
        pa.field("model", pa.string(), nullable=False),  # teacher | student_initial | student_distilled
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("response", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=True),  # null where there is no reference
    ],
)


@dataclass(frozen=True)
class EvaluateParams:
    """params.yaml `evaluate`."""

    batch_size: int
    max_new_tokens: int
    temperature: float  # 0 = greedy (the default for accuracy)
    seed: int
    speculative_prompts: int  # eval prompts run through assisted generation (student drafts for teacher); 0 = off
    draft_tokens: int  # tokens the student drafts per teacher verification

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.speculative_prompts >= 0, "speculative_prompts", "must be >= 0 (0 = off)")
        check(self.draft_tokens >= 1, "draft_tokens", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")

    def generation(self) -> GenerationParams:
        return GenerationParams(
            "transformers", self.batch_size, self.max_new_tokens, self.temperature, 1.0, 1, self.seed, 1
        )


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "evaluate": EvaluateParams,
}
PARAMS = tuple(SECTIONS)


def accuracy(prompts: list[dict[str, Any]], gens: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Exact match overall and per category; None when no prompt has a reference."""
    if all(pr["reference"] is None for pr in prompts):
        return None
    per: dict[str, list[bool]] = defaultdict(list)
    for pr, g in zip(prompts, gens, strict=True):
        if pr["reference"] is not None:
            per[pr["category"] or "all"].append(toytask.is_correct(g["response"], pr["reference"]))
    flat = [c for v in per.values() for c in v]
    return {
        "exact_match": round(sum(flat) / len(flat), 4),
        "per_category": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
        "n": len(flat),
    }


def words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits (rouge-score's default)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as a harmonic mean of its
    precision and recall. Two empty texts agree (1.0); one empty text scores 0."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return float(c == r)
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(c) + len(r))


def length_stats(gens: list[dict[str, Any]]) -> dict[str, float]:
    n = sorted(g["response_tokens"] for g in gens)
    q = lambda f: n[min(len(n) - 1, int(f * len(n)))]  # noqa: E731
    return {
        "mean": round(sum(n) / len(n), 3),
        "p50": q(0.5),
        "p90": q(0.9),
        "max": n[-1],
        "truncated": round(sum(g["finish_reason"] == "length" for g in gens) / len(gens), 4),
    }


def sequences(
    tok: Any, prompts: list[dict[str, Any]], responses: list[dict[str, Any]]
) -> list[tuple[list[int], list[int]]]:
    return [
        (
            encoding.prompt_ids(tok, pr["prompt"]),
            encoding.response_ids(tok, g["response"], eos=g["finish_reason"] == "stop"),
        )
        for pr, g in zip(prompts, responses, strict=True)
    ]


@torch.no_grad()
def teacher_forced(
    teacher: torch.nn.Module | None,
    student: torch.nn.Module,
    tok: Any,
    seqs: list[tuple[list[int], list[int]]],
    vocab: int,
    batch_size: int,
    where: str,
) -> dict[str, float]:
    """Token-mean scores of `student` on fixed responses: its NLL, and with a teacher,
    KL(teacher || student) and the greedy agreement (the share of positions where both
    models' most likely next token is the same: the acceptance rate of greedy
    speculative decoding with the student drafting for the teacher).

    Responses are re-tokenized from their text, so a response of only special tokens
    scores nothing; with no token at all this raises, naming `where`."""
    nll = kl = agree = 0.0
    tokens = 0
    for s in range(0, len(seqs), batch_size):
        b = encoding.collate(seqs[s : s + batch_size], tok.pad_token_id)
        s_logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
        n = int(b.response_mask.sum())
        if not n:
            continue
        s_logp = torch.log_softmax(s_logits[b.response_mask].float(), dim=-1)
        nll -= float(s_logp.gather(-1, b.targets[b.response_mask].unsqueeze(-1)).sum())
        if teacher is not None:
            t_logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
            kl += losses.forward_kl(s_logits, t_logits, b.response_mask, reduction="token_mean").item() * n
            agree += float((t_logits[b.response_mask].argmax(-1) == s_logits[b.response_mask].argmax(-1)).sum())
        tokens += n
    if tokens == 0:
        raise ValueError(
            f"evaluate: {where} have no tokens to score (every response empty and truncated); raise evaluate.max_new_tokens or check the model"
        )
    out = {"nll": round(nll / tokens, 6)}
    if teacher is not None:
        out |= {"kl_teacher_student": round(kl / tokens, 6), "greedy_agreement": round(agree / tokens, 6)}
    return out


@torch.no_grad()
def speculative(
    teacher: torch.nn.Module, student: torch.nn.Module, tok: Any, prompts: list[dict[str, Any]], p: EvaluateParams
) -> dict[str, float]:
    """Greedy assisted generation (transformers' speculative decoding) with the student
    drafting `draft_tokens` tokens for the teacher, one prompt at a time, on the first
    `speculative_prompts` eval prompts. Reports teacher forward passes per generated
    token with and without the draft (counted, so the figure is exact and repeatable;
    wall-clock speed-up depends on hardware and lives in benchmarks/), and checks the
    output equals the teacher's own greedy output, as greedy speculative decoding must."""
    calls = [0]
    hook = teacher.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        plain_calls = assisted_calls = new_tokens = same = 0
        for pr in prompts[: p.speculative_prompts]:
            ids = torch.tensor([encoding.prompt_ids(tok, pr["prompt"])])
            kw = dict(
                attention_mask=torch.ones_like(ids),
                max_new_tokens=p.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            calls[0] = 0
            plain = teacher.generate(ids, **kw)
            plain_calls += calls[0]
            calls[0] = 0
            assisted = teacher.generate(
                ids,
                assistant_model=student,
                num_assistant_tokens=p.draft_tokens,
                num_assistant_tokens_schedule="constant",
                assistant_confidence_threshold=0.0,
                **kw,
            )
            assisted_calls += calls[0]
            new_tokens += plain.shape[1] - ids.shape[1]
            same += int(torch.equal(plain, assisted))
    finally:
        hook.remove()
    n = min(len(prompts), p.speculative_prompts)
    return {
        "prompts": n,
        "draft_tokens": p.draft_tokens,
        "tokens": new_tokens,
        "teacher_calls_per_token": round(assisted_calls / new_tokens, 4),
        "teacher_calls_per_token_plain": round(plain_calls / new_tokens, 4),
        "teacher_call_speedup": round(plain_calls / assisted_calls, 4),
        "matches_greedy": round(same / n, 4),
    }


def generate(
    model: torch.nn.Module, tok: Any, fp: str, name: str, prompts: list[dict[str, Any]], p: EvaluateParams
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A model's eval responses: (metrics, generations, prediction rows)."""
    gens = generate_transformers(model, tok, prompts, p.generation(), fp, desc=f"evaluate {name}")
    acc = accuracy(prompts, gens)
    metrics: dict[str, Any] = {"accuracy": acc} if acc is not None else {}
    metrics["response_tokens"] = length_stats(gens)
    rows = [
        {
            "model": name,
            "prompt_id": pr["prompt_id"],
            "category": pr["category"],
            "response": g["response"],
            "finish_reason": g["finish_reason"],
            "correct": None if pr["reference"] is None else toytask.is_correct(g["response"], pr["reference"]),
        }
        for pr, g in zip(prompts, gens, strict=True)
    ]
    return metrics, gens, rows


def student_metrics(
    teacher: torch.nn.Module,
    tok_t: Any,
    student: torch.nn.Module,
    tok_s: Any,
    prompts: list[dict[str, Any]],
    teacher_gens: list[dict[str, Any]],
    own_gens: list[dict[str, Any]],
    p: EvaluateParams,
) -> dict[str, Any]:
    """What a student is measured on besides accuracy, against the teacher's responses."""
    vocab = models.check_vocabularies(tok_s, tok_t, student.config.vocab_size, teacher.config.vocab_size)
    on_teacher = teacher_forced(
        teacher,
        student,
        tok_s,
        sequences(tok_s, prompts, teacher_gens),
        vocab,
        p.batch_size,
        "the teacher's eval responses",
    )
    own = sequences(tok_s, prompts, own_gens)
    # A student may answer with nothing scorable at all (only special tokens, cut off):
    # then there is no NLL on its own responses, and the metrics say so.
    scorable = sum(len(r) for _, r in own)
    on_own = (
        teacher_forced(None, student, tok_s, own, vocab, p.batch_size, "the student's own eval responses")
        if scorable
        else {"nll": None}
    )
    out: dict[str, Any] = {
        "kl_teacher_student": on_teacher["kl_teacher_student"],
        "nll_on_teacher_responses": on_teacher["nll"],
        "nll_on_own_responses": on_own["nll"],  # DPKD's collapse shows here; null: nothing to score
        "own_response_tokens_scored": scorable,
        "greedy_agreement": on_teacher["greedy_agreement"],
        "rouge_l_vs_teacher": round(
            sum(rouge_l(g["response"], t["response"]) for g, t in zip(own_gens, teacher_gens, strict=True))
            / len(own_gens),
            6,
        ),
    }
    if p.speculative_prompts:
        out["speculative"] = speculative(teacher, student, tok_s, prompts, p)
    return out


def run(
    loaded: dict[str, tuple[torch.nn.Module, Any, str]], prompts: list[dict[str, Any]], p: EvaluateParams
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`loaded` maps teacher / student_initial / student_distilled to (model, tokenizer, fingerprint)."""
    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    responses: dict[str, list[dict[str, Any]]] = {}
    for name, (model, tok, fp) in loaded.items():
        metrics[name], responses[name], rows = generate(model, tok, fp, name, prompts, p)
        predictions.extend(rows)
    teacher, tok_t, _ = loaded["teacher"]
    for name in ("student_initial", "student_distilled"):
        student, tok_s, _ = loaded[name]
        metrics[name] |= student_metrics(
            teacher, tok_t, student, tok_s, prompts, responses["teacher"], responses[name], p
        )
    return metrics, predictions


def main() -> None:
    args = entry.parse_paths(__doc__, "prompts", "models", "trained", "out", "metrics")
    used = params.load_sections(args.params, SECTIONS)
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    eval_file, train_file = args.prompts / "eval.parquet", args.prompts / "train.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    leaked = {pr["prompt_id"] for pr in prompts} & {
        pr["prompt_id"] for pr in read_rows(train_file, records.PROMPT_SCHEMA)
    }
    if leaked:
        raise DataError(
            f"{eval_file}: {len(leaked)} eval prompts are also training prompts (e.g. {sorted(leaked)[0]}); evaluation would be contaminated"
        )
    refs = {
        "teacher": (used["models.teacher"].ref(), args.models / "teacher"),
        "student_initial": (used["models.student"].ref(), args.models / "student"),
        "student_distilled": (models.ModelRef(str(args.trained / "model"), None), Path()),
    }
    loaded = {
        name: (
            models.load_model(ref, d, trust, dtype),
            models.load_tokenizer(ref, d, trust),
            models.fingerprint(ref, d),
        )
        for name, (ref, d) in refs.items()
    }
    metrics, predictions = run(loaded, prompts, used["evaluate"])
    metrics["eval_prompts"] = len(prompts)
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "predictions.parquet", predictions, PREDICTION_SCHEMA)
        lineage.write_manifest(
            tmp,
            "evaluate",
            used,
            inputs={"eval_prompts": eval_file, "train_prompts": train_file, "trained": args.trained},
            outputs={"predictions.parquet": n},
            counts=metrics,
        )
    write_json(args.metrics, metrics)
    for name in loaded:
        acc = metrics[name].get("accuracy")
        log.info(
            "%s: exact match %s, KL %s",
            name,
            acc["exact_match"] if acc else "n/a",
            metrics[name].get("kl_teacher_student", "-"),
        )


if __name__ == "__main__":
    entry.run(main)
