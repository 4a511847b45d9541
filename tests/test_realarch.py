"""The project's generation, encoding, pairing and curation on models shaped like real
ones (tests/realarch.py): byte-level BPE, ChatML with a system turn, two eos ids, logit
rows padded past the tokenizer, a Qwen2 teacher and a Llama student."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import torch.nn.functional as F

from distillflow.base import encoding, models, records
from distillflow.base.config import GenerationParams
from distillflow.base.errors import ModelError
from distillflow.data import curation, pairing
from distillflow.engines.generation import generate_transformers
from distillflow.tasks.toy import toytask

from . import realarch as builder
from .builders import CURATE_OFF

NO_TOY = Path("no-toy-dir")  # real model folders: the toy dir is never used


def load(folder: Path, neutral_penalty: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) through the project's loaders. `neutral_penalty` sets the
    folder's repetition_penalty (Qwen2.5's 1.05) to 1.0, so greedy outputs are a plain
    argmax and comparisons between models are exact; test_greedy_decoding_is_plain_argmax
    checks what the engine does with the folder's value."""
    ref = models.ModelRef(str(folder), None)
    tok = models.load_tokenizer(ref, NO_TOY, trust_remote_code=False)
    model = models.load_model(ref, NO_TOY, trust_remote_code=False, dtype="float32")
    if neutral_penalty:
        model.generation_config.repetition_penalty = 1.0
    return model, tok


def gp(**kw: Any) -> GenerationParams:
    base: dict[str, Any] = dict(
        engine="transformers",
        batch_size=8,
        max_new_tokens=12,
        temperature=0.0,
        top_p=1.0,
        num_samples=1,
        seed=0,
        tensor_parallel_size=1,
    )
    return GenerationParams(**{**base, **kw})


def prompt_rows(texts: list[str], answers: list[str | None] | None = None) -> list[dict[str, Any]]:
    answers = answers or [None] * len(texts)
    return [
        {
            "prompt_id": records.prompt_id(records.normalise_prompt(t)),
            "prompt": t,
            "split": "train",
            "reference": a,
            "category": None,
            "source": "hf",
            "source_ref": f"realarch:row={i}",
            "group": None,
        }
        for i, (t, a) in enumerate(zip(texts, answers, strict=True))
    ]


def toy_prompts(n: int, seed: int = 5) -> list[dict[str, Any]]:
    exs = [ex for _, ex in zip(range(n), toytask.examples(toytask.config_of(builder.TASK), seed))]
    return prompt_rows([e.prompt for e in exs], [e.answer for e in exs])


def argmax_decode(model: Any, tok: Any, prompt: str, max_new: int) -> list[int]:
    """Greedy decoding by hand (no `generate`): the ids before the first eos."""
    ids = encoding.prompt_ids(tok, prompt)
    ends = {tok.eos_token_id, *model.generation_config.eos_token_id}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in ends:
                break
            out.append(nxt)
    return out


def scripted(model: Any, tok: Any, response: str, end: int) -> Any:
    """A copy of the Qwen2 teacher turned into a bigram machine that answers every
    prompt with `response`'s tokens then `end`: attention and MLP outputs zeroed, so the
    last hidden state is the current token's embedding; embeddings are basis vectors and
    the head maps each token of the script to the next. Real weights, real forward."""
    ids = tok(response, add_special_tokens=False)["input_ids"]
    start = tok("\n", add_special_tokens=False)["input_ids"]  # the generation prompt ends "assistant\n"
    chain = [*start, *ids, end]
    cur = chain[:-1]
    if len(set(cur)) != len(cur) or len(cur) > model.config.hidden_size:
        raise ValueError(f"scripted: {response!r} needs distinct tokens (and at most hidden_size of them): {chain}")
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.norm.weight.fill_(1.0)
        m.model.embed_tokens.weight.zero_()
        m.lm_head.weight.zero_()
        for k, (a, b) in enumerate(zip(chain, chain[1:])):
            m.model.embed_tokens.weight[a, k] = 1.0
            m.lm_head.weight[b, k] = 10.0
    return m, ids


UNICODE_RESPONSE = "Voilà 😀 東"


# a ---------------------------------------------------------------------------------------


def test_stop_string_spanning_two_bpe_tokens(realarch: dict[str, Path]) -> None:
    model, tok = load(realarch["teacher"])
    prompts = toy_prompts(24)
    plain = generate_transformers(model, tok, prompts, gp(), "fp")
    # a stop string across a token boundary of what the teacher really generated: the
    # last character of token i and the first of token i + 1, 2+ tokens on its own too
    found = None
    for pr, rec in zip(prompts, plain, strict=True):
        body = argmax_decode(model, tok, pr["prompt"], 12)
        assert tok.decode(body, skip_special_tokens=True) == rec["response"]  # the engine's greedy is this argmax
        for i in range(len(body) - 1):
            left, right = tok.decode(body[i : i + 1]), tok.decode(body[i + 1 : i + 2])
            stop = left[-1:] + right[:1]
            start = len(tok.decode(body[: i + 1])) - 1
            if stop.isascii() and len(stop) == 2 and rec["response"].find(stop) == start:
                if len(tok(stop, add_special_tokens=False)["input_ids"]) >= 2:
                    found = (pr, rec, stop, start, i + 2)
                    break
        if found:
            break
    assert found is not None, "no 2-token stop string in the teacher's greedy outputs"
    pr, rec, stop, start, through = found
    [cut] = generate_transformers(model, tok, [pr], gp(stop=(stop,)), "fp")
    assert cut["finish_reason"] == "stop"
    assert cut["response"] == rec["response"][:start]
    assert stop not in cut["response"]
    # tokens generated through the stop string's last character: both of its tokens
    assert cut["response_tokens"] == through
    assert rec["response_tokens"] > through  # without the stop string it went on


# b ---------------------------------------------------------------------------------------


def test_unicode_round_trip_through_generation_and_pairs(realarch: dict[str, Path]) -> None:
    teacher, tok = load(realarch["teacher"])
    student, _ = load(realarch["student"])
    prompts = prompt_rows(list(builder.UNICODE_PROMPTS))
    speaker, script = scripted(teacher, tok, UNICODE_RESPONSE, tok.eos_token_id)
    assert any(len(c.encode()) > 1 and tok.decode(script[i : i + 1]) != c for i, c in enumerate(UNICODE_RESPONSE)), (
        "the script should split a character across byte-level tokens"
    )
    t_rows = generate_transformers(speaker, tok, prompts, gp(max_new_tokens=24), "t")
    s_rows = generate_transformers(student, tok, prompts, gp(temperature=1.0, seed=3), "s")
    for r in t_rows:
        assert (r["response"], r["finish_reason"], r["response_tokens"]) == (UNICODE_RESPONSE, "stop", len(script) + 1)
    pairs, quarantined, counts = pairing.build_pairs(
        pairing.PairsParams(max_pairs_per_prompt=1), prompts, t_rows, s_rows
    )
    assert not quarantined and counts["pairs"] == len(prompts)
    for pair, pr, s in zip(pairs, prompts, s_rows, strict=True):
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (pr["prompt"], UNICODE_RESPONSE, s["response"])
        p_ids, c_ids, r_ids = encoding.encode_pair(tok, pair)
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": pr["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        assert rendered.startswith(f"<|im_start|>system\n{builder.SYSTEM}<|im_end|>\n<|im_start|>user\n{pr['prompt']}")
        assert tok.decode(p_ids) == rendered
        assert c_ids == [*script, tok.eos_token_id]  # the tokens the teacher generated, eos included
        assert len(c_ids) == pair["chosen_tokens"]
        assert tok.decode(c_ids, skip_special_tokens=True) == UNICODE_RESPONSE
        assert tok.decode(r_ids, skip_special_tokens=True) == s["response"]
        assert (r_ids[-1] == tok.eos_token_id) == (s["finish_reason"] == "stop")


def test_response_cut_mid_character_has_no_replacement_character(realarch: dict[str, Path]) -> None:
    teacher, tok = load(realarch["teacher"])
    speaker, script = scripted(teacher, tok, UNICODE_RESPONSE, tok.eos_token_id)
    # cut inside a multi-byte character (à or 😀, split across byte-level tokens)
    text = ""
    for n in range(1, len(script)):
        text = tok.decode(script[:n])
        if text.endswith("\ufffd"):
            break
    assert text.endswith("\ufffd"), "the script has no token that ends mid-character"
    [rec] = generate_transformers(speaker, tok, prompt_rows(["Say something."]), gp(max_new_tokens=n), "t")
    assert rec["finish_reason"] == "length" and rec["response_tokens"] == n
    assert rec["response"].encode("utf-8")  # valid str either way; the question is the content
    assert "\ufffd" not in rec["response"]
    expected = text.rstrip("\ufffd")  # the complete characters before the cut
    assert UNICODE_RESPONSE.startswith(expected) and len(expected) < len(UNICODE_RESPONSE)
    assert rec["response"] == expected


def test_sampling_never_emits_ids_past_the_tokenizer(realarch: dict[str, Path], monkeypatch) -> None:
    model, tok = load(realarch["teacher"])
    assert model.config.vocab_size == len(tok) + builder.TEACHER_PAD_ROWS
    generated: list[torch.Tensor] = []
    real_generate = model.generate

    def spy(**kw: Any) -> torch.Tensor:
        out = real_generate(**kw)
        generated.append(out[:, kw["input_ids"].shape[1] :])
        return out

    monkeypatch.setattr(model, "generate", spy)
    rows = generate_transformers(model, tok, toy_prompts(16), gp(temperature=1.0, num_samples=4, seed=1), "t")
    assert len(rows) == 64 and generated
    past = sorted({int(t) for g in generated for t in g.flatten() if t >= len(tok)})
    assert past == [], f"sampled ids past the tokenizer ({len(tok)} tokens): {past}"


# c ---------------------------------------------------------------------------------------


def test_left_padded_batches_give_the_same_greedy_outputs(realarch: dict[str, Path]) -> None:
    model, tok = load(realarch["teacher"], neutral_penalty=False)  # the folder's generation_config as shipped
    prompts = toy_prompts(12) + prompt_rows(list(builder.UNICODE_PROMPTS[:4]))
    lengths = {len(encoding.prompt_ids(tok, p["prompt"])) for p in prompts}
    assert len(lengths) >= 4, "the batch should mix prompt lengths"
    batched = generate_transformers(model, tok, prompts, gp(batch_size=16), "fp")
    alone = generate_transformers(model, tok, prompts, gp(batch_size=1), "fp")
    assert tok.padding_side == "left"
    assert [(r["response"], r["response_tokens"], r["finish_reason"]) for r in batched] == [
        (r["response"], r["response_tokens"], r["finish_reason"]) for r in alone
    ]


def test_greedy_decoding_is_plain_argmax(realarch: dict[str, Path]) -> None:
    model, tok = load(realarch["teacher"], neutral_penalty=False)
    assert model.generation_config.repetition_penalty == 1.05  # as shipped
    prompts = toy_prompts(16)
    rows = generate_transformers(model, tok, prompts, gp(), "fp")
    for pr, rec in zip(prompts, rows, strict=True):
        assert rec["response"] == tok.decode(argmax_decode(model, tok, pr["prompt"], 12)), pr["prompt"]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_training_batches_pad_right_and_score_each_sequence_alone(realarch: dict[str, Path], role: str) -> None:
    model, tok = load(realarch[role])
    texts = [("Add 4 and 5.", "9"), ("Write café in capitals.", "CAFÉ"), ("Reverse the word abcdefghij.", "jihgfedcba")]
    seqs = [(encoding.prompt_ids(tok, p), encoding.response_ids(tok, r, eos=True)) for p, r in texts]
    b = encoding.collate(seqs, tok.pad_token_id)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        assert b.input_ids[i, :n].tolist() == p + r  # right-padded: the sequence starts at 0
        assert (b.input_ids[i, n:] == tok.pad_token_id).all() and b.attention_mask[i, :n].all()
        assert not b.attention_mask[i, n:].any()
        scored = b.response_mask[i].nonzero().flatten().tolist()
        assert scored == list(range(len(p) - 1, n - 1))  # positions whose next token is a response token
        assert b.targets[i, scored].tolist() == r  # ... the response, eos (<|im_end|>) last
        assert r[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    def token_nll(batch: encoding.Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits[batch.response_mask], batch.targets[batch.response_mask], reduction="none")

    with torch.no_grad():
        together = token_nll(b)
        alone = torch.cat([token_nll(encoding.collate([s], tok.pad_token_id)) for s in seqs])
    assert together.shape == alone.shape == (sum(len(r) for _, r in seqs),)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # the training loss (mean over response tokens) is the token-weighted mean of the sequences'
    assert abs(together.mean().item() - alone.mean().item()) < 1e-5


# d ---------------------------------------------------------------------------------------

CURATE = dataclasses.replace(CURATE_OFF, drop_truncated_chosen=True)


def test_max_new_tokens_is_truncation_and_the_second_eos_is_a_stop(realarch: dict[str, Path]) -> None:
    teacher, tok = load(realarch["teacher"])
    student, _ = load(realarch["student"])
    prompts = toy_prompts(16)
    full = generate_transformers(teacher, tok, prompts, gp(), "t")
    assert all(r["finish_reason"] == "stop" for r in full), "the SFT teacher ends its answers with <|im_end|>"
    short = generate_transformers(teacher, tok, prompts, gp(max_new_tokens=2), "t")
    cut = [s["finish_reason"] == "length" for s in short]
    for f, s, was_cut in zip(full, short, cut, strict=True):
        if was_cut:
            assert s["response_tokens"] == 2 and f["response"].startswith(s["response"]) and f["response_tokens"] > 2
        else:
            assert s == f | {"generation_id": s["generation_id"], "sampling": s["sampling"]}
    assert sum(cut) >= 1, "max_new_tokens=2 should cut some answers"
    rejected = generate_transformers(student, tok, prompts, gp(), "s")
    pairs, _, _ = pairing.build_pairs(pairing.PairsParams(max_pairs_per_prompt=1), prompts, short, rejected)
    kept, quarantined, counts = curation.curate(CURATE, pairs)
    assert counts["dropped_by_reason"] == {"truncated_chosen": sum(cut)}
    assert [q["chosen_id"] for q in quarantined] == [s["generation_id"] for s, c in zip(short, cut) if c]
    assert len(kept) == len(cut) - sum(cut)
    assert curation.curate(dataclasses.replace(CURATE, drop_truncated_chosen=False), pairs)[2]["kept"] == len(pairs)

    # The second eos id (<|endoftext|>, only in generation_config) ends a response as a stop:
    # the same teacher with the two ids' output rows swapped emits it where it emitted <|im_end|>.
    im_end, endoftext = tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")
    assert teacher.generation_config.eos_token_id == [im_end, endoftext] and tok.eos_token_id != endoftext
    swapped = copy.deepcopy(teacher)
    with torch.no_grad():
        head = swapped.lm_head.weight
        head[[im_end, endoftext]] = head[[endoftext, im_end]].clone()
    other = generate_transformers(swapped, tok, prompts, gp(), "t")
    assert [(r["response"], r["finish_reason"], r["response_tokens"]) for r in other] == [
        (r["response"], "stop", r["response_tokens"]) for r in full
    ]


# prompts folder ----------------------------------------------------------------------------


def test_prompts_folder_loads_as_an_hf_dataset_offline(realarch: dict[str, Path], monkeypatch) -> None:
    from distillflow.data import sources

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = str(realarch["prompts"])
    ds = datasets.load_dataset(folder, split="train", streaming=True)
    rows = list(ds)
    assert len(rows) == 200 + len(builder.UNICODE_PROMPTS)
    assert [r["prompt"] for r in rows[-len(builder.UNICODE_PROMPTS) :]] == list(builder.UNICODE_PROMPTS)
    s = sources.SourceParams(kind="hf", path=folder, config=None, split="train", revision=None, field="prompt")
    raw = list(sources._hf_rows(s, None))
    assert [r.value for r in raw] == [r["prompt"] for r in rows]
    assert all(r.reference is None and r.error is None for r in raw)  # hf rows carry no reference answer


# the gate on real architectures -------------------------------------------------------


def test_the_gate_passes_the_profile_models_and_refuses_a_tokenizer_class_mismatch(
    realarch: dict[str, Path], tmp_path: Path
) -> None:
    """Both folders hold the same tokenizer files. Saved from Qwen2Tokenizer (as Qwen2.5
    ships them) they load as one tokenizer; saved as a generic byte-level tokenizer,
    transformers picks the class from each config.json: the Qwen2 teacher's copy loads as Qwen2Tokenizer (which
    sets its own normalizer and split regex), the Llama student's as a generic backend:
    the same files, two tokenizers (they split some text differently: NFC composes a
    decomposed accent on one side only). The gate sees it."""
    ref = lambda p: models.ModelRef(str(p), None)  # noqa: E731
    found = models.preflight(ref(realarch["teacher"]), ref(realarch["student"]), tmp_path, False, "none")
    assert found["shared_tokenizer"] and found["vocab"] == len(load(realarch["teacher"])[1])
    assert found["teacher"]["logit_width"] - found["vocab"] == builder.TEACHER_PAD_ROWS
    assert found["student"]["logit_width"] - found["vocab"] == builder.STUDENT_PAD_ROWS
    assert len(found["teacher"]["eos_token_ids"]) == 2
    raw = builder.build_tokenizer()  # plain byte-level BPE, saved as transformers' generic tokenizer
    copies = {}
    for role in ("teacher", "student"):
        copies[role] = shutil.copytree(realarch[role], tmp_path / role)
        raw.save_pretrained(copies[role])
    assert (copies["teacher"] / "tokenizer.json").read_bytes() == (copies["student"] / "tokenizer.json").read_bytes()
    t_tok = models.load_tokenizer(ref(copies["teacher"]), tmp_path, False)
    s_tok = models.load_tokenizer(ref(copies["student"]), tmp_path, False)
    assert type(t_tok).__name__ == "Qwen2Tokenizer" and type(s_tok).__name__ != "Qwen2Tokenizer"
    assert models.tokenizer_digest(t_tok) != models.tokenizer_digest(s_tok)
    with pytest.raises(ModelError, match="tokenizers differ"):
        models.preflight(ref(copies["teacher"]), ref(copies["student"]), tmp_path, False, "none")
