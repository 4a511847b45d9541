"""train: distil the teacher into the student on the curated pairs.

    python -m stages.train --params params.yaml --pairs data/curate --scores data/score \
        --models data/bootstrap --out data/train --metrics metrics/train.json --plot plots/train.csv

`train.method` picks the objective (stages/lib/training/objectives.py): `distillm2` (default),
`distillm`, `gkd`, `kd`, `sft`, `dpkd`, all on the same pairs with the same loop. The
DistiLLM-2 objective (docs/METHOD.md), per pair i:

    L_i = (1 - beta) * SKL_seq(chosen_i; alpha_t,i) + beta * SRKL_seq(rejected_i; alpha_s,i)

with beta rising on a schedule and alpha adapted per sequence (switches:
`train.distillm2.contrastive`, `.beta_ramp`, `.adaptive_alpha`). Every optimizer step
is logged to the plot file (loss, its parts, beta, alpha mean/min/max).

Memory: with `logits: chunked` the loss is computed chunk by chunk from the models'
final hidden states, so full (B, T, V) logits never exist. Long runs save a resumable
checkpoint every `checkpoint_every` steps into `<out>.checkpoints/`; a killed run picks
up from it (when params, data and models are unchanged) and ends with the same
weights as an uninterrupted run. The distilled student is saved with save_pretrained
(safetensors) in out/model.

Data parallel: the same command under `torchrun --nproc_per_node=N -m stages.train ...`
(gloo on CPU, nccl on GPU) gives the loss curve of one process with the same global
batch (stages/lib/training/distributed.py). `bf16_autocast` and `gradient_checkpointing` are
for GPUs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from stages.lib.audit import lineage, quality
from stages.lib.core import entry, models, params
from stages.lib.core.config import Dtype, ModelParams
from stages.lib.core.params import check
from stages.lib.data import encoding, records
from stages.lib.data.io import DataError, atomic_dir, atomic_path, digest_path, read_rows, read_table, write_json
from stages.lib.training import basics, distributed
from stages.lib.training.objectives import (
    METHODS,
    NEEDS_REJECTED,
    NEEDS_TEACHER,
    AlphaCurriculum,
    Context,
    DistiLLM2Params,
    DistiLLMParams,
    DPKDParams,
    GKDParams,
    Heads,
    Method,
    MethodParams,
    Side,
    TopK,
)

log = logging.getLogger("train")


@dataclass(frozen=True)
class RoundParams:
    """One entry of params.yaml `train.rounds`: an on-policy round after the first."""

    previous: str  # the train output this round starts from (dvc.yaml passes it as --previous)


@dataclass(frozen=True)
class TrainParams:
    """params.yaml `train`."""

    method: Method
    seed: int
    epochs: int
    batch_size: int  # pairs per micro-batch
    grad_accum_steps: int  # micro-batches per optimizer step
    lr: float
    warmup_steps: int
    max_grad_norm: float
    reduction: Literal["sequence_mean", "token_mean"]
    logits: Literal["full", "chunked"]  # chunked: never materialise (B, T, V) logits
    chunk_size: int  # tokens per loss chunk
    device: Literal["cpu", "cuda"]
    bf16_autocast: bool
    gradient_checkpointing: bool
    checkpoint_every: int  # optimizer steps between resumable checkpoints; 0 = none
    teacher_signal: Literal["online", "topk"]  # topk: data/score's top-k log-probs, no teacher model
    distillm2: DistiLLM2Params
    distillm: DistiLLMParams
    gkd: GKDParams
    dpkd: DPKDParams
    # Batched on-policy rounds after the first (Algorithm 1), keyed r2..rE; dvc.yaml's
    # round_* stages iterate over it (DVC templates cannot count). Keys are names, not
    # numbers: DVC's foreach silently skips integer keys, and `-S` cannot write quoted ones.
    rounds: dict[str, RoundParams]

    @property
    def total_rounds(self) -> int:
        """E: the first round (the train stage) plus one per `rounds` entry."""
        return 1 + len(self.rounds)

    def __post_init__(self) -> None:
        want = [f"r{e}" for e in range(2, 2 + len(self.rounds))]
        check(
            sorted(self.rounds, key=lambda k: (len(k), k)) == want,
            "rounds",
            f"must be keyed r2..rE, one per round after the first, i.e. {want}; got {list(self.rounds)}",
        )
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        check(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = no checkpoints)")

    def method_params(self) -> MethodParams:
        return MethodParams(self.method, self.reduction, self.distillm2, self.distillm, self.gkd, self.dpkd)


SECTIONS: dict[str, Any] = {
    "models.teacher": ModelParams,
    "models.student": ModelParams,
    "models.trust_remote_code": bool,
    "models.dtype": Dtype,
    "train": TrainParams,
    "quality": quality.QualityParams,
}
PARAMS = tuple(SECTIONS)


def heads_of(student: torch.nn.Module, teacher: torch.nn.Module | None, vocab: int, p: TrainParams) -> Heads:
    """Both LM heads cut to the shared vocabulary (rows past it are padding)."""
    heads = {
        "student": student.get_output_embeddings(),
        "teacher": teacher.get_output_embeddings() if teacher is not None else None,
    }
    for name, head in heads.items():
        if head is not None and not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"models.{name}: output layer is {type(head).__name__}, not a Linear head; distillflow computes logits as hidden @ W.T"
            )
    cut = lambda t: None if t is None else t[:vocab]  # noqa: E731
    s_head, t_head = heads["student"], heads["teacher"]
    return Heads(
        s_head.weight[:vocab],
        cut(s_head.bias),
        cut(t_head.weight) if t_head is not None else None,
        cut(t_head.bias) if t_head is not None else None,
        p.logits == "chunked",
        p.chunk_size,
        p.reduction,
        topk=teacher is None,
    )


# (pair_id, side) -> (k, top-k ids (positions, k), top-k log-probs (positions, k), target log-probs (positions,))
Scores = dict[tuple[str, str], tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]


def index_scores(rows: list[dict[str, Any]]) -> Scores:
    out: Scores = {}
    for r in rows:
        n, k = r["positions"], r["k"]
        out[(r["pair_id"], r["side"])] = (
            k,
            torch.tensor(r["topk_ids"], dtype=torch.long).view(n, k),
            torch.tensor(r["topk_logprobs"], dtype=torch.float32).view(n, k),
            torch.tensor(r["target_logprob"], dtype=torch.float32),
        )
    return out


def topk_of(batch: encoding.Batch, keys: list[tuple[str, str]], scores: Scores) -> TopK:
    """The stored teacher signal of a batch, laid out densely over (B, T) positions."""
    B, T = batch.response_mask.shape
    k = next(iter(scores.values()))[0]
    ids = torch.zeros((B, T, k), dtype=torch.long)
    lps = torch.zeros((B, T, k), dtype=torch.float32)
    target = torch.zeros((B, T), dtype=torch.float32)
    for row, key in enumerate(keys):
        if key not in scores:
            raise DataError(f"data/score: no teacher scores for pair {key[0]} ({key[1]}); rerun the score stage")
        _, i, lp, tg = scores[key]
        m = batch.response_mask[row]
        if int(m.sum()) != i.shape[0]:
            raise DataError(
                f"data/score: pair {key[0]} ({key[1]}) has {i.shape[0]} scored positions, the tokenizer gives {int(m.sum())}"
            )
        ids[row, m], lps[row, m], target[row, m] = i, lp, tg
    return TopK(ids, lps, target)


def hidden(model: torch.nn.Module, batch: encoding.Batch, device: str) -> torch.Tensor:
    """Final hidden states (B, T, H), after the model's last norm: logits = head(hidden)."""
    out = model.base_model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.last_hidden_state


def side(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: encoding.Batch,
    device: str,
    topk: TopK | None = None,
) -> Side:
    """One batch through the student (with gradients) and the teacher (without), if needed."""
    s_h = hidden(student, batch, device)
    with torch.no_grad():
        t_h = hidden(teacher, batch, device) if teacher is not None else None
    if topk is not None:
        topk = TopK(topk.ids.to(device), topk.logprobs.to(device), topk.target.to(device))
    return Side(s_h, t_h, batch.response_mask.to(device), batch.targets.to(device), topk)


@torch.no_grad()
def check_head_is_plain(model: torch.nn.Module, batch: encoding.Batch, device: str, role: str) -> None:
    """Refuse models whose logits are not head(final hidden) (e.g. logit soft-capping)."""
    full = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    mine = model.get_output_embeddings()(hidden(model, batch, device))
    if not torch.allclose(full.float(), mine.float(), atol=1e-4, rtol=1e-4):
        raise ValueError(
            f"models.{role}: logits are not the LM head applied to the final hidden state (soft-capping or scaling?); this model is not supported"
        )


def run_key(p: TrainParams, pairs_digest: str, student_fp: str, teacher_fp: str) -> str:
    """What a checkpoint must match to be resumed: params, data and both models."""
    blob = records.canonical_json(
        {"train": asdict(p), "pairs": pairs_digest, "student": student_fp, "teacher": teacher_fp}
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load_checkpoint(
    ckpt: Path,
    key: str,
    device: str,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    curriculum: AlphaCurriculum,
) -> tuple[int, list[dict[str, float]]]:
    """Restore a run saved by `save_checkpoint`; (next step, log rows so far), or (0, [])
    when the checkpoint belongs to another configuration."""
    state = torch.load(ckpt, map_location=device, weights_only=True)
    if state["key"] != key:
        log.warning("train: ignoring checkpoint %s from another configuration (params, data or models changed)", ckpt)
        return 0, []
    student.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    curriculum.gaps_t, curriculum.gaps_s = state["curriculum"]["gaps_t"], state["curriculum"]["gaps_s"]
    return state["step"], state["log"]


def save_checkpoint(
    ckpt: Path,
    key: str,
    step: int,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    curriculum: AlphaCurriculum,
    log_rows: list[dict[str, float]],
) -> None:
    state = {
        "key": key,
        "step": step,
        "student": student.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "curriculum": curriculum.state(),
        "log": log_rows,
    }
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt) as tmp:
        torch.save(state, tmp)


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round e: `train.seed` itself in round 1, a distinct one after."""
    return seed + 7919 * (round_index - 1)


def plan(n_pairs: int, p: TrainParams, seed: int) -> list[list[list[int]]]:
    """Optimizer steps, each a list of micro-batches of pair indices.

    The shuffle of each epoch is a pure function of (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would.
    """
    steps: list[list[list[int]]] = []
    for epoch in range(p.epochs):
        order = list(range(n_pairs))
        random.Random(seed * 1000 + epoch).shuffle(order)
        micro = [order[s : s + p.batch_size] for s in range(0, n_pairs, p.batch_size)]
        steps.extend(micro[s : s + p.grad_accum_steps] for s in range(0, len(micro), p.grad_accum_steps))
    return steps


def run(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tok_s: Any,
    tok_t: Any,
    pairs: list[dict[str, Any]],
    p: TrainParams,
    checkpoint_dir: Path | None = None,
    key: str = "",
    on_step: Callable[[int], None] | None = None,
    scores: Scores | None = None,
    round_index: int = 1,
    curriculum: AlphaCurriculum | None = None,
) -> list[dict[str, float]]:
    """Train `student` in place; returns one log row per optimizer step.

    With `checkpoint_dir` and `p.checkpoint_every`, saves resumable state there and
    resumes from a checkpoint whose key equals `key`. `on_step(step)` is called after
    each optimizer step (progress hooks; tests use it to simulate a crash). With
    `p.teacher_signal == "topk"`, `teacher` is None and `scores` holds the teacher's
    stored top-k signal (stages/score.py).

    On-policy rounds: `round_index` e (1..E, E = `p.total_rounds`) places this run at
    training progress (e - 1 + step / T) / E for the beta schedule, so beta rises
    across all rounds as in the paper's clip(e/E + tau/T, beta_0, 1), and changes the
    shuffle seed. `curriculum`, when given, is used and left holding the reference
    gaps for the caller to save (later rounds start from round 1's reference m).
    """
    if not 1 <= round_index <= p.total_rounds:
        raise ValueError(
            f"train: round {round_index} is outside 1..{p.total_rounds} (train.rounds has {len(p.rounds)} entries)"
        )
    offline = p.teacher_signal == "topk"
    if offline != (teacher is None) or offline != (scores is not None):
        raise ValueError(
            "train: teacher_signal topk needs scores and no teacher model; online needs the teacher and no scores"
        )
    if not pairs:
        raise ValueError("train: no pairs to train on")
    if scores is not None and not scores:
        raise ValueError("train.teacher_signal is topk but data/score holds no scores: set score.k > 0")
    vocab = models.check_vocabularies(
        tok_s, tok_t, student.config.vocab_size, teacher.config.vocab_size if teacher is not None else len(tok_t)
    )
    student.to(p.device)
    if teacher is not None:
        teacher.to(p.device)
    encoded = [encoding.encode_pair(tok_s, pr) for pr in pairs]
    seed = round_seed(p.seed, round_index)
    steps = plan(len(encoded), p, seed)
    total = len(steps)
    basics.seed_everything(seed)
    opt, sched = basics.optimizer_and_schedule(student, p.lr, p.warmup_steps, total)
    if curriculum is None:
        curriculum = AlphaCurriculum(p.distillm2)
    mp = p.method_params()
    method = METHODS[p.method]
    heads = heads_of(student, teacher, vocab, p)
    if p.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()
    if teacher is not None:
        teacher.eval()
    start, log_rows = 0, []
    ckpt = checkpoint_dir / "state.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        start, log_rows = load_checkpoint(ckpt, key, p.device, student, opt, sched, curriculum)
        if start:
            log.info("train: resuming at step %d of %d from %s", start, total, ckpt)
    rank, world = distributed.rank_and_size()
    if world > 1:
        short = [len(m) for st in steps for m in st if len(m) < world]
        if short:
            raise ValueError(
                f"train: under torchrun every micro-batch needs at least {world} pairs (one per process); {len(short)} have fewer (e.g. {short[0]}): pick train.batch_size so that the last batch of an epoch ({len(encoded)} pairs) is not that small"
            )

        def global_mean(x: torch.Tensor) -> float:
            total, count = distributed.sum_floats([float(x.sum()), float(x.numel())])
            return total / count

        curriculum.mean = global_mean
    first = encoding.collate([(encoded[0][0], encoded[0][1])], tok_s.pad_token_id)  # one sequence
    check_head_is_plain(student, first, p.device, "student")
    if NEEDS_TEACHER[p.method] and teacher is not None:
        check_head_is_plain(teacher, first, p.device, "teacher")
    online_teacher = teacher if NEEDS_TEACHER[p.method] else None
    autocast = torch.autocast(device_type=p.device, dtype=torch.bfloat16) if p.bf16_autocast else nullcontext()
    bar = tqdm(total=total, initial=start, desc=f"train {p.method}", unit="step", mininterval=5.0)
    for step in range(start, total):
        opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for micro, global_idx in enumerate(steps[step]):
            positions = distributed.shard(list(range(len(global_idx))), rank, world)
            idx = [global_idx[i] for i in positions]
            # This process's share of the micro-batch, and of the step's micro-batches:
            # scaling by it makes the averaged gradient the single-process gradient.
            share = len(idx) / len(global_idx) / len(steps[step])
            chosen = encoding.collate([(encoded[i][0], encoded[i][1]) for i in idx], tok_s.pad_token_id)
            rejected = encoding.collate([(encoded[i][0], encoded[i][2]) for i in idx], tok_s.pad_token_id)
            keys = [pairs[i]["pair_id"] for i in idx]
            topk_c = topk_of(chosen, [(k, "chosen") for k in keys], scores) if scores is not None else None
            topk_r = (
                topk_of(rejected, [(k, "rejected") for k in keys], scores)
                if scores is not None and NEEDS_REJECTED[p.method]
                else None
            )
            with autocast:
                on_chosen = side(student, online_teacher, chosen, p.device, topk_c)
                # sft never looks at the student's responses: an empty side, no forward pass
                on_rejected = (
                    side(student, online_teacher, rejected, p.device, topk_r)
                    if NEEDS_REJECTED[p.method]
                    else Side(torch.empty(0), None, rejected.response_mask[:0], rejected.targets[:0])
                )
                ctx = Context(
                    on_chosen,
                    on_rejected,
                    heads,
                    mp,
                    step,
                    total,
                    seed,
                    curriculum,
                    micro,
                    positions,
                    len(global_idx),
                    round_index,
                    p.total_rounds,
                )
                loss, logs = method(ctx)
            (loss * share * world).backward()
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                logged[k] = logged.get(k, 0.0) + v * share
        distributed.average_gradients(list(student.parameters()))
        keys = sorted(logged)
        logged = dict(zip(keys, distributed.sum_floats([logged[k] for k in keys])))
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), p.max_grad_norm)
        opt.step()
        sched.step()
        log_rows.append(
            {
                "step": step,
                "loss": logged.pop("loss"),
                **logged,
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm),
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}", refresh=False)
        if (
            ckpt is not None
            and rank == 0
            and p.checkpoint_every
            and (step + 1) % p.checkpoint_every == 0
            and step + 1 < total
        ):
            save_checkpoint(ckpt, key, step + 1, student, opt, sched, curriculum, log_rows)
        if on_step is not None:
            on_step(step)
    bar.close()
    if p.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    student.eval()
    return log_rows


def write_plot(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})


def summary(rows: list[dict[str, float]], n_pairs: int, method: str) -> dict[str, Any]:
    """Metrics: the tail-averaged loss and the last values of the schedule knobs."""
    tail = rows[-min(10, len(rows)) :]
    out: dict[str, Any] = {
        "method": method,
        "pairs": n_pairs,
        "steps": len(rows),
        "final_loss": round(sum(r["loss"] for r in tail) / len(tail), 6),
    }
    for k in ("beta", "alpha_t_mean", "alpha_s_mean"):
        if k in rows[-1]:
            out[f"final_{k}"] = round(rows[-1][k], 6)
    return out


def previous_round(previous: Path, p: TrainParams) -> tuple[int, AlphaCurriculum]:
    """(this round's number, the curriculum carried over) for `--previous DIR`, the
    train output of the round before; checks it is the entry params.yaml names."""
    manifest_file = previous / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{previous}: no manifest.json; --previous must be a train stage's output folder")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("stage") != "train" or "round" not in manifest:
        raise DataError(
            f"{manifest_file}: not a train stage's manifest (stage {manifest.get('stage')!r}); --previous must be a train stage's output folder"
        )
    e = manifest["round"] + 1
    entry = p.rounds.get(f"r{e}")
    if entry is None or Path(entry.previous) != previous:
        raise ValueError(
            f"train.rounds: {previous} holds round {e - 1}, so this is round {e}, but train.rounds.r{e} is {entry}; "
            f"r{e} must have previous: {previous}"
        )
    state = json.loads((previous / "curriculum.json").read_text())
    curriculum = AlphaCurriculum(p.distillm2)
    curriculum.gaps_t, curriculum.gaps_s = state["gaps_t"], state["gaps_s"]
    return e, curriculum


def load_inputs(
    p: TrainParams,
    s_ref: models.ModelRef,
    s_dir: Path,
    t_ref: models.ModelRef,
    t_dir: Path,
    scores_dir: Path,
    trust: bool,
    dtype: str,
) -> tuple[torch.nn.Module, torch.nn.Module | None, Any, Any, Scores | None]:
    """(student, teacher or None, student tokenizer, teacher tokenizer, stored scores or
    None): with `teacher_signal: topk` the teacher model is never loaded."""
    student = models.load_model(s_ref, s_dir, trust, dtype)
    scores: Scores | None = None
    teacher: torch.nn.Module | None = None
    if p.teacher_signal == "topk":
        scores = index_scores(read_rows(scores_dir / "topk.parquet", records.TOPK_SCHEMA))
    else:
        teacher = models.load_model(t_ref, t_dir, trust, dtype)
    return (
        student,
        teacher,
        models.load_tokenizer(s_ref, s_dir, trust),
        models.load_tokenizer(t_ref, t_dir, trust),
        scores,
    )


def tokens_trained(tok: Any, pairs: list[dict[str, Any]], p: TrainParams) -> int:
    """Tokens the student ran forward on: prompt + chosen (+ prompt + rejected for the
    methods that use the rejected side) per pair, times epochs."""
    total = 0
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        total += len(prompt) + len(chosen) + ((len(prompt) + len(rejected)) if NEEDS_REJECTED[p.method] else 0)
    return total * p.epochs


def _read_manifest(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def prompt_source(curate_manifest: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(params.seed.source, how it was found) by following the manifests from the
    curated pairs back to the seed stage; None with the reason when a link is missing
    or its digest does not match."""
    pairs_in = curate_manifest["inputs"].get("pairs")
    if pairs_in is None:
        return None, "the curate manifest names no pairs input"
    pairs_m = _read_manifest(Path(pairs_in["path"]).parent / "manifest.json")
    if pairs_m is None or pairs_m["outputs"].get(Path(pairs_in["path"]).name, {}).get("sha256") != pairs_in["sha256"]:
        return None, f"{Path(pairs_in['path']).parent}/manifest.json is missing or records other pairs than curate read"
    prompts_in = pairs_m["inputs"].get("prompts")
    seed_m = _read_manifest(Path(prompts_in["path"]).parent / "manifest.json") if prompts_in else None
    if (
        prompts_in is None
        or seed_m is None
        or seed_m["outputs"].get(Path(prompts_in["path"]).name, {}).get("sha256") != prompts_in["sha256"]
    ):
        return None, "the seed manifest is missing or records other prompts than pairs read"
    return seed_m["params"]["seed"][
        "source"
    ], f"{Path(prompts_in['path']).parent}/manifest.json (digests checked along curate -> pairs -> seed)"


def model_card(
    used: dict[str, Any],
    metrics: dict[str, Any],
    src: Path,
    s_info: dict[str, Any],
    t_info: dict[str, Any],
    round_index: int,
) -> str:
    """The trained student's README.md in the Hugging Face Hub format: YAML front
    matter, then method, training metrics and a lineage summary. Deterministic (no
    times): it lives inside the train stage's DVC out."""
    p: TrainParams = used["train"]
    curate_m = _read_manifest(src.parent / "manifest.json")
    source, found = (
        prompt_source(curate_m) if curate_m is not None else (None, f"{src.parent}/manifest.json is missing")
    )
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillflow", "knowledge-distillation", p.method],
    }
    if s_info.get("revision") is not None:  # a hub model at a pinned revision
        meta["base_model"] = s_info["name"]
    if source is not None and source["kind"] == "hf":
        meta["datasets"] = [source["path"]]
    counts = (curate_m or {}).get("counts", {})
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=True).strip(),
        "---",
        "",
        f"# distillflow student ({p.method}, round {round_index} of {p.total_rounds})",
        "",
        (
            f"Distilled from the teacher below with `train.method: {p.method}` (see the distillflow README, "
            '"Methods, ablations and the training engine"), on teacher (chosen) / student (rejected) preference pairs.'
        ),
        "",
        "## Training",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(metrics.items())),
        f"| seed | {p.seed} |",
        f"| epochs | {p.epochs} |",
        f"| lr | {p.lr} |",
        f"| batch size x grad accum | {p.batch_size} x {p.grad_accum_steps} |",
        "",
        "## Lineage",
        "",
        f"- teacher: `{t_info['name']}` fingerprint `{t_info['fingerprint']}`",
        f"- initial student: `{s_info['name']}` fingerprint `{s_info['fingerprint']}`",
        f"- training pairs: `{src.as_posix()}` sha256 `{digest_path(src)}`",
        f"- curation: {counts.get('pairs_in', '?')} pairs in, {counts.get('kept', '?')} kept, dropped by reason {json.dumps(counts.get('dropped_by_reason', {}), sort_keys=True)}",
        f"- prompt source: {json.dumps(source, sort_keys=True) if source is not None else 'not traceable'} (from {found})",
        "",
        (
            "`distillflow lineage show data/train/model` prints the full tree back to the source rows; "
            "`distillflow lineage verify` re-checks every digest."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "scores", "models", "out", "metrics", "plot", optional=("previous",))
    used = params.load_sections(args.params, SECTIONS)
    p: TrainParams = used["train"]
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    s_dir, s_input = args.models / "student", models.lineage_input(s_ref, args.models, "student")
    round_index, curriculum = 1, AlphaCurriculum(p.distillm2)
    if args.previous is not None:  # an on-policy round after the first: start from the last round's student
        round_index, curriculum = previous_round(args.previous, p)
        s_ref, s_dir, s_input = models.ModelRef(str(args.previous / "model"), None), Path(), args.previous / "model"
    src = args.pairs / "curated.parquet"
    gates = quality.StageGates(
        used["quality"], None
    )  # inputs checked on read; the files' Data Docs come from curate and score
    table = read_table(src, records.PAIR_SCHEMA)
    gates.strict("curated pairs", src, "curated", table)
    if p.teacher_signal == "topk":  # streamed here, then read again by load_inputs (shared with compare)
        gates.check_file("teacher top-k", args.scores / "topk.parquet", "topk")
    validation = gates.finish()
    pairs = table.to_pylist()
    distributed.init_from_env(p.device)
    student, teacher, tok_s, tok_t, scores = load_inputs(
        p, s_ref, s_dir, t_ref, args.models / "teacher", args.scores, trust, dtype
    )
    key = run_key(
        p, digest_path(src), models.fingerprint(s_ref, s_dir), models.fingerprint(t_ref, args.models / "teacher")
    )
    ckpt_dir = args.out.with_name(args.out.name + ".checkpoints")
    t0 = time.perf_counter()
    rows = run(
        student,
        teacher,
        tok_s,
        tok_t,
        pairs,
        p,
        ckpt_dir,
        key,
        scores=scores,
        round_index=round_index,
        curriculum=curriculum,
    )
    rank, _ = distributed.rank_and_size()
    distributed.finish()
    if rank != 0:
        return  # every process holds the same weights and logs; one writes them
    log.info(
        "train: round %d of %d, %s, %d steps on %d pairs in %.1fs, final loss %.4f",
        round_index,
        p.total_rounds,
        p.method,
        len(rows),
        len(pairs),
        time.perf_counter() - t0,
        rows[-1]["loss"],
    )
    metrics = {"round": round_index, **summary(rows, len(pairs), p.method)}
    s_info, t_info = models.describe(s_ref, s_dir), models.describe(t_ref, args.models / "teacher")
    with atomic_dir(args.out) as tmp:
        basics.save_model(student.to("cpu"), tok_s, tmp / "model")
        (tmp / "model" / "README.md").write_text(model_card(used, metrics, src, s_info, t_info, round_index))
        write_json(tmp / "curriculum.json", curriculum.state())
        lineage.write_manifest(
            tmp,
            "train",
            used,
            inputs={
                "pairs": src,
                **({"scores": args.scores / "topk.parquet"} if scores is not None else {}),
                "student": s_input,
                "teacher": models.lineage_input(t_ref, args.models, "teacher"),
            },
            outputs={"curriculum.json": len(curriculum.gaps_t)},
            counts=metrics,
            extra={
                "round": round_index,
                "rounds": p.total_rounds,
                "initial_student": s_info,
                "teacher": t_info,
                "validation": validation,
            },
            cost={
                "tokens_read": tokens_trained(tok_s, pairs, p),
                "tokens_trained": tokens_trained(tok_s, pairs, p),
                "optimizer_steps": len(rows),
            },
        )
    write_plot(args.plot, rows)
    write_json(args.metrics, metrics)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # the run is complete: its resume state is no longer needed


if __name__ == "__main__":
    entry.run(main)
