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
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stages.lib.data.io import digest_path

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


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: `toy`, a local folder, or a hub id at a revision."""

    name: str
    revision: str | None


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
    tok = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Decoder-only models often ship without a pad token; eos is the usual stand-in.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(
            f"model {where!r}: the tokenizer has no chat template; distillflow renders every prompt through one"
        )
    return tok


def load_model(ref: ModelRef, toy_dir: Path, trust_remote_code: bool, dtype: str) -> torch.nn.Module:
    where, revision = resolve(ref, toy_dir)
    model = AutoModelForCausalLM.from_pretrained(
        where,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=getattr(torch, dtype),
    )
    model.eval()
    return model


def model_fingerprint(ref: ModelRef, toy_dir: Path) -> str:
    """A stable identity for a model, used in generation ids and lineage.

    Local folders (the toy models included) are fingerprinted by the digest of their
    config and weights; hub models by id and revision (the weights are not local).
    """
    where, revision = resolve(ref, toy_dir)
    path = Path(where)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
        if not any(p.suffix == ".safetensors" for p in files):
            raise ValueError(f"model folder {path}: no .safetensors weights; distillflow loads only safetensors")
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(digest_path(p).encode())
        return f"sha256:{h.hexdigest()[:32]}"
    if revision is None:
        raise ValueError(
            f"model {where!r} is not a local folder, so it needs a pinned `revision` (a commit hash or tag)"
        )
    return f"hub:{where}@{revision}"


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
    if tok_s.get_vocab() != tok_t.get_vocab():
        raise ValueError(
            "models: the student and teacher tokenizers differ; token-level distillation needs a shared tokenizer "
            "(pick models of one family)"
        )
    v = len(tok_s)
    if v_student < v or v_teacher < v:
        raise ValueError(
            f"models: logit widths (student {v_student}, teacher {v_teacher}) are smaller than the tokenizer ({v} "
            "tokens)"
        )
    return v
