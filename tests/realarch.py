"""Tiny models shaped like real ones, for tests and the real-architecture CI profile.

    python -m tests.realarch OUT_DIR      # or: tests.realarch.build(Path(OUT_DIR))

Writes into OUT_DIR (deterministic: fixed seeds, one CPU thread while it trains):

- tokenizer/  a byte-level BPE tokenizer (the `tokenizers` library: ByteLevel
  pre-tokenizer and decoder, BpeTrainer) trained on the toy task's text plus some
  accented, CJK and emoji text, so multi-byte characters are split across tokens;
  Qwen-style special tokens (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` eos) and
  a ChatML chat template with a system turn (a default system message when none is
  given, as Qwen2.5's template does).
- teacher/    Qwen2ForCausalLM (attention biases, untied head, grouped-query attention),
  SFT on the toy task rendered through the chat template; logit rows padded 64 past the
  tokenizer (left at their random init, so they are not trivially never chosen);
  generation_config with two eos ids ([<|im_end|>, <|endoftext|>]), a pad id and
  Qwen2.5-Instruct's sampling defaults (do_sample, temperature, top_p, top_k,
  repetition_penalty), which a real model folder carries.
- student/    LlamaForCausalLM (tied embeddings), smaller, shorter SFT, rows padded 16
  past the tokenizer, the same tokenizer files and eos ids.
- prompts/    a local Hugging Face dataset folder (data/train-00000-of-00001.parquet,
  columns prompt / answer / skill) that `datasets.load_dataset(folder, split="train")`
  reads: toy-task prompts and a few unicode ones (answer null). The pipeline's hf source
  (seed.source kind hf, path = the folder, split train, field prompt) carries no
  reference answer, so the answers are there for people, not for curate.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distillflow.base.config import TaskParams, ToyModelParams
from distillflow.stagekit import toymodels
from distillflow.tasks.toy import toytask
from distillflow.training import basics

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL = (ENDOFTEXT, IM_START, IM_END)
SYSTEM = "You are a helpful assistant."
VOCAB_SIZE = 600  # tokenizer size target (256 byte symbols + 3 special tokens + merges)
TEACHER_PAD_ROWS, STUDENT_PAD_ROWS = 64, 16
MAX_POSITIONS = 128

# Qwen2.5-Instruct's template without the tool branches: a system turn always (the
# default message when the conversation has none), ChatML turns, the reply opened by
# add_generation_prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '" + IM_START + "system\\n' + messages[0]['content'] + '" + IM_END + "\\n' }}"
    "{%- else %}"
    "{{- '" + IM_START + "system\\n" + SYSTEM + IM_END + "\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}"
)

# The first toy task, as profiles/smoke.yaml and profiles/realarch.yaml set it (this file
# also runs as a script, so it spells the params out instead of importing tests/builders.py).
TASK = TaskParams(
    skills=("add", "reverse", "sort", "upper"),
    max_digits=2,
    min_len=3,
    max_len=6,
    alphabet="abcdefghij",
    min_terms=6,
    max_terms=9,
    min_span=8,
    max_span=14,
    min_columns=3,
    max_columns=5,
    eval_fraction=0.1,
    sft_fraction=0.0,
)

UNICODE_TEXT = (
    "Café, naïve, façade, crème brûlée, São Paulo, Zürich, Ærøskøbing, Øresund.",
    "Écris « déjà vu » en majuscules : DÉJÀ VU.",
    "東京は日本の首都です。日本語のテキスト。",
    "你好，世界！中文文本。",
    "Ελληνικά γράμματα, русский текст, עברית.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 ❤️ 🚀",
)

# Prompts a real dataset might hold and the toy task does not.
UNICODE_PROMPTS = (
    "Write café in capitals.",
    "Reverse the word naïve.",
    "Translate 東京 into English.",
    "What does 😀 mean?",
    "Spell Zürich in upper case.",
    "Répète: déjà vu 🎉",
    "你好 means what?",
    "Count the letter ø in Ærøskøbing.",
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the chat template's words, toy prompts and
    answers, and the unicode lines (repeated a little, so some accents merge while
    emoji stay split into byte tokens)."""
    lines = [SYSTEM, "system", "user", "assistant"] * 20
    for ex in _take(toytask.examples(toytask.config_of(TASK), 12345), 2000):
        lines += [ex.prompt, ex.answer]
    lines += list(UNICODE_TEXT) * 5
    return lines


def _take(examples: Iterator[toytask.ToyExample], n: int) -> list[toytask.ToyExample]:
    return list(itertools.islice(examples, n))


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        padding_side="right",  # as Qwen2.5 ships it; the project sets the side it needs
        model_max_length=MAX_POSITIONS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _generation_config(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    gc = model.generation_config
    gc.bos_token_id = tok.pad_token_id
    gc.eos_token_id = [tok.eos_token_id, tok.pad_token_id]  # Qwen2.5: [<|im_end|>, <|endoftext|>]
    gc.pad_token_id = tok.pad_token_id
    # Qwen2.5-Instruct's sampling defaults: what a real folder brings along.
    gc.do_sample = True
    gc.temperature = 0.7
    gc.top_p = 0.8
    gc.top_k = 20
    gc.repetition_penalty = 1.05


def _sft(model: torch.nn.Module, tok: PreTrainedTokenizerFast, mp: ToyModelParams, seed: int) -> float:
    """bootstrap's SFT (answer tokens + eos through the chat template), then the padded
    output rows put back to their random init (the optimizer pushes never-seen rows down)."""
    head = model.get_output_embeddings().weight
    v = len(tok)
    init = head.detach()[v:].clone()
    losses, _ = toymodels.train_toy(
        model,
        tok,
        toymodels.training_examples(TASK, seed, "teacher"),
        mp,
        "realarch sft",
        seed=seed,
        alphabet=TASK.alphabet,
        heldout=toymodels.heldout_examples(TASK, seed, 8),
        eval_every=mp.steps,
        packing=True,
    )
    with torch.no_grad():
        head[v:] = init
    return sum(losses[-10:]) / 10


def build_teacher(tok: PreTrainedTokenizerFast) -> tuple[Qwen2ForCausalLM, float]:
    mp = ToyModelParams(
        hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, steps=200, batch_size=32, lr=0.01,
        warmup_steps=10, examples=0, corrupt_share=0.0,
    )  # fmt: skip
    config = Qwen2Config(
        vocab_size=len(tok) + TEACHER_PAD_ROWS,
        hidden_size=mp.hidden_size,
        intermediate_size=mp.intermediate_size,
        num_hidden_layers=mp.num_layers,
        num_attention_heads=mp.num_heads,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(10)
    model = Qwen2ForCausalLM(config)
    loss = _sft(model, tok, mp, seed=10)
    _generation_config(model, tok)
    return model, loss


def build_student(tok: PreTrainedTokenizerFast) -> tuple[LlamaForCausalLM, float]:
    mp = ToyModelParams(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=60, batch_size=32, lr=0.01,
        warmup_steps=5, examples=0, corrupt_share=0.0,
    )  # fmt: skip
    config = LlamaConfig(
        vocab_size=len(tok) + STUDENT_PAD_ROWS,
        hidden_size=mp.hidden_size,
        intermediate_size=mp.intermediate_size,
        num_hidden_layers=mp.num_layers,
        num_attention_heads=mp.num_heads,
        num_key_value_heads=mp.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(11)
    model = LlamaForCausalLM(config)
    loss = _sft(model, tok, mp, seed=11)
    _generation_config(model, tok)
    return model, loss


def write_prompts(folder: Path, n: int = 200) -> Path:
    """A local HF dataset folder: data/train-00000-of-00001.parquet (prompt, answer, skill)."""
    exs = _take(toytask.examples(toytask.config_of(TASK), 777), n)
    rows = [{"prompt": e.prompt, "answer": e.answer, "skill": e.skill} for e in exs]
    rows += [{"prompt": p, "answer": None, "skill": None} for p in UNICODE_PROMPTS]
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string()), ("skill", pa.string())])
    path = folder / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def load_as_qwen2(tok: PreTrainedTokenizerFast, folder: Path) -> PreTrainedTokenizerFast:
    """Save the tokenizer with `tokenizer_class: Qwen2Tokenizer` (as Qwen2.5 folders ship
    it) and load it back, so both models train with, and save, the tokenizer that loads.

    Without the class name, transformers picks the class from each folder's config.json:
    the same tokenizer files then load as Qwen2Tokenizer (its own NFC normalizer and split
    regex) beside the Qwen2 teacher and as a plain byte-level tokenizer beside the Llama
    student, two different tokenizers, which the pre-flight gate refuses."""
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"tokenizer_class": "Qwen2Tokenizer"}, indent=2))
    return AutoTokenizer.from_pretrained(folder)


def build(root: Path) -> dict[str, Path]:
    """Write tokenizer/, teacher/, student/ and prompts/ under `root`; their paths."""
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions, hence the same bytes, on every machine
    try:
        tok = load_as_qwen2(build_tokenizer(), root / "tokenizer")
        teacher, _ = build_teacher(tok)
        basics.save_model(teacher, tok, root / "teacher")
        student, _ = build_student(tok)
        basics.save_model(student, tok, root / "student")
    finally:
        torch.set_num_threads(threads)
    write_prompts(root / "prompts")
    return {name: root / name for name in ("tokenizer", "teacher", "student", "prompts")}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.realarch OUT_DIR")
    t0 = time.perf_counter()
    paths = build(Path(argv[0]))
    print(f"built in {time.perf_counter() - t0:.1f}s:", {k: str(v) for k, v in paths.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
