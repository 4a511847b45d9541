"""evaluate: teacher, initial student and distilled student on the held-out prompts.

    python -m stages.evaluate --params params.yaml --prompts data/seed --models data/bootstrap \
        --trained data/train --out data/evaluate --metrics metrics/evaluate.json

For each model, responses to every eval prompt (greedy unless `evaluate.temperature`
says otherwise) and, where prompts carry reference answers (the toy task), exact-match
accuracy overall and per skill. For both students, the token-level KL(teacher ||
student) on the teacher's held-out responses. The eval prompts come from
data/seed/eval.parquet, which is disjoint from every training prompt (checked here
against data/seed/train.parquet again, not assumed).

Outputs: predictions.parquet (one row per model and prompt, with correctness),
manifest.json, and the metrics file (DVC metrics).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from stages.lib import cli, encoding, lineage, losses, models, params, records, toytask
from stages.lib.config import Dtype, GenerationParams, ModelParams
from stages.lib.generation import generate_transformers
from stages.lib.io import DataError, atomic_dir, read_rows, write_json, write_table
from stages.lib.params import check

log = logging.getLogger("evaluate")

PREDICTION_SCHEMA = records.schema(
    "prediction",
    [
        pa.field("model", pa.string(), nullable=False),  # teacher | student_initial | student_distilled
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("response", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=True),  # null where there is no reference
    ],
)


@dataclass(frozen=True)
class EvaluateParams:
    """params.yaml `evaluate`."""

    batch_size: int
    max_new_tokens: int
    temperature: float  # 0 = greedy (the default for accuracy)
    seed: int

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")

    def generation(self) -> GenerationParams:
        return GenerationParams("transformers", self.batch_size, self.max_new_tokens, self.temperature, 1.0, 1, self.seed, 1)


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "evaluate": EvaluateParams,
}
PARAMS = tuple(SECTIONS)


def accuracy(prompts: list[dict[str, Any]], gens: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Exact match overall and per category; None when no prompt has a reference."""
    if all(pr["reference"] is None for pr in prompts):
        return None
    per: dict[str, list[bool]] = defaultdict(list)
    for pr, g in zip(prompts, gens, strict=True):
        if pr["reference"] is not None:
            per[pr["category"] or "all"].append(toytask.is_correct(g["response"], pr["reference"]))
    flat = [c for v in per.values() for c in v]
    return {"exact_match": round(sum(flat) / len(flat), 4), "per_category": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}, "n": len(flat)}


@torch.no_grad()
def kl_on_responses(teacher: torch.nn.Module, student: torch.nn.Module, tok: Any, prompts: list[dict[str, Any]], responses: list[dict[str, Any]], vocab: int, batch_size: int) -> float:
    """Token-mean KL(teacher || student) over the teacher's held-out response tokens."""
    total, tokens = 0.0, 0
    seqs = [(encoding.prompt_ids(tok, pr["prompt"]), encoding.response_ids(tok, g["response"], eos=g["finish_reason"] == "stop")) for pr, g in zip(prompts, responses, strict=True)]
    for s in range(0, len(seqs), batch_size):
        b = encoding.collate(seqs[s : s + batch_size], tok.pad_token_id)
        t_logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
        s_logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[..., :vocab]
        n = int(b.response_mask.sum())
        if n:
            total += losses.forward_kl(s_logits, t_logits, b.response_mask, reduction="token_mean").item() * n
            tokens += n
    if tokens == 0:
        raise ValueError("evaluate: the teacher's eval responses have no tokens to score KL on (every response empty and truncated); raise evaluate.max_new_tokens or check the teacher")
    return total / tokens


def run(loaded: dict[str, tuple[torch.nn.Module, Any, str]], prompts: list[dict[str, Any]], p: EvaluateParams) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`loaded` maps teacher / student_initial / student_distilled to (model, tokenizer, fingerprint)."""
    gen_p = p.generation()
    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    responses: dict[str, list[dict[str, Any]]] = {}
    for name, (model, tok, fp) in loaded.items():
        gens = generate_transformers(model, tok, prompts, gen_p, fp, desc=f"evaluate {name}")
        responses[name] = gens
        acc = accuracy(prompts, gens)
        metrics[name] = {"accuracy": acc} if acc is not None else {}
        metrics[name]["mean_response_tokens"] = round(sum(g["response_tokens"] for g in gens) / len(gens), 3)
        for pr, g in zip(prompts, gens, strict=True):
            correct = None if pr["reference"] is None else toytask.is_correct(g["response"], pr["reference"])
            predictions.append({"model": name, "prompt_id": pr["prompt_id"], "category": pr["category"], "response": g["response"], "finish_reason": g["finish_reason"], "correct": correct})
    teacher, tok_t, _ = loaded["teacher"]
    for name in ("student_initial", "student_distilled"):
        student, tok_s, _ = loaded[name]
        vocab = models.check_vocabularies(tok_s, tok_t, student.config.vocab_size, teacher.config.vocab_size)
        metrics[name]["kl_teacher_student"] = round(kl_on_responses(teacher, student, tok_s, prompts, responses["teacher"], vocab, p.batch_size), 6)
    return metrics, predictions


def main() -> None:
    args = cli.parse_paths(__doc__, "prompts", "models", "trained", "out", "metrics")
    used = params.load_sections(args.params, SECTIONS)
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    eval_file, train_file = args.prompts / "eval.parquet", args.prompts / "train.parquet"
    prompts = read_rows(eval_file, records.PROMPT_SCHEMA)
    leaked = {pr["prompt_id"] for pr in prompts} & {pr["prompt_id"] for pr in read_rows(train_file, records.PROMPT_SCHEMA)}
    if leaked:
        raise DataError(f"{eval_file}: {len(leaked)} eval prompts are also training prompts (e.g. {sorted(leaked)[0]}); evaluation would be contaminated")
    refs = {
        "teacher": (used["models.teacher"].ref(), args.models / "teacher"),
        "student_initial": (used["models.student"].ref(), args.models / "student"),
        "student_distilled": (models.ModelRef(str(args.trained / "model"), None), Path()),
    }
    loaded = {name: (models.load_model(ref, d, trust, dtype), models.load_tokenizer(ref, d, trust), models.fingerprint(ref, d)) for name, (ref, d) in refs.items()}
    metrics, predictions = run(loaded, prompts, used["evaluate"])
    metrics["eval_prompts"] = len(prompts)
    with atomic_dir(args.out) as tmp:
        n = write_table(tmp / "predictions.parquet", predictions, PREDICTION_SCHEMA)
        lineage.write_manifest(tmp, "evaluate", used, inputs={"eval_prompts": eval_file, "train_prompts": train_file, "trained": args.trained}, outputs={"predictions.parquet": n}, counts=metrics)
    write_json(args.metrics, metrics)
    for name in loaded:
        acc = metrics[name].get("accuracy")
        log.info("%s: exact match %s, KL %s", name, acc["exact_match"] if acc else "n/a", metrics[name].get("kl_teacher_student", "-"))


if __name__ == "__main__":
    main()
