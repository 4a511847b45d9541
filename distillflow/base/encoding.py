"""Turning (prompt, response) text into token ids the same way in every stage.

The prompt is rendered through the tokenizer's chat template with the generation
prompt opened; the response is the tokens the engine sampled, where its record keeps
them, else the reply's tokens followed by the eos token when the reply ended (a
response cut off at max_new_tokens gets none). Train,
generation and evaluation all call these two functions, so a model is trained on
exactly the token sequence it is later asked to continue. Batches: right-padded for
training (`collate`), left-padded for `generate` (`left_pad`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def response_ids(tok: PreTrainedTokenizerBase, response: str, eos: bool) -> list[int]:
    """The reply's tokens, plus eos when the reply ended there (not when truncated)."""
    ids = tok(response, add_special_tokens=False)["input_ids"]
    return [*ids, tok.eos_token_id] if eos else ids


def encode_pair(tok: PreTrainedTokenizerBase, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of a preference pair: each response's
    sampled token ids where its generation recorded them (`chosen_token_ids`,
    `rejected_token_ids`: through the eos or stop string that ended it), else its text
    tokenized, eos only where the model stopped. Train and score both call this, so
    their positions line up."""
    return prompt_ids(tok, pair["prompt"]), _response(tok, pair, "chosen"), _response(tok, pair, "rejected")


def _response(tok: PreTrainedTokenizerBase, pair: dict, side: str) -> list[int]:
    stored = pair[f"{side}_token_ids"]
    if stored is not None:
        return list(stored)
    return response_ids(tok, pair[side], eos=pair[f"{side}_finish_reason"] == "stop")


@dataclass(frozen=True)
class Batch:
    """A right-padded training batch.

    input_ids (B, T); attention_mask (B, T); response_mask (B, T) is True at positions
    whose *next* token is a response token, i.e. where the logits are scored; targets
    (B, T) holds that next token (pad elsewhere).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    targets: torch.Tensor


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Build a Batch from (prompt_ids, response_ids) pairs."""
    width = max(len(p) + len(r) for p, r in sequences)
    B = len(sequences)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    scored = torch.zeros((B, width), dtype=torch.bool)
    targets = torch.full((B, width), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(sequences):
        ids = p + r
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        # logits at position t predict token t+1: response tokens sit at len(p)..len(ids)-1
        scored[i, len(p) - 1 : len(ids) - 1] = True
        targets[i, : len(ids) - 1] = torch.tensor(ids[1:])
    return Batch(input_ids, attention, scored, targets)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch for `generate`: (input_ids, attention_mask), both (B, T) long with
    T the longest sequence; each row's ids end at column T, where generation continues them."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention
