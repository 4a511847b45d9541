"""train: distil the teacher into the student on the curated pairs.

    python -m stages.train --params params.yaml --pairs data/curate --models data/bootstrap \
        --out data/train --metrics metrics/train.json --plot plots/train.csv

The objective is DistiLLM-2's contrastive loss (../shared/design/METHOD.md), per pair i:

    L_i = (1 - beta) * SKL_seq(chosen_i; alpha) + beta * SRKL_seq(rejected_i; alpha)

skew forward KL on the teacher's response (chosen), skew reverse KL on the student's
response (rejected), each a mean over the response's tokens, then a mean over pairs
(`reduction: sequence_mean`; `token_mean` pools all tokens of the batch instead).
beta follows a linear ramp (see `beta_at`), logged every step with the loss parts.
The distilled student is saved with save_pretrained (safetensors) in out/model.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from stages.lib import cli, encoding, lineage, losses, models, params, records, training
from stages.lib.config import Dtype, ModelParams
from stages.lib.io import atomic_dir, atomic_path, read_rows, write_json
from stages.lib.params import check

log = logging.getLogger("train")


@dataclass(frozen=True)
class TrainParams:
    """params.yaml `train`."""

    method: Literal["distillm2"]
    seed: int
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    max_grad_norm: float
    alpha: float  # skew of both divergences (DistiLLM-2's alpha_0 = 0.1)
    beta_start: float  # beta weighs the student-response (SRKL) term
    beta_end: float
    beta_ramp_start: float  # fraction of training where the linear ramp begins
    beta_ramp_end: float  # ... and where it reaches beta_end (then holds)
    reduction: Literal["sequence_mean", "token_mean"]
    detach_mixture_student: bool  # official DistiLLM-2 code: true; DistiLLM v1: false

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")
        check(0.0 <= self.beta_start <= 1.0 and 0.0 <= self.beta_end <= 1.0, "beta_start", "beta_start and beta_end must be in [0, 1]")
        check(0.0 <= self.beta_ramp_start <= self.beta_ramp_end <= 1.0, "beta_ramp_start", "need 0 <= beta_ramp_start <= beta_ramp_end <= 1")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "train": TrainParams,
}
PARAMS = tuple(SECTIONS)


def beta_at(step: int, total: int, p: TrainParams) -> float:
    """beta at `step` of `total`: beta_start until the ramp, linear, then beta_end.

    The paper's single-round schedule clip(tau/T, 0.5, 1) is start 0.5, end 1.0,
    ramp 0.5 -> 1.0; the official code's is start 0.5, end 0.75, ramp 0.0 -> 0.5.
    """
    frac = step / max(1, total - 1)
    if frac <= p.beta_ramp_start or p.beta_ramp_end == p.beta_ramp_start:
        return p.beta_start if frac <= p.beta_ramp_start else p.beta_end
    if frac >= p.beta_ramp_end:
        return p.beta_end
    x = (frac - p.beta_ramp_start) / (p.beta_ramp_end - p.beta_ramp_start)
    return p.beta_start + x * (p.beta_end - p.beta_start)


def encode_pairs(tok: Any, pairs: list[dict[str, Any]]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per pair; eos only where the model stopped."""
    out = []
    for pr in pairs:
        p_ids = encoding.prompt_ids(tok, pr["prompt"])
        c_ids = encoding.response_ids(tok, pr["chosen"], eos=pr["chosen_finish_reason"] == "stop")
        r_ids = encoding.response_ids(tok, pr["rejected"], eos=pr["rejected_finish_reason"] == "stop")
        out.append((p_ids, c_ids, r_ids))
    return out


def distillm2_loss(student: torch.nn.Module, teacher: torch.nn.Module, chosen: encoding.Batch, rejected: encoding.Batch, vocab: int, beta: float, p: TrainParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The DistiLLM-2 loss of one batch of pairs, and its parts for logging."""
    parts = {}
    for name, batch in (("skl", chosen), ("srkl", rejected)):
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab]  # (B, T, V)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab]
        if name == "skl":
            parts[name] = losses.skew_forward_kl(s_logits, t_logits, batch.response_mask, p.alpha, reduction=p.reduction)
        else:
            parts[name] = losses.skew_reverse_kl(s_logits, t_logits, batch.response_mask, p.alpha, reduction=p.reduction, detach_mixture_student=p.detach_mixture_student)
    loss = (1.0 - beta) * parts["skl"] + beta * parts["srkl"]
    return loss, {k: v.item() for k, v in parts.items()}


def run(student: torch.nn.Module, teacher: torch.nn.Module, tok_s: Any, tok_t: Any, pairs: list[dict[str, Any]], p: TrainParams) -> list[dict[str, float]]:
    """Train `student` in place; returns one log row per optimizer step."""
    vocab = models.check_vocabularies(tok_s, tok_t, student.config.vocab_size, teacher.config.vocab_size)
    encoded = encode_pairs(tok_s, pairs)
    steps_per_epoch = (len(encoded) + p.batch_size - 1) // p.batch_size
    total = steps_per_epoch * p.epochs
    training.seed_everything(p.seed)
    opt, sched = training.optimizer_and_schedule(student, p.lr, p.warmup_steps, total)
    rng = random.Random(p.seed)
    student.train()
    teacher.eval()
    log_rows = []
    bar = tqdm(total=total, desc="train distillm2", unit="step", mininterval=5.0)
    step = 0
    for epoch in range(p.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), p.batch_size):
            idx = order[start : start + p.batch_size]
            chosen = encoding.collate([(encoded[i][0], encoded[i][1]) for i in idx], tok_s.pad_token_id)
            rejected = encoding.collate([(encoded[i][0], encoded[i][2]) for i in idx], tok_s.pad_token_id)
            beta = beta_at(step, total, p)
            loss, parts = distillm2_loss(student, teacher, chosen, rejected, vocab, beta, p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), p.max_grad_norm)
            opt.step()
            sched.step()
            log_rows.append({"step": step, "epoch": epoch, "loss": loss.item(), **parts, "beta": beta, "alpha": p.alpha, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm.item()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", beta=f"{beta:.3f}")
    bar.close()
    student.eval()
    return log_rows


def write_plot(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})


def main() -> None:
    args = cli.parse_paths(__doc__, "pairs", "models", "out", "metrics", "plot")
    used = params.load_sections(args.params, SECTIONS)
    p: TrainParams = used["train"]
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    src = args.pairs / "curated.parquet"
    pairs = read_rows(src, records.PAIR_SCHEMA)
    student = models.load_model(s_ref, args.models / "student", trust, dtype)
    teacher = models.load_model(t_ref, args.models / "teacher", trust, dtype)
    tok_s = models.load_tokenizer(s_ref, args.models / "student", trust)
    tok_t = models.load_tokenizer(t_ref, args.models / "teacher", trust)
    t0 = time.perf_counter()
    rows = run(student, teacher, tok_s, tok_t, pairs, p)
    log.info("train: %d steps on %d pairs in %.1fs, final loss %.4f", len(rows), len(pairs), time.perf_counter() - t0, rows[-1]["loss"])
    tail = rows[-min(10, len(rows)) :]
    metrics = {
        "pairs": len(pairs),
        "steps": len(rows),
        "final_loss": round(sum(r["loss"] for r in tail) / len(tail), 6),
        "final_beta": round(rows[-1]["beta"], 6),
    }
    with atomic_dir(args.out) as tmp:
        training.save_model(student, tok_s, tmp / "model")
        lineage.write_manifest(
            tmp, "train", used,
            inputs={"pairs": src, "student": args.models / "student" if s_ref.name == "toy" else args.models / "manifest.json",
                    "teacher": args.models / "teacher" if t_ref.name == "toy" else args.models / "manifest.json"},
            outputs={},
            counts=metrics,
            extra={"initial_student": models.describe(s_ref, args.models / "student"), "teacher": models.describe(t_ref, args.models / "teacher")},
        )
    write_plot(args.plot, rows)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
