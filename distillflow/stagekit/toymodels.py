"""The embedded task's models: bootstrap trains a toy teacher and a warm toy student
from the toy task's examples (SFT; the teacher partly on sequences with one wrong step,
masked out of the loss) and measures them on held-out prompts, plain and after a
corrupted prefix. stages/bootstrap.py calls `build` only when both models are `toy`, so
a run on real models never loads this module or the toy task.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distillflow.base import encoding, models, records
from distillflow.base.config import BootstrapParams, TaskParams, ToyModelParams
from distillflow.base.errors import ParamsError
from distillflow.base.packing import check_model as check_packing
from distillflow.base.packing import pack
from distillflow.tasks.toy import steps, toytask
from distillflow.training import basics

log = logging.getLogger("bootstrap")


def arch(mp: ToyModelParams) -> models.ToyArch:
    """A toy model's architecture from its params (not a method of the params: loading
    params must not load the model code, so stages that only read params stay light)."""
    return models.ToyArch(mp.hidden_size, mp.num_layers, mp.num_heads, mp.intermediate_size)


def _split(ex: toytask.ToyExample, task: TaskParams) -> str:
    """The example's split: its instance's (ex.group), as seed splits the toy source."""
    key = records.split_key(records.prompt_id(records.normalise_prompt(ex.prompt)), ex.group)
    return records.split_of(key, task.eval_fraction, task.sft_fraction)


def training_examples(task: TaskParams, seed: int, role: str) -> Iterator[toytask.ToyExample]:
    """The toy stream restricted to what `role` may train on: eval instances never (in
    any phrasing: the split is by instance); the teacher every other instance, the
    student only the SFT bucket (task.sft_fraction; the train split when that is 0),
    which seed never makes a distillation prompt."""
    want = {"train", "sft"} if role.startswith("teacher") or task.sft_fraction == 0.0 else {"sft"}
    for ex in toytask.examples(toytask.config_of(task), seed):
        if _split(ex, task) in want:
            yield ex


def heldout_examples(task: TaskParams, seed: int, n: int) -> list[toytask.ToyExample]:
    """`n` distinct eval-split examples: prompts of instances no model was trained on."""
    out: dict[str, toytask.ToyExample] = {}
    for ex in toytask.examples(toytask.config_of(task), seed):
        if _split(ex, task) == "eval":
            out.setdefault(ex.prompt, ex)
            if len(out) == n:
                return list(out.values())
    raise AssertionError("unreachable: the toy stream is endless")


def sft_stream(examples: Iterator[toytask.ToyExample], p: ToyModelParams, seed: int) -> Iterator[toytask.ToyExample]:
    """Fresh draws (examples: 0), or a fixed set of `examples` distinct ones cycled in
    shuffled epochs."""
    if p.examples == 0:
        yield from examples
        return
    fixed: dict[str, toytask.ToyExample] = {}
    for draws, ex in enumerate(examples, start=1):
        fixed.setdefault(ex.prompt, ex)
        if len(fixed) == p.examples:
            break
        if draws >= 50 * p.examples:
            raise ParamsError(
                f"bootstrap: examples: the task gave only {len(fixed)} distinct prompts this model may train on in "
                f"{draws} draws, not {p.examples}; lower examples, raise task.sft_fraction or widen `task`"
            )
    pool, rng = list(fixed.values()), random.Random(seed)
    while True:
        rng.shuffle(pool)
        yield from pool


Sequence = tuple[list[int], list[int], range]  # prompt ids, response ids, response positions out of the loss


def sequence(tok: Any, ex: toytask.ToyExample, rng: random.Random, p: ToyModelParams, alphabet: str) -> Sequence:
    """The right answer, or with probability corrupt_share (step skills) one wrong
    step, masked out of the loss, then the rule's steps from the written prefix."""
    prompt = encoding.prompt_ids(tok, ex.prompt)
    if ex.skill in steps.SEPARATOR and p.corrupt_share > 0.0 and rng.random() < p.corrupt_share:
        inst = steps.instance(ex.skill, ex.answer)
        made = None if inst is None else steps.corrupted(inst, rng, alphabet)
        if made is not None:
            written, j = made
            sep = steps.SEPARATOR[ex.skill]
            before = steps.join_steps(ex.skill, written[:j]) + (sep if j else "")
            after = (sep + steps.join_steps(ex.skill, written[j + 1 :])) if j + 1 < len(written) else ""
            ids_before = encoding.response_ids(tok, before, eos=False)
            ids_bad = encoding.response_ids(tok, written[j], eos=False)
            rest = encoding.response_ids(tok, after, eos=True)
            return prompt, ids_before + ids_bad + rest, range(len(ids_before), len(ids_before) + len(ids_bad))
    return prompt, encoding.response_ids(tok, ex.answer, eos=True), range(0)


def _batch(tok: Any, seqs: list[Sequence]) -> tuple[encoding.Batch, torch.Tensor]:
    """The collated batch and its loss mask (response positions minus wrong steps)."""
    b = encoding.collate([(pr, r) for pr, r, _ in seqs], tok.pad_token_id)
    mask = b.response_mask.clone()
    for i, (pr, _, masked) in enumerate(seqs):
        for k in masked:
            mask[i, len(pr) - 1 + k] = False  # the logit at len(pr)-1+k predicts response token k
    return b, mask


def _logits(model: torch.nn.Module, b: encoding.Batch, pad: int | None) -> torch.Tensor:
    """The batch's logits (B, T, V): padded, or (`pad`) from its sequences packed into
    rows and put back in the padded layout (zeros at padding)."""
    if pad is None:
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    p = pack([(b.input_ids, b.attention_mask)], pad)
    (logits,) = p.unpack(p.forward(model).logits)
    return logits


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok: Any, exs: list[toytask.ToyExample]) -> float:
    """Mean token NLL of the right answers of held-out examples."""
    model.eval()
    seqs = [(encoding.prompt_ids(tok, e.prompt), encoding.response_ids(tok, e.answer, eos=True), range(0)) for e in exs]
    total, count = 0.0, 0
    for i in range(0, len(seqs), 256):
        b, mask = _batch(tok, seqs[i : i + 256])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        total += F.cross_entropy(logits[mask], b.targets[mask], reduction="sum").item()
        count += int(mask.sum())
    model.train()
    return total / count


def train_toy(
    model: torch.nn.Module,
    tok: Any,
    examples: Iterator[toytask.ToyExample],
    p: ToyModelParams,
    desc: str,
    *,
    seed: int,
    alphabet: str,
    heldout: list[toytask.ToyExample],
    eval_every: int,
    packing: bool,
) -> tuple[list[float], list[tuple[int, float]]]:
    """Supervised fine-tuning on (prompt, answer): token NLL on the answer only (wrong
    steps of corrupted sequences left out). (train losses, [(step, held-out loss)]).
    `packing`: each batch's sequences go through the model packed into rows
    (base/packing.py; the same batches, the same positions scored)."""
    if packing:
        check_packing(model.base_model, tok.pad_token_id, "toy")
    opt, sched = basics.optimizer_and_schedule(model, p.lr, p.warmup_steps, p.steps)
    rng = random.Random(seed)
    model.train()
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    for step in tqdm(range(1, p.steps + 1), desc=desc, unit="step", mininterval=5.0):
        b, mask = _batch(tok, [sequence(tok, e, rng, p, alphabet) for e in itertools.islice(examples, p.batch_size)])
        logits = _logits(model, b, tok.pad_token_id if packing else None)  # (B, T, V)
        loss = F.cross_entropy(logits[mask], b.targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == p.steps:
            curve.append((step, round(heldout_loss(model, tok, heldout), 4)))
    model.eval()
    return losses, curve


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: Any, inputs: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token id lists (left-padded batches), decoded up to eos."""
    out: list[str] = []
    for i in range(0, len(inputs), 256):
        ids, att = encoding.left_pad(inputs[i : i + 256], tok.pad_token_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[:, width:]
        for row in gen.tolist():
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def _rate(d: dict[str, list[bool]]) -> dict[str, Any]:
    flat = [x for v in d.values() for x in v]
    return {
        "accuracy": round(sum(flat) / len(flat), 4) if flat else None,
        "per_skill": {k: round(sum(v) / len(v), 4) for k, v in sorted(d.items())},
        "n": len(flat),
    }


FAILURES = ("wrong_step", "past_end", "short", "malformed")


def continuation_failure(inst: steps.Instance, prefix: list[str], continuation: str) -> str | None:
    """None where a continuation of `prefix` (its last step written, no separator after
    it, as in the training sequences) goes on only by the separator and steps the rule
    gives from what is written, and stops where the rule ends; else how it fails: a
    `wrong_step`, a step `past_end` (the rule had ended), `short` (stops before the
    rule ends) or `malformed` (no separator first, a doubled or trailing one; an empty
    step inside is a wrong step)."""
    sep = steps.SEPARATOR[inst.skill]
    rest: list[str] = []
    if continuation:
        body = continuation[len(sep) :]
        if not continuation.startswith(sep) or not body or body != body.strip():
            return "malformed"
        rest = steps.split_steps(inst.skill, body)
    written = [*prefix, *rest]
    for k in range(len(prefix), len(written)):
        valid = steps.next_steps(inst, written[:k])
        if valid is None or written[k] not in valid:
            return "past_end" if valid == frozenset() else "wrong_step"
    return None if steps.next_steps(inst, written) == frozenset() else "short"


def follows_rule(inst: steps.Instance, prefix: list[str], continuation: str) -> bool:
    """Whether a continuation of `prefix` follows the rule (continuation_failure is None)."""
    return continuation_failure(inst, prefix, continuation) is None


def accuracies(
    model: torch.nn.Module, tok: Any, exs: list[toytask.ToyExample], alphabet: str, seed: int, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy accuracy on held-out prompts: plain (the verifier's pass rate, overall
    and per skill) and, on the step skills, after a fresh corrupted prefix (right steps
    and one wrong step written, then the model continues; right per follows_rule, and
    the failures counted by kind). The prefix ends with the wrong step itself, as the
    training sequences have it: whether a separator and another step follow, or the
    end, is the model's to write (after a wrong step that overshoots a walk's goal the
    rule ends there)."""
    plain = greedy(model, tok, [encoding.prompt_ids(tok, e.prompt) for e in exs], max_new_tokens)
    per: dict[str, list[bool]] = defaultdict(list)
    for e, r in zip(exs, plain, strict=True):
        per[e.skill].append(toytask.is_correct(r, e.answer, e.skill))
    rng = random.Random(seed)
    cases: list[tuple[str, steps.Instance, list[str], list[int]]] = []
    for e in exs:
        inst = steps.instance(e.skill, e.answer) if e.skill in steps.SEPARATOR else None
        made = None if inst is None else steps.corrupted(inst, rng, alphabet)
        if inst is not None and made is not None:
            written, j = made
            text = steps.join_steps(e.skill, written[: j + 1])
            ids = encoding.prompt_ids(tok, e.prompt) + encoding.response_ids(tok, text, eos=False)
            cases.append((e.skill, inst, written[: j + 1], ids))
    after: dict[str, list[bool]] = defaultdict(list)
    failures: dict[str, dict[str, int]] = {}
    conts = greedy(model, tok, [c[3] for c in cases], max_new_tokens) if cases else []
    for (skill, inst, prefix, _), cont in zip(cases, conts, strict=True):
        kind = continuation_failure(inst, prefix, cont)
        after[skill].append(kind is None)
        if kind is not None:
            by_kind = failures.setdefault(skill, dict.fromkeys(FAILURES, 0))
            by_kind[kind] += 1
    return {
        "plain": _rate(per),
        "after_corruption": {**_rate(after), "failures": {k: failures[k] for k in sorted(failures)}},
    }


def build(
    task: TaskParams, p: BootstrapParams, out: Path, student_from: Path | None, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Train the toy teacher and student into `out` (teacher and student folders); their
    metrics. `student_from` (the comparison's control): train only the teacher, with
    corrupt_share 0 (no corrupted prefixes), and copy the student from that folder.
    `extra`: the folders of more toy teachers (models.teachers past the first), each
    trained like the teacher from a seed of its own."""
    metrics: dict[str, Any] = {}
    tok = models.build_char_tokenizer()
    heldout = heldout_examples(task, p.seed * 100 + 99, p.heldout)
    if student_from is not None:
        plain = dataclasses.replace(p.teacher, corrupt_share=0.0)
        metrics["teacher"] = build_one("teacher", plain, p.seed * 100, tok, task, p, heldout, out / "teacher")
        shutil.copytree(student_from / "student", out / "student")
        return metrics
    jobs = [("teacher", p.teacher, p.seed * 100), ("student", p.student, p.seed * 100 + 1)]
    jobs += [(role, p.teacher, p.seed * 100 + 10 + k) for k, role in enumerate(extra)]
    if p.workers == 1:
        for role, mp, seed in jobs:
            metrics[role] = build_one(role, mp, seed, tok, task, p, heldout, out / role)
    else:
        # One thread per process: on 2 cores two 1-thread trainings beat two 2-thread ones in turn.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = {
                role: pool.submit(_build_in_worker, role, mp, seed, task, p, heldout, out / role)
                for role, mp, seed in jobs
            }
            metrics = {role: f.result() for role, f in futures.items()}
    return metrics


def _build_in_worker(
    role: str,
    mp: ToyModelParams,
    seed: int,
    task: TaskParams,
    p: BootstrapParams,
    heldout: list[toytask.ToyExample],
    folder: Path,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    return build_one(role, mp, seed, models.build_char_tokenizer(), task, p, heldout, folder)


def build_one(
    role: str,
    mp: ToyModelParams,
    seed: int,
    tok: Any,
    task: TaskParams,
    p: BootstrapParams,
    heldout: list[toytask.ToyExample],
    folder: Path,
) -> dict[str, Any]:
    """Train one toy model, save it to `folder`, and measure it: its metrics entry."""
    model = models.build_toy_model(arch(mp), len(tok), tok, seed, p.max_positions)
    t0 = time.perf_counter()
    data = sft_stream(training_examples(task, seed, role), mp, seed)
    losses, curve = train_toy(
        model,
        tok,
        data,
        mp,
        f"train toy {role}",
        seed=seed,
        alphabet=task.alphabet,
        heldout=heldout,
        eval_every=p.eval_every,
        packing=p.packing,
    )
    seconds = time.perf_counter() - t0
    acc = accuracies(model, tok, heldout, task.alphabet, seed + 7, p.max_new_tokens)
    log.info(
        "%s: %d parameters, %d steps in %.1fs, held-out loss %.4f, accuracy %s plain / %s after corruption",
        role,
        basics.count_parameters(model),
        mp.steps,
        seconds,
        curve[-1][1],
        acc["plain"]["accuracy"],
        acc["after_corruption"]["accuracy"],
    )
    basics.save_model(model, tok, folder)
    return {
        "parameters": basics.count_parameters(model),
        "steps": mp.steps,
        "examples": mp.examples,
        "corrupt_share": mp.corrupt_share,
        "seconds": round(seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_loss": curve[-1][1],
        "heldout_loss_curve": [{"step": s, "loss": v} for s, v in curve],
        **acc,
    }
