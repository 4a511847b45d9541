"""bootstrap: build the embedded default's models, or fingerprint real ones.

    python -m stages.bootstrap --params params.yaml --identity data/identity.json --out data/bootstrap \
        --metrics metrics/bootstrap.json

With `models.teacher.name: toy` and `models.student.name: toy` it builds a character
tokenizer (the `tokenizers` library, saved as a transformers tokenizer folder with a
chat template) and trains two Llama models on the toy task's training split with
supervised fine-tuning on ground-truth answers: a teacher trained long enough to know
the task, and a smaller student trained briefly, so it starts weak (the paper's "SFT
student"). Both are saved with save_pretrained (safetensors) in out/teacher and
out/student.

With real models (a local folder or a hub id at a revision) it trains nothing.

Either way it is the pre-flight gate (models.preflight), the first stage that sees
both models: one tokenizer (vocabulary, merges and special tokens digest; different
tokenizers are refused while `models.cross_tokenizer` is none), a chat template, eos
and pad ids, logit widths covering the tokenizer (each may be padded past it, by
different amounts), safetensors weights. A refusal stops the run here, before any
generation, with `error:` and exit 2 naming both models and what differs. The findings
(fingerprints, widths, eos ids, max positions, ...) go into the manifest. --identity is
the identify stage's file (stages/identify.py): through it DVC reruns bootstrap, and
all that depends on it, when a local model folder changes in place.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.lib.audit import lineage
from stages.lib.core import entry, models, params
from stages.lib.core.config import ModelsParams, TaskParams
from stages.lib.core.errors import ModelError
from stages.lib.core.params import check
from stages.lib.data import encoding, records
from stages.lib.data.io import atomic_dir, write_json
from stages.lib.task import toytask
from stages.lib.training import basics

log = logging.getLogger("bootstrap")


@dataclass(frozen=True, kw_only=True)
class ToyModelParams:
    """One toy model's size and its SFT budget."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int

    def __post_init__(self) -> None:
        check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        check(self.steps >= 1 and self.batch_size >= 1, "steps", "steps and batch_size must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")

    def arch(self) -> models.ToyArch:
        return models.ToyArch(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size)


@dataclass(frozen=True)
class BootstrapParams:
    """params.yaml `bootstrap`."""

    seed: int
    max_positions: int
    teacher: ToyModelParams
    student: ToyModelParams


SECTIONS: dict[str, type] = {"models": ModelsParams, "task": TaskParams, "bootstrap": BootstrapParams}
PARAMS = tuple(SECTIONS)


def training_examples(task: TaskParams, seed: int) -> Iterator[toytask.ToyExample]:
    """The toy stream restricted to the train split: eval prompts are never seen."""
    for ex in toytask.examples(task.toy(), seed):
        if records.split_of(records.prompt_id(records.normalise_prompt(ex.prompt)), task.eval_fraction) == "train":
            yield ex


def train_toy(
    model: torch.nn.Module, tok: Any, examples: Iterator[toytask.ToyExample], p: ToyModelParams, desc: str
) -> list[float]:
    """Supervised fine-tuning on (prompt, answer): token NLL on the answer only."""
    opt, sched = basics.optimizer_and_schedule(model, p.lr, p.warmup_steps, p.steps)
    model.train()
    losses = []
    for _ in tqdm(range(p.steps), desc=desc, unit="step", mininterval=5.0):
        batch = list(itertools.islice(examples, p.batch_size))
        b = encoding.collate(
            [(encoding.prompt_ids(tok, e.prompt), encoding.response_ids(tok, e.answer, eos=True)) for e in batch],
            tok.pad_token_id,
        )
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
        loss = F.cross_entropy(logits[b.response_mask], b.targets[b.response_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(models_p: ModelsParams, task: TaskParams, p: BootstrapParams, out: Path) -> dict[str, Any]:
    """Build the toy models into `out` (nothing for real models); returns metrics.

    Real models are only described (fingerprint, architecture), in the manifest.
    """
    toy = [m.name == "toy" for m in (models_p.teacher, models_p.student)]
    if any(toy) and not all(toy):
        raise ModelError(
            "models: teacher and student must both be `toy` or both be real models; the toy tokenizer fits nothing else"
        )
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    if all(toy):
        tok = models.build_char_tokenizer()
        for role, mp, seed_offset in (("teacher", p.teacher, 0), ("student", p.student, 1)):
            seed = p.seed * 100 + seed_offset
            model = models.build_toy_model(mp.arch(), len(tok), tok, seed, p.max_positions)
            t0 = time.perf_counter()
            # Teacher and student see different draws of the same training split.
            losses = train_toy(model, tok, training_examples(task, seed), mp, desc=f"train toy {role}")
            log.info(
                "%s: %d parameters, %d steps in %.1fs, final loss %.4f",
                role,
                basics.count_parameters(model),
                mp.steps,
                time.perf_counter() - t0,
                losses[-1],
            )
            basics.save_model(model, tok, out / role)
            metrics[role] = {
                "parameters": basics.count_parameters(model),
                "steps": mp.steps,
                "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            }
    return metrics


def main() -> None:
    args = entry.parse_paths(__doc__, "identity", "out", "metrics")
    sections = params.load_sections(args.params, SECTIONS)
    with atomic_dir(args.out) as tmp:
        m: ModelsParams = sections["models"]
        metrics = run(m, sections["task"], sections["bootstrap"], tmp)
        # The pre-flight gate, before any stage generates: its findings go into the manifest.
        gate = models.preflight(m.teacher.ref(), m.student.ref(), tmp, m.trust_remote_code, m.cross_tokenizer)
        lineage.write_manifest(
            tmp,
            "bootstrap",
            sections,
            inputs={"identity": args.identity},
            outputs={},
            counts={},
            extra={"models": gate},
        )
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    entry.run_stage(main)
