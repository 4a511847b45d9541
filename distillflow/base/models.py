"""Model and tokenizer handling: the toy builders, strict loading, fingerprints.

A model reference (params.yaml `models.teacher` / `models.student`) is either
`name: toy` (built by the bootstrap stage into its output folder), a local folder,
or a hub id with a revision. Loading always asks for safetensors weights and never
trusts remote code unless `models.trust_remote_code` says so.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from distillflow.base import identity
from distillflow.base.errors import ModelError
from distillflow.base.identity import ModelRef

PAD, UNK, USER, ASSISTANT, END = "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, UNK, USER, ASSISTANT, END)

# Jinja chat template in the Hub's format; `add_generation_prompt` opens the reply.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + END + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# Every printable ASCII character but tabs and newlines: the toy task needs no more.
CHARSET = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer made with the `tokenizers` library.

    BPE with no merges splits text into characters; the Fuse decoder joins them back
    without spaces. Wrapped as an ordinary transformers tokenizer with a chat template.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARSET])}
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        bos_token=None,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class ToyArch:
    """Size of a toy Llama model (params.yaml `bootstrap.teacher` / `bootstrap.student`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


def build_toy_model(
    arch: ToyArch, vocab_size: int, tok: PreTrainedTokenizerFast, seed: int, max_positions: int
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size (deterministic in `seed`)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def resolve(ref: ModelRef, toy_dir: Path) -> tuple[str, str | None]:
    """(path or hub id, revision) to hand to `from_pretrained`."""
    if ref.name == "toy":
        return str(toy_dir), None
    return ref.name, ref.revision


def lineage_input(ref: ModelRef, bootstrap_dir: Path, role: str) -> Path:
    """The file that identifies a model among a stage's inputs: the toy model's folder,
    or bootstrap's manifest, which holds a real model's fingerprint."""
    return bootstrap_dir / role if ref.name == "toy" else bootstrap_dir / "manifest.json"


def load_tokenizer(ref: ModelRef, toy_dir: Path, trust_remote_code: bool) -> PreTrainedTokenizerFast:
    where, revision = resolve(ref, toy_dir)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {where!r}: cannot load its tokenizer ({exc})") from exc
    if tok.pad_token_id is None:
        # Decoder-only models often ship without a pad token; eos is the usual stand-in.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ModelError(
            f"model {where!r}: the tokenizer has no chat template; distillflow renders every prompt through one "
            "(set `tokenizer.chat_template` and save the tokenizer into the model folder)"
        )
    return tok


def load_model(ref: ModelRef, toy_dir: Path, trust_remote_code: bool, dtype: str) -> torch.nn.Module:
    where, revision = resolve(ref, toy_dir)
    if Path(where).is_dir():
        identity.weights_kind(Path(where))  # refuses pickle-only folders before transformers reads them
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=getattr(torch, dtype),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {where!r}: cannot load it as a causal LM with safetensors weights ({exc})") from exc
    model.eval()
    return model


def model_fingerprint(ref: ModelRef, toy_dir: Path) -> str:
    """A stable identity for a model, used in generation ids and lineage (identity.fingerprint)."""
    return identity.fingerprint(*resolve(ref, toy_dir))


def tokenizer_digest(tok: Any) -> str:
    """The identity of a tokenizer's mapping from text to ids: vocabulary, merges,
    added and special tokens, normalizer, pre-tokenizer and decoder (not its padding or
    truncation settings, nor the chat template, which is recorded on its own)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")}
    keep["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    return "sha256:" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:32]


def end_ids(tok: Any, generation_config: Any) -> list[int]:
    """Every token id that ends a response: the tokenizer's eos and generation_config's."""
    ids = set() if tok.eos_token_id is None else {tok.eos_token_id}
    configured = None if generation_config is None else generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    return sorted(ids)


def inspect(ref: ModelRef, toy_dir: Path, trust_remote_code: bool, role: str) -> tuple[dict[str, Any], Any]:
    """(what the pre-flight gate records of a model, its tokenizer): read from config,
    generation_config and tokenizer only, never the weights."""
    where, revision = resolve(ref, toy_dir)
    tok = load_tokenizer(ref, toy_dir, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"models.{role} {where!r}: cannot read its config ({exc})") from exc
    try:
        gen = GenerationConfig.from_pretrained(where, revision=revision)
    except OSError:
        # No generation_config.json: transformers derives one from config (its eos id).
        gen = GenerationConfig.from_model_config(config)
    text_config = config.get_text_config()
    info: dict[str, Any] = {
        "name": ref.name,
        "revision": revision,
        "fingerprint": model_fingerprint(ref, toy_dir),
        "architectures": list(config.architectures or []),
        "weights": identity.weights_kind(Path(where)) if Path(where).is_dir() else "hub (safetensors required at load)",
        "logit_width": int(text_config.vocab_size),
        "tokenizer_length": len(tok),
        "tokenizer_digest": tokenizer_digest(tok),
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest()[:32],
        "eos_token_ids": end_ids(tok, gen),
        "pad_token_id": tok.pad_token_id,
        "max_positions": getattr(text_config, "max_position_embeddings", None),
    }
    return info, tok


CROSS_TOKENIZER = ("none",)  # methods that distil across tokenizers; a later release adds some


def preflight(
    teacher: ModelRef,
    student: ModelRef,
    bootstrap_dir: Path,
    trust_remote_code: bool,
    cross_tokenizer: str,
    teacher_role: str = "teacher",
) -> dict[str, Any]:
    """The pre-flight compatibility gate: both models' identity and the properties
    token-level distillation needs of them (one tokenizer, a chat template, eos and pad
    ids inside it, logit widths covering it). Returns the findings (bootstrap's
    manifest records them); raises ModelError naming both models and every
    difference. Max positions are checked where the prompts and budgets are known
    (check_positions). `teacher_role`: the teacher's folder under `bootstrap_dir` (a
    toy teacher past the first of models.teachers: base/teachers.py)."""
    infos, toks = {}, {}
    for role, ref, folder in (("teacher", teacher, teacher_role), ("student", student, "student")):
        infos[role], toks[role] = inspect(ref, bootstrap_dir / folder, trust_remote_code, role)
    t, s = infos["teacher"], infos["student"]
    names = f"teacher {t['name']!r} and student {s['name']!r}"
    problems: list[str] = []
    shared = t["tokenizer_digest"] == s["tokenizer_digest"]
    if not shared:
        if cross_tokenizer == "none":
            problems.append(
                f"the tokenizers differ ({tokenizer_difference(toks['teacher'], toks['student'])}); token-level "
                "distillation needs one tokenizer: pick models of one family (models.cross_tokenizer: none; no "
                "cross-tokenizer method exists yet)"
            )
    vocab = min(t["tokenizer_length"], s["tokenizer_length"])
    for role, info in infos.items():
        if info["logit_width"] < info["tokenizer_length"]:
            problems.append(
                f"{role}: {info['logit_width']} logit rows (config vocab_size) are fewer than its tokenizer's "
                f"{info['tokenizer_length']} tokens"
            )
        if not info["eos_token_ids"]:
            problems.append(f"{role}: no eos token (tokenizer eos_token and generation_config eos_token_id unset)")
        bad = [i for i in [*info["eos_token_ids"], info["pad_token_id"]] if i is not None and i >= vocab]
        if bad:
            problems.append(f"{role}: eos/pad ids {bad} are outside the shared tokenizer ({vocab} tokens)")
        if info["pad_token_id"] is None:
            problems.append(f"{role}: no pad token and no eos token to stand in for it")
    if problems:
        raise ModelError(f"models: {names} cannot be distilled as configured: " + "; ".join(problems))
    return {
        "teacher": t,
        "student": s,
        "shared_tokenizer": shared,
        "vocab": vocab,
        "chat_templates_equal": t["chat_template_sha256"] == s["chat_template_sha256"],
        "cross_tokenizer": cross_tokenizer,
    }


def tokenizer_difference(a: Any, b: Any) -> str:
    """How two tokenizers differ, in words, for the gate's message."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
    if diff:
        return f"vocabularies differ, e.g. {diff[0][0]!r} at id {diff[0][1]}"
    if a.special_tokens_map != b.special_tokens_map:
        return f"special tokens differ ({a.special_tokens_map} vs {b.special_tokens_map})"
    return "same vocabulary, different merges, normalizer or pre-tokenizer"


def max_positions(model: torch.nn.Module) -> int | None:
    """A loaded model's context length (config max_position_embeddings); None if it has none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def config_max_positions(ref: ModelRef, toy_dir: Path, trust_remote_code: bool) -> int | None:
    """The context length from a model's config alone (no weights loaded)."""
    where, revision = resolve(ref, toy_dir)
    try:
        config = AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {where!r}: cannot read its config ({exc})") from exc
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def check_positions(limit: int | None, name: str, longest_prompt: int, budget: int, budget_key: str) -> None:
    """Refuse to start when the longest prompt plus `budget` new tokens (`budget_key`,
    e.g. teacher.max_new_tokens) does not fit a model's max positions `limit` (None: the
    model declares no limit)."""
    if limit is not None and longest_prompt + budget > limit:
        raise ModelError(
            f"{name}: max positions {limit} < the longest prompt ({longest_prompt} tokens) + {budget_key} "
            f"({budget}); lower {budget_key}, shorten the prompts (seed.max_prompt_chars) or use a model with a "
            "longer context"
        )


def lm_head(model: torch.nn.Module, vocab: int, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer's weight and bias cut to the tokenizer's `vocab` rows (rows past
    it are padding): logits = hidden @ W.T + b. Refuses a head that is not a Linear layer
    or has fewer rows than the tokenizer."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(
            f"models.{role}: output layer is {type(head).__name__}, not a Linear head; "
            "distillflow computes logits as hidden @ W.T"
        )
    if head.weight.shape[0] < vocab:
        raise ModelError(
            f"models.{role}: the LM head has {head.weight.shape[0]} rows, fewer than the tokenizer's {vocab} tokens"
        )
    return head.weight[:vocab], (head.bias[:vocab] if head.bias is not None else None)


@torch.no_grad()
def check_plain_head(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor, role: str) -> None:
    """Refuse a model whose logits are not its output layer applied to the final hidden
    state (logit soft-capping, scaling): train, score and evaluate compute logits that
    way, from hidden states, without (B, T, V) tensors. One batch (a sequence is enough)
    through the full model, compared with the head path."""
    full = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    hidden = model.base_model(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mine = model.get_output_embeddings()(hidden)
    if not torch.allclose(full.float(), mine.float(), atol=1e-4, rtol=1e-4):
        raise ModelError(
            f"models.{role}: logits are not the LM head applied to the final hidden state "
            "(soft-capping or scaling?); this model is not supported"
        )


def describe(ref: ModelRef, toy_dir: Path) -> dict[str, Any]:
    """Identity and size of a model folder, for lineage manifests."""
    where, revision = resolve(ref, toy_dir)
    info: dict[str, Any] = {"name": ref.name, "revision": revision, "fingerprint": model_fingerprint(ref, toy_dir)}
    config = Path(where) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        info["architectures"] = cfg["architectures"]
        info["vocab_size"] = cfg["vocab_size"]
    return info


def check_vocabularies(tok_s: Any, tok_t: Any, v_student: int, v_teacher: int) -> int:
    """The shared vocabulary width both models' logits are cut to.

    Models of one family may pad their output layer to different widths (151,936 vs
    152,064 for Qwen2.5 sizes); the tokens that exist are the tokenizer's. Really
    different tokenizers cannot be distilled token by token: fail clearly.
    """
    if tokenizer_digest(tok_s) != tokenizer_digest(tok_t):
        raise ModelError(
            "models: the student and teacher tokenizers differ "
            f"({tokenizer_difference(tok_t, tok_s)}); token-level distillation needs a shared tokenizer "
            "(pick models of one family)"
        )
    v = len(tok_s)
    if v_student < v or v_teacher < v:
        raise ModelError(
            f"models: logit widths (student {v_student}, teacher {v_teacher}) are smaller than the tokenizer ({v} "
            "tokens)"
        )
    return v


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name a model's forward takes its KV cache by (`cache` in newer transformers 5
    releases, `past_key_values` before); its output holds the cache under the same name."""
    return "cache" if "cache" in signature(model.forward).parameters else "past_key_values"


def stop_ids(model: Any, tok: Any) -> set[int]:
    """Every token id that ends a response: the tokenizer's eos and the model's."""
    ids = {tok.eos_token_id}
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    return ids
