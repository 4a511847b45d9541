"""Generation records carry the sampled token ids and the sampler's log-prob of each
(records.GENERATION_SCHEMA `token_ids`, `token_logprobs`), and a pair is encoded from
those ids, not from a re-tokenisation of its text. The reference is a full forward pass
over prompt + sampled ids with temperature and top-p applied by hand."""

from pathlib import Path

import pytest
import torch

from distillflow.base import encoding, models
from distillflow.base.encoding import prompt_ids
from distillflow.data import pairing
from distillflow.engines.generation import generate_transformers

from .builders import gen, gp, pair, prompt, prompts, sampler_logprobs

TOY = models.ModelRef("toy", None)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)])
def test_records_carry_the_sampled_ids_and_the_sampler_s_log_probs(
    tiny_models: Path, temperature: float, top_p: float
) -> None:
    model = models.load_model(TOY, tiny_models / "teacher", False, "float32")
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    ends = models.stop_ids(model, tok)
    ps = prompts(6)
    n = 1 if temperature == 0.0 else 2  # greedy: one sample (two would be the same)
    p = gp(temperature=temperature, top_p=top_p, num_samples=n, max_new_tokens=10, batch_size=4)
    rows = generate_transformers(model, tok, ps, p, "fp")
    warped_somewhere = False
    for r in rows:
        ids, lps = r["token_ids"], r["token_logprobs"]
        assert len(ids) == len(lps) == r["response_tokens"] > 0
        assert (ids[-1] in ends) == (r["finish_reason"] == "stop")  # no stop strings here: eos ends it
        assert tok.decode(ids, skip_special_tokens=True) == r["response"]
        pr = next(q for q in ps if q["prompt_id"] == r["prompt_id"])
        ref = sampler_logprobs(model, prompt_ids(tok, pr["prompt"]), ids, temperature, top_p)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)
        plain = sampler_logprobs(model, prompt_ids(tok, pr["prompt"]), ids, 0.0, 1.0)
        warped_somewhere |= bool((ref - plain).abs().max() > 1e-3)
    # the reference tells the sampler's distribution from the model's where they differ
    assert warped_somewhere == (temperature not in (0.0, 1.0))


def test_a_stop_string_s_tokens_are_kept_with_the_response(tiny_models: Path) -> None:
    model = models.load_model(TOY, tiny_models / "teacher", False, "float32")
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    ps = prompts(12)
    plain = generate_transformers(model, tok, ps, gp(num_samples=1, max_new_tokens=12), "fp")
    stop = max((r["response"][:2] for r in plain if len(r["response"]) > 3), key=len)[1]  # a character some hold
    cut = generate_transformers(model, tok, ps, gp(num_samples=1, max_new_tokens=12, stop=(stop,)), "fp")
    hit = [r for r in cut if r["finish_reason"] == "stop" and stop in tok.decode(r["token_ids"])]
    assert hit
    for r in hit:  # the text ends before the stop string; the ids run through it, as counted
        text = tok.decode(r["token_ids"], skip_special_tokens=True)
        assert text.startswith(r["response"]) and text.endswith(stop)
        assert len(r["token_ids"]) == r["response_tokens"]


def test_pairs_are_encoded_from_the_sampled_ids(tiny_models: Path) -> None:
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    text = {**pair(0, chosen="12", rejected="3"), "chosen_token_ids": None, "rejected_token_ids": None}
    _, chosen, rejected = encoding.encode_pair(tok, text)
    assert chosen == encoding.response_ids(tok, "12", eos=True)  # no ids recorded: the text, tokenized
    stored = {**text, "chosen_token_ids": [7, 8, 9], "rejected_token_ids": [10]}
    assert encoding.encode_pair(tok, stored)[1:] == ([7, 8, 9], [10])  # never the text's tokens
    # the pairs stage copies each side's ids from its generation
    pr = prompt(0)
    c = {**gen(pr, "t", 0, text="12"), "token_ids": [7, 8, 9], "token_logprobs": [-0.1, -0.2, -0.3]}
    r = {**gen(pr, "s", 0, text="3"), "token_ids": [10], "token_logprobs": [-1.0]}
    row = pairing.pair_row(pr, c, r)
    assert (row["chosen_token_ids"], row["rejected_token_ids"]) == ([7, 8, 9], [10])


def test_the_text_loses_sampled_special_tokens_the_ids_keep(tiny_models: Path) -> None:
    """On the character tokenizer a response's text re-tokenises into the sampled ids
    (plus the eos that ended it) unless the model sampled a special token inside it,
    which decoding drops: the random tiny model does, and those responses' text would
    train on a sequence the model never produced."""
    model = models.load_model(TOY, tiny_models / "teacher", False, "float32")
    tok = models.load_tokenizer(TOY, tiny_models / "teacher", False)
    special = {i for i in range(len(tok)) if tok.decode([i], skip_special_tokens=True) == ""}  # what decoding drops
    differ = 0
    for r in generate_transformers(model, tok, prompts(8), gp(num_samples=2, max_new_tokens=10), "fp"):
        ids = r["token_ids"]
        body = ids[:-1] if r["finish_reason"] == "stop" else ids
        retokenised = encoding.response_ids(tok, r["response"], eos=r["finish_reason"] == "stop")
        if special.isdisjoint(body):
            assert retokenised == ids
        else:
            differ += 1
            assert retokenised != ids and tok.decode(ids, skip_special_tokens=True) == r["response"]
    assert differ > 0
