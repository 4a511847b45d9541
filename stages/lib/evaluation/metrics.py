"""The scores of one model's eval responses: exact match (overall and per skill), ROUGE-L
against the teacher, response lengths, teacher-forced NLL / KL(teacher || student) /
greedy agreement, and speculative decoding with the student drafting for the teacher."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from stages.lib.data import encoding
from stages.lib.evaluation.eval_params import EvaluateParams
from stages.lib.task import toytask
from stages.lib.training import losses


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


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits (rouge-score's default)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as a harmonic mean of its
    precision and recall, as the rouge-score package computes it (no stemming): an empty
    text on either side (after tokenizing) scores 0, two empty texts included."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return 0.0
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
            f"evaluate: {where} have no tokens to score (every response empty and truncated); "
            "raise evaluate.max_new_tokens or check the model"
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
