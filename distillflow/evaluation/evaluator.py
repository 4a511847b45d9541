"""Runs models over the eval prompts and gathers their scores (distillflow/evaluation/metrics.py)."""

from __future__ import annotations

from typing import Any

import torch

from distillflow import tasks
from distillflow.base import encoding, models
from distillflow.engines.generation import generate_transformers
from distillflow.evaluation.eval_params import EvaluateParams
from distillflow.evaluation.metrics import accuracy, length_stats, rouge_l, sequences, speculative, teacher_forced


def generate_responses(
    model: torch.nn.Module, tok: Any, fp: str, name: str, prompts: list[dict[str, Any]], p: EvaluateParams
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A model's eval responses: (metrics, generations, prediction rows). The model runs
    on `p.device`; the longest prompt plus `evaluate.max_new_tokens` must fit its max
    positions (checked before generating)."""
    model.to(p.device)
    longest = max(len(encoding.prompt_ids(tok, pr["prompt"])) for pr in prompts)
    models.check_positions(
        models.max_positions(model), f"evaluate: {name}", longest, p.max_new_tokens, "evaluate.max_new_tokens"
    )
    gens = generate_transformers(model, tok, prompts, p.generation(), fp, desc=f"evaluate {name}")
    acc = accuracy(prompts, gens)
    metrics: dict[str, Any] = {"accuracy": acc} if acc is not None else {}
    metrics["response_tokens"] = length_stats(gens)
    rows = [
        {
            "model": name,
            "prompt_id": pr["prompt_id"],
            "category": pr["category"],
            "response": g["response"],
            "finish_reason": g["finish_reason"],
            "correct": None
            if pr["reference"] is None
            else tasks.is_correct(g["response"], pr["reference"], pr["category"]),
        }
        for pr, g in zip(prompts, gens, strict=True)
    ]
    return metrics, gens, rows


def student_metrics(
    teacher: torch.nn.Module,
    tok_t: Any,
    student: torch.nn.Module,
    tok_s: Any,
    prompts: list[dict[str, Any]],
    teacher_gens: list[dict[str, Any]],
    own_gens: list[dict[str, Any]],
    p: EvaluateParams,
    per_prompt: bool = False,
) -> dict[str, Any]:
    """What a student is measured on besides accuracy, against the teacher's responses
    (both models on `p.device`). `per_prompt` adds "per_prompt": the columns of
    eval_params.PROMPT_SCORES each metric's per-prompt sums come from (`prompt_scores`)."""
    teacher.to(p.device)
    student.to(p.device)
    vocab = models.check_vocabularies(tok_s, tok_t, student.config.vocab_size, teacher.config.vocab_size)
    on_teacher = teacher_forced(
        teacher,
        student,
        tok_s,
        sequences(tok_s, prompts, teacher_gens),
        vocab,
        p.batch_size,
        "the teacher's eval responses",
        p.device,
        per_sequence=per_prompt,
    )
    own = sequences(tok_s, prompts, own_gens)
    # A student may answer with nothing scorable at all (only special tokens, cut off):
    # then there is no NLL on its own responses, and the metrics say so.
    scorable = sum(len(r) for _, r in own)
    on_own = (
        teacher_forced(
            None,
            student,
            tok_s,
            own,
            vocab,
            p.batch_size,
            "the student's own eval responses",
            p.device,
            per_sequence=per_prompt,
        )
        if scorable
        else {"nll": None, "per_sequence": {"nll": [0.0] * len(own), "tokens": [0] * len(own)}}
    )
    out: dict[str, Any] = {
        "kl_teacher_student": on_teacher["kl_teacher_student"],
        "nll_on_teacher_responses": on_teacher["nll"],
        "nll_on_own_responses": on_own["nll"],  # DPKD's collapse shows here; null: nothing to score
        "own_response_tokens_scored": scorable,
        "greedy_agreement": on_teacher["greedy_agreement"],
        "rouge_l_vs_teacher": round(
            sum(rouge_l(g["response"], t["response"]) for g, t in zip(own_gens, teacher_gens, strict=True))
            / len(own_gens),
            6,
        ),
    }
    if p.speculative_prompts:
        ends = set(models.end_ids(tok_t, teacher.generation_config))
        out["speculative"] = speculative(teacher, student, tok_s, prompts, p, vocab, ends, p.device)
    if per_prompt:
        t_seq, own_seq = on_teacher["per_sequence"], on_own["per_sequence"]
        out["per_prompt"] = {
            "rouge_l": [rouge_l(g["response"], t["response"]) for g, t in zip(own_gens, teacher_gens, strict=True)],
            "kl_sum": t_seq["kl"],
            "agree_sum": t_seq["agree"],
            "nll_teacher_sum": t_seq["nll"],
            "teacher_tokens": t_seq["tokens"],
            "nll_own_sum": own_seq["nll"],
            "own_tokens": own_seq["tokens"],
        }
    return out


def prompt_scores(
    prompts: list[dict[str, Any]],
    gens: dict[str, list[dict[str, Any]]],
    per_prompt: dict[str, list[Any]],
    sampled: dict[str, list[Any]],
) -> list[dict[str, Any]]:
    """eval_params.PROMPT_SCORES rows: `gens` holds the greedy responses of "student", "teacher" and
    "initial"; `per_prompt` is student_metrics' (per_prompt=True); `sampled` the
    per-sequence NLL sums and tokens of the student's sampled responses."""

    def correct(pr: dict[str, Any], g: dict[str, Any]) -> bool | None:
        return None if pr["reference"] is None else tasks.is_correct(g["response"], pr["reference"], pr["category"])

    rows = []
    for i, pr in enumerate(prompts):
        student = gens["student"][i]
        steps = (
            None if pr["reference"] is None else tasks.step_score(student["response"], pr["reference"], pr["category"])
        )
        rows.append(
            {
                "prompt_id": pr["prompt_id"],
                "category": pr["category"],
                "group": pr["group"],
                "correct": correct(pr, student),
                "steps_right": None if steps is None else steps[0],
                "steps": None if steps is None else steps[1],
                **{k: v[i] for k, v in per_prompt.items()},
                "nll_sampled_sum": sampled["nll"][i],
                "sampled_tokens": sampled["tokens"][i],
                "teacher_correct": correct(pr, gens["teacher"][i]),
                "initial_correct": correct(pr, gens["initial"][i]),
            }
        )
    return rows


def evaluate_models(
    loaded: dict[str, tuple[torch.nn.Module, Any, str]], prompts: list[dict[str, Any]], p: EvaluateParams
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`loaded` maps teacher / student_initial / student_distilled to (model, tokenizer, fingerprint)."""
    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    responses: dict[str, list[dict[str, Any]]] = {}
    for name, (model, tok, fp) in loaded.items():
        metrics[name], responses[name], rows = generate_responses(model, tok, fp, name, prompts, p)
        predictions.extend(rows)
    teacher, tok_t, _ = loaded["teacher"]
    for name in ("student_initial", "student_distilled"):
        student, tok_s, _ = loaded[name]
        metrics[name] |= student_metrics(
            teacher, tok_t, student, tok_s, prompts, responses["teacher"], responses[name], p
        )
    return metrics, predictions


def headline(metrics: dict[str, Any], label: str) -> dict[str, Any]:
    """The few numbers a user compares across experiments (metrics/summary.json, the
    evaluate stage's one DVC metric), under `label` (the round: r1, r2, ...), so each
    round's columns in `dvc exp show` have short, distinct names: exact match of the
    teacher, the initial and the distilled student, the distilled student's per skill,
    the share of right steps (step skills) of all three, and KL(teacher || student) of
    both students. The details stay in
    metrics/evaluate.json."""
    out: dict[str, Any] = {}
    names = {"teacher": "teacher", "student_initial": "initial", "student_distilled": "distilled"}
    accs = {short: metrics[name].get("accuracy") for name, short in names.items()}
    if all(a is not None for a in accs.values()):
        out["exact_match"] = {short: a["exact_match"] for short, a in accs.items()}
        out["distilled_per_skill"] = dict(accs["distilled"]["per_category"])
        if all("step_share" in a for a in accs.values()):
            out["step_share"] = {short: a["step_share"] for short, a in accs.items()}
    out["kl"] = {"initial": metrics["student_initial"]["kl_teacher_student"]}
    out["kl"]["distilled"] = metrics["student_distilled"]["kl_teacher_student"]
    return {label: out}
