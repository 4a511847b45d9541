"""The training loop every distillation run shares: the train stage, its on-policy rounds
(stages/train.py with --previous) and the comparison cells (stages/compare.py).

    job = Job(student=student, teacher=teacher, tok_s=tok_s, tok_t=tok_t, pairs=pairs, p=p,
              scores=..., checkpoint=..., live=...)
    rows = train(job)          # trains job.student in place; one log row per optimizer step

Pieces: `setup` (device, batch plan, seeding, optimizer, heads, resume), `train_step`
(one optimizer step over its micro-batches), `micro_batch` (the sides the method
declares, through the models, then its loss: methods.METHODS[train.method]),
checkpointing (checkpoint.py), per-step logging (summary.LiveLog), the stored top-k
signal (stored_topk.py) and online sampling (onpolicy.py, `train.online`). `load_inputs`
reads what a run trains on (distillflow/stagekit/gates.py gates it first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from distillflow.base import encoding, models, packing
from distillflow.base.errors import ModelError
from distillflow.training import basics, distributed, onpolicy
from distillflow.training.checkpoint import Checkpoint
from distillflow.training.methods import METHODS
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.methods.heads import Heads, Side, TopK
from distillflow.training.methods.method import Method, MicroBatch, Progress
from distillflow.training.stored_topk import Scores, load_scores, over_responses, served_topk, topk_of
from distillflow.training.summary import LiveLog
from distillflow.training.train_params import TrainParams, batch_plan, round_seed

log = logging.getLogger("train")


@dataclass(kw_only=True)
class Job:
    """One training run.

    With `p.teacher_signal == "topk"`, `teacher` is None and `scores` holds the teacher's
    stored top-k signal (stages/score.py). On-policy rounds: `round_index` e (1..E, E =
    `p.total_rounds`) places this run at training progress (e - 1 + step / T) / E for the
    beta schedule, so beta rises across all rounds as in the paper's clip(e/E + tau/T,
    beta_0, 1), and changes the shuffle seed. `curriculum`, when given, is used and left
    holding the reference gaps for the caller to save (later rounds start from round 1's
    reference m). `checkpoint`: resumable state (with `p.checkpoint_every`). `on_step(step)`
    is called after each optimizer step (progress hooks; tests simulate a crash with it).
    `live`: the folder of the per-step DVCLive log (written by rank 0 only)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tok_s: Any
    tok_t: Any
    pairs: list[dict[str, Any]]
    p: TrainParams
    scores: Scores | None = None
    round_index: int = 1
    curriculum: AlphaCurriculum | None = None
    checkpoint: Checkpoint | None = None
    on_step: Callable[[int], None] | None = None
    live: Path | None = None
    # train.online.teacher served: (sequences, prompt lengths) -> the served teacher's log-prob of each
    # response token (stagekit/trainrun.py builds it from score.openai: engines/served.py)
    score_samples: Callable[[list[list[int]], list[int]], list[list[float]]] | None = None


@dataclass(kw_only=True)
class Loop:
    """What `setup` prepares and `train_step` works on."""

    encoded: list[tuple[list[int], list[int], list[int]]]
    steps: list[list[list[int]]]
    seed: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    curriculum: AlphaCurriculum
    method: Method
    params: Any  # the method's params section (train.<method.params_section>), or None
    heads: Heads  # without the student's head: each micro-batch's forward brings it
    forward: torch.nn.Module  # distributed.StudentForward, under DDP or FSDP2 with a launcher
    rank: int
    world: int
    online_teacher: torch.nn.Module | None  # None unless the method reads the teacher and it runs here
    autocast: AbstractContextManager[Any]
    pad: int | None  # train.packing: the pad id filling packed rows; None: padded batches
    vocab: int  # the vocabulary both models share
    start: int = 0
    # train.online: the sampler's log-prob of each token of the responses sampled in this run, by pair
    behaviour: dict[int, list[float]] = field(default_factory=dict)
    served: dict[int, list[float]] = field(default_factory=dict)  # online.teacher served: log p of each sampled token
    sampled_tokens: int = 0  # response tokens sampled in this run (train.online)
    rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.steps)


def heads_of(student: torch.nn.Module, teacher: torch.nn.Module | None, vocab: int, p: TrainParams) -> Heads:
    """Both LM heads cut to the shared vocabulary (rows past it are padding)."""
    s_weight, s_bias = models.lm_head(student, vocab, "student")
    t_weight, t_bias = models.lm_head(teacher, vocab, "teacher") if teacher is not None else (None, None)
    return Heads(
        s_weight=s_weight,
        s_bias=s_bias,
        t_weight=t_weight,
        t_bias=t_bias,
        chunked=p.logits == "chunked",
        chunk_size=p.chunk_size,
        reduction=p.reduction,
        topk=teacher is None,
    )


def teacher_hiddens(
    teacher: torch.nn.Module | None, batches: list[encoding.Batch], device: str, pad: int | None
) -> list[torch.Tensor | None]:
    """The online teacher's final hidden states (B, T, H) of each batch, after its last
    norm (logits = head(hidden)), without gradients; packed into one forward when `pad`
    is given (train.packing: base/packing.py), else batch by batch. None without a teacher."""
    if teacher is None:
        return [None] * len(batches)
    pairs = [(b.input_ids.to(device), b.attention_mask.to(device)) for b in batches]
    with torch.no_grad():
        return list(packing.hidden_states(teacher.base_model, pairs, pad))


def side(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor | None,
    batch: encoding.Batch,
    device: str,
    topk: TopK | None = None,
    behaviour: list[list[float]] | None = None,
) -> Side:
    """One batch's student hidden states (with gradients), the teacher's (without) if needed;
    with `behaviour` (per row, the sampler's log-prob of each response token) laid out over
    the response positions."""
    if topk is not None:
        topk = TopK(topk.ids.to(device), topk.logprobs.to(device), topk.target.to(device))
    dense = over_responses(batch.response_mask, behaviour).to(device) if behaviour is not None else None
    return Side(
        s_hidden=s_hidden,
        t_hidden=t_hidden,
        mask=batch.response_mask.to(device),
        targets=batch.targets.to(device),
        t_topk=topk,
        behaviour=dense,
    )


def check_job(job: Job) -> None:
    p = job.p
    if not 1 <= job.round_index <= p.total_rounds:
        raise ValueError(
            f"train: round {job.round_index} is outside 1..{p.total_rounds} (train.rounds has {len(p.rounds)} entries)"
        )
    offline = p.teacher_signal == "topk"
    if offline != (job.teacher is None) or offline != (job.scores is not None):
        raise ValueError(
            "train: teacher_signal topk needs scores and no teacher model; online needs the teacher and no scores"
        )
    if not job.pairs:
        raise ValueError("train: no pairs to train on")
    if job.scores is not None and not job.scores:
        raise ValueError("train.teacher_signal is topk but data/score holds no scores: set score.k > 0")


def check_world(loop: Loop) -> None:
    """Under torchrun: every micro-batch needs a pair per process; the curriculum's
    means are taken over all processes."""
    short = [len(m) for st in loop.steps for m in st if len(m) < loop.world]
    if short:
        raise ValueError(
            f"train: under torchrun every micro-batch needs at least {loop.world} pairs (one per process); "
            f"{len(short)} have fewer (e.g. {short[0]}): pick train.batch_size so that the last batch of an "
            f"epoch ({len(loop.encoded)} pairs) is not that small"
        )

    def global_mean(x: torch.Tensor) -> float:
        total, count = distributed.sum_floats([float(x.sum()), float(x.numel())])
        return total / count

    loop.curriculum.mean = global_mean


def check_master_weights(student: torch.nn.Module) -> None:
    """AdamW updates the student's own weights: they must be float32 masters (a bfloat16
    weight loses most updates at fine-tuning learning rates; load_inputs loads the student
    in basics.MASTER_DTYPE and `train.bf16_autocast` gives bf16 compute)."""
    master = getattr(torch, basics.MASTER_DTYPE)
    other = {str(q.dtype) for q in student.parameters() if q.is_floating_point() and q.dtype != master}
    if other:
        raise ValueError(
            f"train: the student has {sorted(other)} weights; it must be trained with {basics.MASTER_DTYPE} master "
            "weights (load it in float32; models.dtype applies when it is saved, train.bf16_autocast to compute)"
        )


def autocast_of(p: TrainParams) -> AbstractContextManager[Any]:
    """The compute precision: bf16 autocast with `train.bf16_autocast` (the master weights
    stay float32), plain float32 otherwise. There is no float16 autocast: it would need a
    gradient scaler, which distillflow does not have."""
    return torch.autocast(device_type=p.device, dtype=torch.bfloat16) if p.bf16_autocast else nullcontext()


def setup(job: Job) -> Loop:
    """Models on the device, the batch plan, seeding, optimizer and schedule, heads, and
    the resume state; in this order (the order seeds and floats see)."""
    check_job(job)
    p, student, teacher, tok_s = job.p, job.student, job.teacher, job.tok_s
    check_master_weights(student)
    vocab = models.check_vocabularies(
        tok_s,
        job.tok_t,
        student.config.vocab_size,
        teacher.config.vocab_size if teacher is not None else len(job.tok_t),
    )
    student.to(p.device)
    if teacher is not None:
        teacher.to(p.device)
    encoded = [encoding.encode_pair(tok_s, pr) for pr in job.pairs]
    sampled = p.online.max_new_tokens if p.online.every else 0  # train.online's responses replace the stored ones
    longest = max(len(e[0]) + max(len(e[1]), len(e[2]), sampled) for e in encoded)
    for role, model in (("student", student), ("teacher", teacher)):
        limit = None if model is None else models.max_positions(model)
        if limit is not None and longest > limit:  # a training sequence is a prompt and a whole response
            raise ModelError(
                f"train: models.{role}: max positions {limit} < the longest pair ({longest} tokens, prompt and "
                "response); lower curate.max_chosen_tokens / max_rejected_tokens or use a longer-context model"
            )
    method = METHODS[p.method]
    online = teacher if method.needs_teacher != "none" else None
    check_heads(job, encoded[0], online)
    # The student's head comes with each forward (StudentForward): none held here, where
    # it would keep FSDP2's unsharded weight alive.
    heads = replace(heads_of(student, teacher, vocab, p), s_weight=torch.empty(0), s_bias=None)
    # Before the optimizer: FSDP2 shards the student's parameters in place.
    pad = tok_s.pad_token_id if p.packing else None
    forward = distributed.wrap(distributed.StudentForward(student, vocab, pad), p.parallel, p.device)
    seed = round_seed(p.seed, job.round_index)
    steps = batch_plan(len(encoded), p, seed)
    basics.seed_everything(seed)
    opt, sched = basics.optimizer_and_schedule(student, p.lr, p.warmup_steps, len(steps))
    if job.curriculum is None:
        job.curriculum = AlphaCurriculum(p.distillm2)
    if p.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()
    if teacher is not None:
        teacher.eval()
    rank, world = distributed.rank_and_size()
    autocast = autocast_of(p)
    loop = Loop(
        encoded=encoded,
        steps=steps,
        seed=seed,
        opt=opt,
        sched=sched,
        curriculum=job.curriculum,
        method=method,
        params=method.section(p),
        heads=heads,
        forward=forward,
        rank=rank,
        world=world,
        online_teacher=online,
        autocast=autocast,
        pad=pad,
        vocab=vocab,
    )
    if job.checkpoint is not None:
        loop.start, loop.rows = job.checkpoint.load(p.device, student, opt, sched, job.curriculum)
        if loop.start:
            log.info("train: resuming at step %d of %d from %s", loop.start, loop.total, job.checkpoint.file)
            loop.sampled_tokens = int(loop.rows[-1].get("sampled_tokens", 0.0))  # train.online's running count
    if world > 1:
        check_world(loop)
    if p.online.every and (world > 1 and p.parallel == "fsdp"):
        raise ValueError("train.online: sampling from an FSDP2-sharded student is not supported; use parallel: ddp")
    return loop


def check_heads(job: Job, first_pair: tuple[list[int], list[int], list[int]], online: torch.nn.Module | None) -> None:
    """models.check_plain_head on one sequence and, with train.packing, packing.check_model,
    before the student is wrapped (and, under FSDP2, sharded) and before the run's seeding."""
    first = encoding.collate([(first_pair[0], first_pair[1])], job.tok_s.pad_token_id)
    ids, attn = first.input_ids.to(job.p.device), first.attention_mask.to(job.p.device)
    for role, model in (("student", job.student), ("teacher", online)):
        if model is not None:
            models.check_plain_head(model, ids, attn, role)
            if job.p.packing:
                packing.check_model(model.base_model, job.tok_s.pad_token_id, role)


def sides(job: Job, loop: Loop, idx: list[int]) -> tuple[Side, Side, Heads]:
    """This process's pairs `idx` through the models: (chosen, rejected, the heads with
    the student's from this forward). A side the method does not read is empty, with no
    forward pass; the teacher signal (online or stored) only for a method that reads it.
    The student sees one call of `loop.forward` for both sides."""
    method, scores = loop.method, job.scores
    pad, keys = job.tok_s.pad_token_id, [job.pairs[i]["pair_id"] for i in idx]
    batches = {
        "chosen": encoding.collate([(loop.encoded[i][0], loop.encoded[i][1]) for i in idx], pad),
        "rejected": encoding.collate([(loop.encoded[i][0], loop.encoded[i][2]) for i in idx], pad),
    }
    needed = dict(zip(("chosen", "rejected"), method.sides(loop.params), strict=True))
    topk = {
        name: topk_of(b, [(k, name) for k in keys], scores)
        if scores is not None
        and needed[name]
        and method.needs_teacher != "none"
        and not (name == "rejected" and loop.served)
        else None
        for name, b in batches.items()
    }
    if loop.served and needed["rejected"]:  # the served teacher's log-probs of the samples (opd reads only them)
        topk["rejected"] = served_topk(batches["rejected"], [loop.served[i] for i in idx])
    dev = job.p.device
    read = [name for name in batches if needed[name]]
    s_hiddens, s_weight, s_bias = loop.forward(
        [(batches[n].input_ids.to(dev), batches[n].attention_mask.to(dev)) for n in read]
    )
    s_hidden = dict(zip(read, s_hiddens))
    t_hidden = dict(zip(read, teacher_hiddens(loop.online_teacher, [batches[n] for n in read], dev, loop.pad)))
    behaviour = [loop.behaviour[i] for i in idx] if loop.behaviour else None
    chosen, rejected = (
        side(s_hidden[name], t_hidden[name], b, dev, topk[name], behaviour if name == "rejected" else None)
        if needed[name]
        else Side(s_hidden=torch.empty(0), t_hidden=None, mask=b.response_mask[:0], targets=b.targets[:0])
        for name, b in batches.items()
    )
    return chosen, rejected, replace(loop.heads, s_weight=s_weight, s_bias=s_bias)


def micro_batch(job: Job, loop: Loop, step: int, micro: int, global_idx: list[int]) -> tuple[float, dict[str, Any]]:
    """Forward and backward on this process's share of one micro-batch; (its share of the
    step, the loss and its parts)."""
    positions = distributed.shard(list(range(len(global_idx))), loop.rank, loop.world)
    idx = [global_idx[i] for i in positions]
    # This process's share of the micro-batch, and of the step's micro-batches:
    # scaling by it makes the averaged gradient the single-process gradient.
    share = len(idx) / len(global_idx) / len(loop.steps[step])
    at = Progress(
        step=step,
        total_steps=loop.total,
        micro=micro,
        round_index=job.round_index,
        rounds=job.p.total_rounds,
        seed=loop.seed,
        positions=positions,
        global_size=len(global_idx),
    )
    last = micro == len(loop.steps[step]) - 1
    with distributed.accumulating(loop.forward, last):
        with loop.autocast:  # one region: forward passes and loss share its cast cache
            chosen, rejected, heads = sides(job, loop, idx)
            x = MicroBatch(chosen=chosen, rejected=rejected, heads=heads, at=at, curriculum=loop.curriculum)
            loss, logs = loop.method.loss(x, loop.params)
        # DDP and FSDP2 average over ranks: times the world, each rank's share sums to 1.
        (loss * share * loop.world).backward()
    return share, {"loss": float(loss.detach()), **logs}


def train_step(job: Job, loop: Loop, step: int) -> dict[str, float]:
    """One optimizer step over its micro-batches; its log row."""
    loop.opt.zero_grad(set_to_none=True)
    logged: dict[str, float] = {}
    for micro, global_idx in enumerate(loop.steps[step]):
        share, values = micro_batch(job, loop, step, micro, global_idx)
        for k, v in values.items():
            logged[k] = logged.get(k, 0.0) + v * share
    keys = sorted(logged)
    logged = dict(zip(keys, distributed.sum_floats([logged[k] for k in keys])))
    grad_norm = torch.nn.utils.clip_grad_norm_(job.student.parameters(), job.p.max_grad_norm)
    loop.opt.step()
    loop.sched.step()
    online = {"sampled_tokens": float(loop.sampled_tokens)} if job.p.online.every else {}
    return {
        "step": step,
        "loss": logged.pop("loss"),
        **logged,
        **online,
        "lr": loop.sched.get_last_lr()[0],
        "grad_norm": distributed.full_norm(grad_norm),
    }


def resample(job: Job, loop: Loop, step: int) -> None:
    """train.online: a response from the student's current weights (teacher-mixed for
    minillm) for each pair this process trains on in steps step .. step + K - 1, in place
    of the pair's stored student response (onpolicy.py)."""
    p = job.p
    mine = sorted(
        {
            global_idx[i]
            for st in loop.steps[step : step + p.online.every]
            for global_idx in st
            for i in distributed.shard(list(range(len(global_idx))), loop.rank, loop.world)
        }
    )
    mix = p.minillm.teacher_mix if p.method == "minillm" else 0.0
    sampler = onpolicy.Sampler(
        vocab=loop.vocab,
        max_new_tokens=p.online.max_new_tokens,
        stop=frozenset(models.stop_ids(job.student, job.tok_s)),
        teacher_mix=mix,
        device=p.device,
        pad=job.tok_s.pad_token_id,
        batch_size=p.batch_size,
    )
    prompts = [loop.encoded[i][0] for i in mine]
    seeds = [onpolicy.sample_seed(loop.seed, step, i) for i in mine]
    drawn = 0
    for i, (ids, lps) in zip(mine, onpolicy.sample(job.student, job.teacher, prompts, seeds, sampler), strict=True):
        prompt, chosen, _ = loop.encoded[i]
        loop.encoded[i] = (prompt, chosen, ids)
        loop.behaviour[i] = lps
        drawn += len(ids)
    loop.sampled_tokens += int(distributed.sum_floats([float(drawn)])[0])  # every process's samples
    if p.online.served:
        if job.score_samples is None:
            raise ValueError("train.online.teacher is served, but the run was given no served teacher (score.openai)")
        seqs = [loop.encoded[i][0] + loop.encoded[i][2] for i in mine]
        scored = job.score_samples(seqs, [len(loop.encoded[i][0]) for i in mine])
        loop.served.update(zip(mine, scored, strict=True))


def train(job: Job) -> list[dict[str, float]]:
    """Train `job.student` in place; returns one log row per optimizer step. Under FSDP2
    `job.student` is then the gathered model (distributed.gathered)."""
    loop = setup(job)
    p, ckpt = job.p, job.checkpoint
    live = LiveLog(job.live) if job.live is not None and loop.rank == 0 else None
    if live is not None:
        for row in loop.rows:  # the steps restored from a checkpoint, logged again
            live.log(row)
    bar = tqdm(total=loop.total, initial=loop.start, desc=f"train {p.method}", unit="step", mininterval=5.0)
    for step in range(loop.start, loop.total):
        if p.online.every and step % p.online.every == 0:
            resample(job, loop, step)
        loop.rows.append(train_step(job, loop, step))
        if live is not None:
            live.log(loop.rows[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{loop.rows[-1]['loss']:.4f}", refresh=False)
        every = p.checkpoint_every
        if ckpt is not None and every and (step + 1) % every == 0 and step + 1 < loop.total:
            ckpt.save(step + 1, job.student, loop.opt, loop.sched, loop.curriculum, loop.rows)
        if job.on_step is not None:
            job.on_step(step)
    bar.close()
    if p.gradient_checkpointing:
        job.student.gradient_checkpointing_disable()
    job.student = distributed.gathered(job.student)  # whole again after FSDP2 (on rank 0)
    job.student.eval()
    return loop.rows


def load_models(
    p: TrainParams,
    s_ref: models.ModelRef,
    s_dir: Path,
    t_ref: models.ModelRef,
    t_dir: Path,
    trust: bool,
    dtype: str,
) -> tuple[torch.nn.Module, torch.nn.Module | None, Any, Any]:
    """(student, teacher or None, student tokenizer, teacher tokenizer): with
    `teacher_signal: topk` the teacher model is never loaded. The student is loaded in
    float32 (its master weights, see basics.MASTER_DTYPE) whatever `dtype`; the frozen
    teacher in `dtype` (models.dtype)."""
    student = models.load_model(s_ref, s_dir, trust, basics.MASTER_DTYPE)
    teacher = None if p.teacher_signal == "topk" else models.load_model(t_ref, t_dir, trust, dtype)
    return student, teacher, models.load_tokenizer(s_ref, s_dir, trust), models.load_tokenizer(t_ref, t_dir, trust)


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
    """load_models, then the stored scores (load_scores)."""
    return (*load_models(p, s_ref, s_dir, t_ref, t_dir, trust, dtype), load_scores(p, scores_dir))
