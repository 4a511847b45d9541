"""Online on-policy distillation, ours against TRL 1.16's DistillationTrainer: responses/s and memory.

Both sample the student from its current weights on every optimizer step (transformers
generation on both sides, in the training process), score the samples with the teacher
held in the same process, and take one optimizer step on them:

  ours          distillflow.training.trainer.train with `train.method: opd`
                (`train.opd.discount: 0`, the per-token reverse KL estimated on the
                sampled tokens) and `train.online: {every: 1, teacher: model}`: the
                student samples the step's prompts batched, left-padded and KV-cached
                (training/onpolicy.py), temperature 1
  TRL           trl.DistillationTrainer through its public API (a subclass only counts
                what its own `_generate_single_turn` returns): a prompt-only dataset,
                the student generates `max_completion_length` tokens at most with
                transformers' generate, temperature 1, top-p 1, top-k off; its loss at
                beta 1 is the per-token reverse KL over the whole vocabulary (from both
                models' hidden states, chunked)

What is equal: the models (the params.yaml toy architectures, random init, saved once
and loaded by every run), the prompts (toy-task prompts, the same list in the same
order: TRL reads them sequentially, ours in the order its batch plan draws them, checked
to be the same set per step), batch size, the response budget, the optimizer object
(basics.optimizer_and_schedule, passed to TRL), grad clipping, float32, one thread,
no accumulation. What is not: the estimator (ours differentiates the sampled tokens'
log-probs weighted by the detached log-ratio; TRL differentiates the exact per-token
KL over the vocabulary, which costs a (tokens, vocabulary) softmax of both models per
step), and so the losses are not compared; the sampled lengths are printed beside the
rates (a random student rarely stops early, so both sample about the whole budget).

Each run is a subprocess of its own (its peak RSS is its own: imports and models
included); "train +MiB" is the peak during training over the RSS just before it. The
first `--warmup` steps are not timed; responses/s = batch size x timed steps over their
wall time. `--repeats R` runs each side R times in turn and keeps the best.

    python benchmarks/online_vs_trl.py [--batch-size 16] [--max-new-tokens 32] [--quick]

Needs `trl` (1.16) and `accelerate`: `pip install -c constraints/cpu.lock -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TQDM_DISABLE"] = "1"

import torch  # noqa: E402

from benchmarks.train_vs_trl import (  # noqa: E402
    build_models,
    load_all,
    make_pairs,
    reset_peak_rss,
    result,
    run_child,
    samples_per_s,
    trl_config,
)
from distillflow.base import params  # noqa: E402
from distillflow.base.config import BootstrapParams, TaskParams  # noqa: E402
from distillflow.training import basics, trainer  # noqa: E402
from distillflow.training.onpolicy import OnlineParams  # noqa: E402
from distillflow.training.train_params import TrainParams, batch_plan, round_seed  # noqa: E402

LABELS = {"ours": "ours (opd, online every step)", "trl": "TRL DistillationTrainer"}


@dataclass(frozen=True, kw_only=True)
class Spec:
    side: str  # ours | trl
    folder: str  # models/, pairs.json, order.json
    params: str
    seed: int
    batch_size: int
    steps: int  # warm-up and timed
    max_new_tokens: int
    lr: float
    max_grad_norm: float
    threads: int
    out: str


def train_params(spec: Spec) -> TrainParams:
    """params.yaml `train` with this benchmark's settings."""
    base: TrainParams = params.load_sections(Path(spec.params), {"train": TrainParams})["train"]
    return replace(
        base,
        method="opd",
        opd=replace(base.opd, discount=0.0),
        seed=spec.seed,
        epochs=1,
        batch_size=spec.batch_size,
        grad_accum_steps=1,
        lr=spec.lr,
        warmup_steps=0,
        max_grad_norm=spec.max_grad_norm,
        device="cpu",
        bf16_autocast=False,
        gradient_checkpointing=False,
        checkpoint_every=0,
        teacher_signal="online",
        online=OnlineParams(every=1, max_new_tokens=spec.max_new_tokens, teacher="model"),
        rounds={},
    )


def run_ours(spec: Spec) -> dict[str, Any]:
    student, teacher, tok, pairs, _ = load_all(Path(spec.folder))
    stamps: list[float] = []
    job = trainer.Job(
        student=student,
        teacher=teacher,
        tok_s=tok,
        tok_t=tok,
        pairs=pairs,
        p=train_params(spec),
        on_step=lambda step: stamps.append(time.perf_counter()),
    )
    start_rss = reset_peak_rss()
    rows = trainer.train(job)
    out = result(stamps, [r["loss"] for r in rows], start_rss)
    out["response_tokens"] = rows[-1]["sampled_tokens"] / (len(rows) * spec.batch_size)  # a running count
    return out


def run_trl(spec: Spec) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    student, teacher, tok, pairs, order = load_all(Path(spec.folder))
    stamps: list[float] = []
    lengths: list[int] = []

    class Stamps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

    class Counted(DistillationTrainer):  # its own generation, only counted
        def _generate_single_turn(self, prompt_ids: Any, *a: Any, **kw: Any) -> Any:
            got = super()._generate_single_turn(prompt_ids, *a, **kw)
            lengths.extend(len(c) for c in got)
            return got

    opt, sched = basics.optimizer_and_schedule(student, spec.lr, 0, spec.steps)
    args = trl_config(
        spec,
        DistillationConfig,
        str(Path(spec.folder) / "trl-online"),
        shuffle_dataset=False,
        beta=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=spec.max_new_tokens,
    )
    rows = [{"prompt": [{"role": "user", "content": pairs[i]["prompt"]}]} for i in order]
    run = Counted(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        optimizers=(opt, sched),
        callbacks=[Stamps()],
    )
    start_rss = reset_peak_rss()
    run.train()
    out = result(stamps, [h["loss"] for h in run.state.log_history if "loss" in h], start_rss)
    out["response_tokens"] = sum(lengths) / max(len(lengths), 1)
    return out


def child(spec_file: Path) -> None:
    spec = Spec(**json.loads(spec_file.read_text()))
    torch.set_num_threads(spec.threads)
    out = run_ours(spec) if spec.side == "ours" else run_trl(spec)
    Path(spec.out).write_text(json.dumps(out))


def spawn(spec: Spec, work: Path) -> dict[str, Any]:
    return run_child(Path(__file__), spec, work / f"spec-{spec.side}.json", LABELS[spec.side])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the best responses/s is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny models, batch 4, 8 tokens, 1 + 2 steps: a smoke test")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.quick:
        args.batch_size, args.max_new_tokens, args.steps, args.warmup = 4, 8, 2, 1
    if min(args.steps, args.warmup, args.batch_size, args.repeats, args.max_new_tokens) < 1:
        ap.error("--steps, --warmup, --batch-size, --repeats and --max-new-tokens must be >= 1")
    sections = params.load_sections(
        args.params, {"task": TaskParams, "bootstrap": BootstrapParams, "train": TrainParams}
    )
    train: TrainParams = sections["train"]
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="online-vs-trl-") as tmp:
        work = Path(tmp)
        teacher_arch, student_arch = build_models(work, args.quick, sections)
        pairs = make_pairs(sections["task"], total * args.batch_size, args.seed)
        (work / "pairs.json").write_text(json.dumps(pairs))
        specs = {
            side: Spec(
                side=side,
                folder=str(work),
                params=str(args.params),
                seed=args.seed,
                batch_size=args.batch_size,
                steps=total,
                max_new_tokens=args.max_new_tokens,
                lr=train.lr,
                max_grad_norm=train.max_grad_norm,
                threads=args.threads,
                out=str(work / f"result-{side}.json"),
            )
            for side in LABELS
        }
        p = train_params(specs["ours"])
        order = [i for step in batch_plan(len(pairs), p, round_seed(p.seed, 1)) for micro in step for i in micro]
        (work / "order.json").write_text(json.dumps(order))  # TRL reads the prompts in our order
        print(
            f"teacher {teacher_arch}\nstudent {student_arch}\n{len(pairs)} prompts; batch {args.batch_size}, "
            f"at most {args.max_new_tokens} new tokens, {args.warmup} warm-up + {args.steps} timed steps, "
            f"{args.threads} thread(s), best of {args.repeats}"
        )
        results: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for side, spec in specs.items():
                r = spawn(spec, work)
                r["rate"] = samples_per_s(r, args.warmup, args.batch_size)
                if side not in results or r["rate"] > results[side]["rate"]:
                    results[side] = r
    print(f"\n{'':32}{'responses/s':>12}{'tokens/resp':>12}{'peak MiB':>10}{'train +MiB':>11}")
    for side, r in results.items():
        print(
            f"{LABELS[side]:32}{r['rate']:12.2f}{r['response_tokens']:12.1f}"
            f"{r['peak_rss_mib']:10.0f}{r['train_mib']:11.0f}"
        )
    ours, trl = results["ours"], results["trl"]
    print(
        f"\nours / TRL: {ours['rate'] / trl['rate']:.2f}x the responses/s, "
        f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x the peak RSS"
    )


if __name__ == "__main__":
    main()
