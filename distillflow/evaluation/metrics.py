"""The scores of one model's eval responses: exact match (overall and per skill), ROUGE-L
against the teacher, response lengths, teacher-forced NLL / KL(teacher || student) /
greedy agreement, and speculative decoding with the student drafting for the teacher."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from distillflow import tasks
from distillflow.base import encoding, models
from distillflow.evaluation.eval_params import EvaluateParams
from distillflow.training import losses

# Reference answers by length in characters (the toy tokenizer's tokens): the control
# skill's words, perm's letters, and runsum/addc's short and long halves.
LENGTH_BINS = ((10, "01-10"), (17, "11-17"), (22, "18-22"))


def length_bin(chars: int) -> str:
    return next((name for top, name in LENGTH_BINS if chars <= top), "23+")


def accuracy(prompts: list[dict[str, Any]], gens: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The verifier's pass rate ("exact_match": perm accepts any order) overall, per
    category and per reference length (length_bin), and on step skills the share of
    steps right by the rule from what was written (steps left out count as wrong);
    None when no prompt has a reference."""
    if all(pr["reference"] is None for pr in prompts):
        return None
    per: dict[str, list[bool]] = defaultdict(list)
    by_length: dict[str, list[bool]] = defaultdict(list)
    step: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for pr, g in zip(prompts, gens, strict=True):
        if pr["reference"] is not None:
            cat = pr["category"] or "all"
            ok = tasks.is_correct(g["response"], pr["reference"], pr["category"])
            per[cat].append(ok)
            by_length[length_bin(len(pr["reference"]))].append(ok)
            scored = tasks.step_score(g["response"], pr["reference"], pr["category"])
            if scored is not None:
                step[cat].append(scored)
    flat = [c for v in per.values() for c in v]
    out: dict[str, Any] = {
        "exact_match": round(sum(flat) / len(flat), 4),
        "per_category": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
        "per_length": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_length.items())},
        "n": len(flat),
    }
    if step:
        right = {k: sum(r for r, _ in v) / sum(n for _, n in v) for k, v in step.items()}
        every = [x for v in step.values() for x in v]
        out["step_share"] = round(sum(r for r, _ in every) / sum(n for _, n in every), 4)
        out["step_share_per_category"] = {k: round(v, 4) for k, v in sorted(right.items())}
    return out


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
            # the ids the engine sampled, as training reads them (encode_pair); the text where it gave none
            list(g["token_ids"])
            if g["token_ids"] is not None
            else encoding.response_ids(tok, g["response"], eos=g["finish_reason"] == "stop"),
        )
        for pr, g in zip(prompts, responses, strict=True)
    ]


def head_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab: int, role: str) -> torch.Tensor:
    """float32 logits over the shared vocabulary from final hidden states (rows of the
    output layer past `vocab` are padding and never scored)."""
    weight, bias = models.lm_head(model, vocab, role)
    return torch.nn.functional.linear(hidden, weight, bias).float()


def response_hidden(model: torch.nn.Module, b: encoding.Batch, mask: torch.Tensor, device: str) -> torch.Tensor:
    """Final hidden states at the response positions of a batch, (positions, H); no KV cache."""
    out = model.base_model(
        input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False
    )
    return out.last_hidden_state[mask]


@torch.no_grad()
def teacher_forced(
    teacher: torch.nn.Module | None,
    student: torch.nn.Module,
    tok: Any,
    seqs: list[tuple[list[int], list[int]]],
    vocab: int,
    batch_size: int,
    where: str,
    device: str = "cpu",
    chunk_size: int = 1024,
    per_sequence: bool = False,
) -> dict[str, Any]:
    """Token-mean scores of `student` on fixed responses: its NLL, and with a teacher,
    KL(teacher || student) and the greedy agreement (the share of positions where both
    models' most likely next token is the same: the acceptance rate of greedy
    speculative decoding with the student drafting for the teacher).

    Both models run on `device`, `batch_size` sequences at a time, with no KV cache;
    logits are made only at response positions, `chunk_size` positions at a time, so
    memory holds two (chunk_size, vocab) tensors, never two (B, T, vocab) ones.
    Responses are re-tokenized from their text, so a response of only special tokens
    scores nothing; with no token at all this raises, naming `where`. `per_sequence`
    adds "per_sequence": each sequence's sums (nll, and with a teacher kl and agree)
    and its token count, in `seqs` order: what a paired resample of prompts needs."""
    nll = kl = agree = 0.0
    tokens = 0
    checked = False
    sums = {k: torch.zeros(len(seqs), dtype=torch.float64) for k in ("nll", "kl", "agree", "tokens")}
    for s in range(0, len(seqs), batch_size):
        b = encoding.collate(seqs[s : s + batch_size], tok.pad_token_id)
        mask = b.response_mask.to(device)
        n = int(mask.sum())
        if not n:
            continue
        if not checked:
            first = b.input_ids[:1, : int(b.attention_mask[0].sum())].to(device)
            for role, model in (("student", student), ("teacher", teacher)):
                if model is not None:
                    models.check_plain_head(model, first, torch.ones_like(first), role)
            checked = True
        targets = b.targets.to(device)[mask]
        rows = s + mask.nonzero()[:, 0].cpu()  # each response position's sequence
        s_h = response_hidden(student, b, mask, device)
        t_h = response_hidden(teacher, b, mask, device) if teacher is not None else None
        for c in range(0, n, chunk_size):
            s_logits = head_logits(student, s_h[c : c + chunk_size], vocab, "student")
            s_logp = torch.log_softmax(s_logits, dim=-1)
            token_nll = -s_logp.gather(-1, targets[c : c + chunk_size, None])[:, 0]
            nll += float(token_nll.sum())
            at = rows[c : c + chunk_size]
            if per_sequence:
                sums["nll"].index_add_(0, at, token_nll.double().cpu())
                sums["tokens"].index_add_(0, at, torch.ones(len(at), dtype=torch.float64))
            if t_h is not None:
                t_logits = head_logits(teacher, t_h[c : c + chunk_size], vocab, "teacher")
                token_kl = losses.forward_kl(s_logits, t_logits, None, reduction="none")
                same = t_logits.argmax(-1) == s_logits.argmax(-1)
                kl += float(token_kl.sum())
                agree += float(same.sum())
                if per_sequence:
                    sums["kl"].index_add_(0, at, token_kl.double().cpu())
                    sums["agree"].index_add_(0, at, same.double().cpu())
        tokens += n
    if tokens == 0:
        raise ValueError(
            f"evaluate: {where} have no tokens to score (every response empty and truncated); "
            "raise evaluate.max_new_tokens or check the model"
        )
    out: dict[str, Any] = {"nll": round(nll / tokens, 6)}
    if teacher is not None:
        out |= {"kl_teacher_student": round(kl / tokens, 6), "greedy_agreement": round(agree / tokens, 6)}
    if per_sequence:
        keep = ("nll", "kl", "agree") if teacher is not None else ("nll",)
        out["per_sequence"] = {k: sums[k].tolist() for k in keep} | {"tokens": [int(x) for x in sums["tokens"]]}
    return out


class Stepper:
    """One model decoding one sequence greedily over the shared vocabulary, with a KV
    cache that can be cut back (to drop rejected draft tokens). `calls` counts forward
    passes."""

    def __init__(self, model: torch.nn.Module, vocab: int, device: str) -> None:
        self.model, self.vocab, self.device = model, vocab, device
        self.key = models.cache_kwarg(model)
        self.cache: Any = None
        self.seen = 0  # tokens of the sequence the cache holds
        self.calls = 0

    def feed(self, seq: list[int]) -> torch.Tensor:
        """Run the tokens of `seq` the cache has not seen; their greedy next tokens (n,)."""
        new = torch.tensor([seq[self.seen :]], device=self.device)
        kw = {self.key: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=new, use_cache=True, **kw)
        self.cache = out[self.key] if self.key in out else out["past_key_values"]
        self.seen = len(seq)
        self.calls += 1
        return out.logits[0, :, : self.vocab].argmax(-1)

    def keep(self, n: int) -> None:
        """Forget all but the first `n` tokens of the sequence."""
        if n < self.seen:
            self.cache.crop(n - self.seen)
            self.seen = n


def greedy(
    model: torch.nn.Module, prompt: list[int], ends: set[int], p: EvaluateParams, vocab: int, device: str
) -> tuple[list[int], int]:
    """The model's own greedy response: (tokens, forward passes)."""
    step = Stepper(model, vocab, device)
    seq = list(prompt)
    while len(seq) - len(prompt) < p.max_new_tokens:
        seq.append(int(step.feed(seq)[-1]))
        if seq[-1] in ends:
            break
    return seq[len(prompt) :], step.calls


def assisted(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    prompt: list[int],
    ends: set[int],
    p: EvaluateParams,
    vocab: int,
    device: str,
) -> tuple[list[int], int, int, int]:
    """Greedy speculative decoding: the student drafts up to `draft_tokens` tokens, the
    teacher checks them in one forward pass, keeps the longest prefix it agrees with
    and adds its own next token (a correction, or one more after a fully accepted
    draft). (tokens, teacher passes, drafted tokens, accepted tokens)."""
    t, s = Stepper(teacher, vocab, device), Stepper(student, vocab, device)
    seq = list(prompt)
    drafted = accepted = 0
    while len(seq) - len(prompt) < p.max_new_tokens:
        room = p.max_new_tokens - (len(seq) - len(prompt))
        draft: list[int] = []
        while len(draft) < min(p.draft_tokens, room - 1) and not (draft and draft[-1] in ends):
            draft.append(int(s.feed(seq + draft)[-1]))
        verdict = t.feed(seq + draft)[-(len(draft) + 1) :].tolist()  # teacher's next token after each prefix
        n = 0
        while n < len(draft) and draft[n] == verdict[n]:
            n += 1
        drafted, accepted = drafted + len(draft), accepted + n
        new = [*draft[:n], verdict[n]]
        stop = next((i for i, tok in enumerate(new) if tok in ends), None)
        base = len(seq)
        seq.extend(new if stop is None else new[: stop + 1])
        if stop is not None:
            break
        t.keep(base + n)
        s.keep(min(s.seen, base + n))
    return seq[len(prompt) :], t.calls, drafted, accepted


@torch.no_grad()
def speculative(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tok: Any,
    prompts: list[dict[str, Any]],
    p: EvaluateParams,
    vocab: int,
    ends: set[int],
    device: str = "cpu",
) -> dict[str, float]:
    """Greedy speculative decoding with the student drafting `draft_tokens` tokens for
    the teacher, one prompt at a time, on the first `speculative_prompts` eval prompts,
    by our own verification loop over the shared vocabulary (assisted and plain),
    so models of one tokenizer whose logit rows are padded to different widths work, and
    the draft length is exactly `draft_tokens`. Reports teacher forward passes per
    generated token with and without the draft, and the share of drafted tokens the
    teacher accepted (counted, so the figures are exact and repeatable; wall-clock
    speed-up depends on hardware and lives in benchmarks/), and checks the output equals
    the teacher's own greedy output, as greedy speculative decoding must."""
    plain_calls = assisted_calls = new_tokens = same = drafted = accepted = 0
    for pr in prompts[: p.speculative_prompts]:
        ids = encoding.prompt_ids(tok, pr["prompt"])
        plain, calls = greedy(teacher, ids, ends, p, vocab, device)
        plain_calls += calls
        out, calls, d, a = assisted(teacher, student, ids, ends, p, vocab, device)
        assisted_calls, drafted, accepted = assisted_calls + calls, drafted + d, accepted + a
        new_tokens += len(plain)
        same += int(plain == out)
    n = min(len(prompts), p.speculative_prompts)
    return {
        "prompts": n,
        "draft_tokens": p.draft_tokens,
        "tokens": new_tokens,
        "teacher_calls_per_token": round(assisted_calls / new_tokens, 4),
        "teacher_calls_per_token_plain": round(plain_calls / new_tokens, 4),
        "teacher_call_speedup": round(plain_calls / assisted_calls, 4),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "matches_greedy": round(same / n, 4),
    }
