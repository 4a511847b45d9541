"""A served teacher's scores: the score stage's top-k signal from an OpenAI-compatible
completions endpoint (`score.engine: openai`), e.g. a vLLM server, instead of a teacher
loaded in this process.

    teacher = ServedTeacher(p.openai, tok, p.logprobs_via)   # checks the endpoint's tokenizer on a probe
    for batch in teacher.score_batches(pairs, p.k, p.batch_size):   # records.TOPK_SCHEMA
        sink.write(batch)

Each (pair, side) is one request: the prompt and the response as token ids (encoded here
with `tok`, as the trainer encodes them), with vLLM's `prompt_logprobs: k`:

    {"model": openai.model, "prompt": [ids], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": k}

The answer's `choices[0].prompt_logprobs` has, per prompt position j > 0, a dict of token
id -> {logprob, rank, decoded_token} holding the k most likely tokens and the token at j.
At each response position that gives the top-k ids and log-probs and the target
log-prob the train stage reads (`train.teacher_signal: topk`): what opd needs, and what
the KL methods read through the top-k buckets. Checked on every answer: one entry per
prompt token, each holding the token we sent (the echoed tokens are ours), k ranked
entries, finite log-probs. Endpoints that return no `prompt_logprobs` (OpenAI's own
API, servers without the extension, chat endpoints, which cannot score tokens they did
not generate) are refused with an error naming the endpoint. Before any pair, a probe
text's token ids are sent and each echoed `decoded_token` must be the text our tokenizer
gives that id: a served teacher must share the student's tokenizer.

`score.logprobs_via: echo` asks instead in the OpenAI completions API's own form, for
servers without vLLM's extension: `echo: true, logprobs: k, max_tokens: 1`, whose
`choices[0].logprobs` holds per prompt token its text (`tokens`), its log-prob
(`token_logprobs`) and the k most likely tokens' texts and log-probs (`top_logprobs`).
Each echoed token must be ours (its text is what our tokenizer decodes our id to, or
`token_id:<id>` where the server names ids), and each top token's text must name one id
of our tokenizer (a text two ids decode to is refused: ask for prompt_logprobs then);
endpoints that return no logprobs for the echoed prompt are refused naming the
endpoint. Both forms give the same entries, so everything after the request is shared.

Requests go through the generation engine's `Endpoint` (openai_engine.py): the same
concurrency, rate limit, retries and per-request response cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from distillflow.base import encoding
from distillflow.base.config import OpenAIParams
from distillflow.base.io import DataError
from distillflow.engines.openai_engine import Endpoint
from distillflow.engines.scoring import to_record_batch

PROBE = "Probe: 0123456789 + - * / = ? (a, b) [x] {y} the quick brown fox."


class ServedTeacher(Endpoint):
    """The top-k scores of a teacher behind an OpenAI-compatible completions endpoint,
    asked for through vLLM's `prompt_logprobs` or the API's `echo` (`via`)."""

    def __init__(self, o: OpenAIParams | None, tok: Any, via: str) -> None:
        super().__init__(o, "score.openai")
        if via not in ("prompt_logprobs", "echo"):
            raise ValueError(f"score.logprobs_via: must be prompt_logprobs or echo, got {via!r}")
        self.tok, self.via = tok, via
        self.probed = False  # token_logprobs probes the tokenizer once
        self.by_text: dict[str, list[int]] | None = None  # echo: our ids by the text each decodes to

    def where(self, what: str) -> str:
        return f"score.openai ({self.o.base_url}, model {self.o.model}), {what}"

    def prompt_logprobs(self, ids: list[int], k: int, what: str, cache: bool = True) -> list[dict[str, Any]]:
        """Per position 1..len(ids)-1, the endpoint's entries {token id: (logprob, rank,
        decoded_token)} for the token there: retried, checked, and (`cache`) cached."""
        if self.via == "echo":
            body = {
                "model": self.o.model,
                "prompt": ids,
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": k,
            }
        else:
            body = {"model": self.o.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
        where = self.where(what)
        if not cache:
            return self.parse(self.request(where, body, self.send), ids, where)["prompt_logprobs"]
        answer = self.cached(where, body, self.send, lambda r: self.parse(r, ids, where))
        return answer["prompt_logprobs"]

    def send(self, **body: Any) -> Any:
        """completions.create; vLLM's prompt_logprobs goes in the request's extra body."""
        if "prompt_logprobs" in body:
            extra = {"prompt_logprobs": body.pop("prompt_logprobs")}
            return self.client.completions.create(**body, extra_body=extra)
        return self.client.completions.create(**body)

    def parse(self, resp: Any, ids: list[int], where: str) -> dict[str, Any]:
        if not resp.choices:
            raise DataError(f"{where}: the response has no choices")
        if self.via == "echo":
            return {"prompt_logprobs": self.echoed_entries(resp.choices[0].logprobs, ids, where)}
        got = (resp.choices[0].model_extra or {}).get("prompt_logprobs")
        if got is None:
            raise DataError(
                f"{where}: the endpoint returned no prompt_logprobs. A served teacher must score the tokens it is "
                "sent (vLLM's prompt_logprobs); chat endpoints and APIs without it cannot score tokens they did not "
                "generate"
            )
        return {"prompt_logprobs": checked_entries(got, ids, where)}

    def echoed_entries(self, got: Any, ids: list[int], where: str) -> list[dict[str, Any]]:
        """checked_entries' form from the API's echoed `logprobs`: per position 1..,
        {str(token id): [logprob, rank, text]} for the top tokens and the token sent."""
        if got is None or not got.tokens or got.token_logprobs is None or got.top_logprobs is None:
            raise DataError(
                f"{where}: the endpoint returned no logprobs for the echoed prompt (echo with logprobs); a served "
                "teacher must score the tokens it is sent"
            )
        if len(got.tokens) < len(ids):
            raise DataError(f"{where}: {len(got.tokens)} echoed tokens for a prompt of {len(ids)}")
        out = []
        for j in range(1, len(ids)):
            if self.id_of(got.tokens[j], where) != ids[j]:
                raise DataError(
                    f"{where}: position {j}: the endpoint echoed {got.tokens[j]!r} where we sent id {ids[j]} "
                    f"({self.tok.decode([ids[j]])!r}): the echoed tokens differ from ours"
                )
            ours = self.tok.decode([ids[j]])  # the text the probe compares: ours, also when the server named the id
            top = sorted(
                ((float(v), self.id_of(t, where), t) for t, v in (got.top_logprobs[j] or {}).items()), reverse=True
            )
            entry = {str(t): [lp, rank, text] for rank, (lp, t, text) in enumerate(top, start=1)}
            if str(ids[j]) in entry:
                entry[str(ids[j])][2] = ours
            else:
                entry[str(ids[j])] = [float(got.token_logprobs[j]), len(top) + 1, ours]
            out.append(entry)
        return out

    def id_of(self, text: str, where: str) -> int:
        """Our token id of an echoed token: `token_id:<id>`, or the one id whose text it is."""
        if text.startswith("token_id:") and text[9:].isdigit():
            return int(text[9:])
        if self.by_text is None:
            self.by_text = {}
            for i in range(len(self.tok)):
                self.by_text.setdefault(self.tok.decode([i]), []).append(i)
        found = self.by_text.get(text, [])
        if len(found) != 1:
            raise DataError(
                f"{where}: the echoed token {text!r} is the text of {len(found)} of our tokenizer's ids, so its id is "
                "unknown: the endpoint's tokenizer differs from ours, or (a text two ids share) set "
                "score.logprobs_via: prompt_logprobs (vLLM), which names ids"
            )
        return found[0]

    def check_tokenizer(self) -> None:
        """The probe: each token of PROBE, echoed, decodes to what our tokenizer says. Sent
        past the cache, every time: the model behind an endpoint can change."""
        ids = self.tok(PROBE, add_special_tokens=False)["input_ids"]
        entries = self.prompt_logprobs(ids, 1, "tokenizer probe", cache=False)
        for j, entry in enumerate(entries, start=1):
            theirs, ours = entry[str(ids[j])][2], self.tok.decode([ids[j]])
            if theirs is None:
                raise DataError(
                    self.where(
                        f"tokenizer probe: position {j} has no decoded_token, so the tokenizer cannot be checked"
                    )
                )
            if theirs != ours:
                raise DataError(
                    self.where(
                        f"tokenizer probe: token id {ids[j]} is {theirs!r} at the endpoint and {ours!r} here: the "
                        "served teacher's tokenizer differs from the student's (distilling across tokenizers is not "
                        "supported)"
                    )
                )

    def score_one(self, key: tuple[str, str], prompt: list[int], response: list[int], k: int) -> tuple:
        what = f"pair {key[0]} ({key[1]})"
        ids = prompt + response
        return top_k(self.prompt_logprobs(ids, k, what), ids, len(prompt), k, self.where(what))

    def token_logprobs(self, seqs: list[list[int]], starts: list[int]) -> list[list[float]]:
        """The teacher's log-prob of each token of seqs[i] from starts[i] on (a sampled
        response after its prompt), one request per sequence (`prompt_logprobs: 0`: the
        tokens sent only), `max_concurrency` at a time: what online opd trains on
        (train.online.teacher served). The tokenizer is probed on the first call."""
        if not self.probed:
            self.check_tokenizer()
            self.probed = True

        def one(i: int) -> list[float]:
            what = f"sample {i} of {len(seqs)} ({len(seqs[i])} tokens)"
            entries = self.prompt_logprobs(seqs[i], 0, what)
            got = [entries[j - 1][str(seqs[i][j])][0] for j in range(starts[i], len(seqs[i]))]
            if not all(math.isfinite(v) for v in got):
                raise DataError(self.where(f"{what}: a non-finite log-prob"))
            return got

        with ThreadPoolExecutor(max_workers=self.o.max_concurrency) as pool:
            return list(pool.map(one, range(len(seqs))))

    def score_batches(self, pairs: list[dict[str, Any]], k: int, batch_size: int) -> Iterator[pa.RecordBatch]:
        """records.TOPK_SCHEMA batches of `batch_size` (pair, side) rows, in pair order,
        chosen before rejected, each row one request (sent `max_concurrency` at a time)."""
        if k > len(self.tok):
            raise DataError(f"score.k: {k} is larger than the vocabulary ({len(self.tok)} tokens)")
        self.check_tokenizer()
        seqs = pair_sequences(self.tok, pairs)
        with ThreadPoolExecutor(max_workers=self.o.max_concurrency) as pool:
            for s in range(0, len(seqs), batch_size):
                chunk = seqs[s : s + batch_size]
                yield record_batch(chunk, list(pool.map(lambda c: self.score_one(c[0], c[1], c[2], k), chunk)), k)


def checked_entries(got: list[Any], ids: list[int], where: str) -> list[dict[str, Any]]:
    """vLLM's prompt_logprobs of the prompt `ids` (None, then per position a dict of token id
    -> {logprob, rank, decoded_token}), checked to hold one entry per token and the token
    sent at each: per position 1.., {str(token id): [logprob, rank, decoded_token]}."""
    if len(got) != len(ids):
        raise DataError(f"{where}: {len(got)} prompt_logprobs entries for {len(ids)} prompt tokens")
    out = []
    for j, entry in enumerate(got[1:], start=1):
        if not isinstance(entry, dict) or str(ids[j]) not in entry:
            raise DataError(
                f"{where}: position {j}: the entry does not hold the token we sent ({ids[j]}): "
                "the echoed tokens differ from ours"
            )
        out.append({str(t): [float(v["logprob"]), int(v["rank"]), v.get("decoded_token")] for t, v in entry.items()})
    return out


def top_k(entries: list[dict[str, Any]], ids: list[int], start: int, k: int, where: str) -> tuple:
    """(top-k ids (n, k), their log-probs (n, k), target log-probs (n,)) at positions start..
    of `ids`, from checked_entries: the k entries ranked 1..k, in descending log-prob."""
    n = len(ids) - start
    top_ids, top_lps, target = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros(n, np.float32)
    for row, j in enumerate(range(start, len(ids))):
        entry = entries[j - 1]
        ranked = sorted(((v[0], int(t)) for t, v in entry.items() if v[1] <= k), reverse=True)
        values = [lp for lp, _ in ranked] + [entry[str(ids[j])][0]]
        if len(ranked) != k or not all(math.isfinite(v) for v in values):
            raise DataError(f"{where}, position {j}: {len(ranked)} ranked entries (k = {k}) or a non-finite log-prob")
        top_ids[row] = [t for _, t in ranked]
        top_lps[row] = [lp for lp, _ in ranked]
        target[row] = entry[str(ids[j])][0]
    return top_ids, top_lps, target


Sequence = tuple[tuple[str, str], list[int], list[int]]  # ((pair_id, side), prompt ids, response ids)


def pair_sequences(tok: Any, pairs: list[dict[str, Any]]) -> list[Sequence]:
    """Every (pair, side) to score, in pair order, chosen before rejected, encoded as the
    trainer encodes them."""
    seqs: list[Sequence] = []
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        seqs += [((pr["pair_id"], "chosen"), prompt, chosen), ((pr["pair_id"], "rejected"), prompt, rejected)]
    return seqs


def record_batch(chunk: list[Sequence], scored: list[tuple], k: int) -> pa.RecordBatch:
    """One records.TOPK_SCHEMA batch of the scored sequences (top_k's tuples)."""
    return to_record_batch(
        [c[0] for c in chunk],
        np.array([len(c[2]) for c in chunk], dtype=np.int32),
        k,
        np.concatenate([x[0] for x in scored]) if scored else np.zeros((0, k), np.int32),
        np.concatenate([x[1] for x in scored]) if scored else np.zeros((0, k), np.float32),
        np.concatenate([x[2] for x in scored]) if scored else np.zeros(0, np.float32),
    )
