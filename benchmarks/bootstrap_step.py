"""Where a bootstrap training step's time goes, and what would shorten it.

bootstrap's teacher training is most of the default `dvc repro` on 2 cores (README,
"Timing"). This times train_toy's step on the params.yaml model (`--role teacher` or
`student`), phase by phase, on the sequences bootstrap trains on (`sft_stream` of
`training_examples`, each made by `toymodels.sequence`), side by side in one run:

  padded                batches in stream order, right-padded, float32 (bootstrap before
                        packing; bootstrap.packing: false)
  length-sorted         the same sequences, all of them sorted by length, cut into
                        batches, batches shuffled: fewer pad tokens (a grouped sampler
                        sorting within a smaller pool gains less). Batches then group by
                        skill, so the training itself changes: tried in the pipeline,
                        the teacher then failed two skills (benchmarks/README.md)
  bf16 autocast         stream order, forward under torch.autocast(cpu, bfloat16)
  packed (bootstrap)    stream order, each batch's sequences packed into rows as wide
                        as its longest (distillflow/base/packing.py): the same
                        sequences per step, no work on padding; what bootstrap does
                        (bootstrap.packing: true)
  packed, compiled      packed, the model under torch.compile (dynamic shapes); its
                        compilation is in the warmup steps, not timed (not with
                        --quick unless asked for with --variant)

Making the sequences (drawing examples, corrupting, tokenizing: the same for every
variant) is timed once and printed in the header. Columns: collating, forward, backward,
optimizer (clip, AdamW, schedule), the step in all (making the sequences included), the
share of real tokens in the positions computed (padded or packed rows), and the step's
ratio to the padded one's at the
same thread count. Each
variant starts from the same freshly built model and optimizer; the first `--warmup` steps
are not timed. Benchmark on an idle machine: 2-thread torch under other load is 10-35x
slower (README, "Timing").

Run:
    python benchmarks/bootstrap_step.py                  # the teacher, 1 and 2 threads
    python benchmarks/bootstrap_step.py --role student
    python benchmarks/bootstrap_step.py --quick          # a few steps, a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distillflow.base import config, models, packing, params  # noqa: E402
from distillflow.stagekit import toymodels
from distillflow.training import basics  # noqa: E402
from stages import bootstrap  # noqa: E402

Batches = list[list[toymodels.Sequence]]
PAD = models.build_char_tokenizer().pad_token_id
VARIANTS = ("padded", "length-sorted", "bf16 autocast", "packed (bootstrap)", "packed, compiled")


def sequences(
    tok: object, task: object, role: str, mp: config.ToyModelParams, seed: int, n: int
) -> tuple[list[toymodels.Sequence], float]:
    """(the first n sequences bootstrap trains `role` on, seconds it took to make them).
    `seed` is the one bootstrap.run gives the role (teacher seed * 100, student + 1)."""
    stream = toymodels.sft_stream(toymodels.training_examples(task, seed, role), mp, seed)
    # The first draw collects a fixed SFT set (`examples` > 0) once: start-up, not a step's cost.
    stream = itertools.chain([next(stream)], stream)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    seqs = [toymodels.sequence(tok, e, rng, mp, task.alphabet) for e in itertools.islice(stream, n)]
    return seqs, time.perf_counter() - t0


def time_steps(
    tok: object,
    mp: config.ToyModelParams,
    seed: int,
    max_positions: int,
    batches: Batches,
    warmup: int,
    forward: Callable[[torch.nn.Module, object], torch.Tensor],
    compiled: bool = False,
) -> dict[str, float]:
    """Mean ms per timed step of each phase, the share of real tokens, and the seconds
    the warmup steps took in all (where torch.compile compiles)."""
    model = models.build_toy_model(toymodels.arch(mp), len(tok), tok, seed, max_positions)
    if compiled:
        model = torch.compile(model, dynamic=True)
    opt, sched = basics.optimizer_and_schedule(model, mp.lr, mp.warmup_steps, mp.steps)
    model.train()
    sums = {"collate": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    real = padded = 0
    started = time.perf_counter()
    for i, chunk in enumerate(batches):
        t0 = time.perf_counter()
        if i == warmup:
            warmup_s = t0 - started
        b, mask = toymodels._batch(tok, chunk)
        t1 = time.perf_counter()
        logits = forward(model, b)
        loss = F.cross_entropy(logits[mask], b.targets[mask])
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss.item()
        t4 = time.perf_counter()
        real += int(b.attention_mask.sum())
        padded += (
            packing.pack([(b.input_ids, b.attention_mask)], PAD).positions
            if forward is packed
            else b.attention_mask.numel()
        )
        if i >= warmup:
            for k, dt in zip(sums, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                sums[k] += dt
    timed = len(batches) - warmup
    out = {k: 1000.0 * v / timed for k, v in sums.items()}
    out["real_tokens"] = real / padded
    out["warmup_s"] = warmup_s
    return out


def fp32(model: torch.nn.Module, b: object) -> torch.Tensor:
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def packed(model: torch.nn.Module, b: object) -> torch.Tensor:
    """The logits of the packed rows, back in the padded layout (zeros at padding)."""
    p = packing.pack([(b.input_ids, b.attention_mask)], PAD)
    (logits,) = p.unpack(p.forward(model).logits)
    return logits


def bf16(model: torch.nn.Module, b: object) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--role", choices=("teacher", "student"), default="teacher")
    ap.add_argument("--steps", type=int, default=48, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variant", choices=VARIANTS, action="append", help="only these (default: all)")
    ap.add_argument("--quick", action="store_true", help="3 timed steps, 1 thread: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.threads = 3, 1, [1]
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    sections = params.load_sections(args.params, bootstrap.SECTIONS)
    p: config.BootstrapParams = sections["bootstrap"]
    mp, seed = (p.teacher, p.seed * 100) if args.role == "teacher" else (p.student, p.seed * 100 + 1)
    bs = mp.batch_size
    n_batches = args.steps + args.warmup
    tok = models.build_char_tokenizer()
    seqs, make_s = sequences(tok, sections["task"], args.role, mp, seed, n_batches * bs)
    stream = [seqs[i : i + bs] for i in range(0, len(seqs), bs)]
    by_len = sorted(seqs, key=lambda s: len(s[0]) + len(s[1]))
    sorted_batches = [by_len[i : i + bs] for i in range(0, len(by_len), bs)]
    random.Random(1).shuffle(sorted_batches)
    make_ms = 1000.0 * make_s / n_batches
    print(
        f"bootstrap {args.role}: {toymodels.arch(mp)}, batch {bs}, {args.steps} timed steps after {args.warmup}; "
        f"making the sequences (examples, corruption, tokenizing): {make_ms:.1f} ms per batch"
    )
    variants = [
        (name, batches, forward)
        for name, batches, forward in (
            ("padded", stream, fp32),
            ("length-sorted", sorted_batches, fp32),
            ("bf16 autocast", stream, bf16),
            ("packed (bootstrap)", stream, packed),
            ("packed, compiled", stream, packed),
        )
        if ((name in args.variant) if args.variant else not (args.quick and "compiled" in name))
    ]
    header = (
        f"{'threads':>7}  {'variant':<20} {'collate':>8} {'forward':>8} {'backward':>9} {'optim':>6} "
        f"{'step ms':>8} {'real tok':>9} {'vs padded':>13} {'warmup s':>9} {'steps s':>8}"
    )
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        torch.set_num_threads(threads)
        base = None
        for name, batches, forward in variants:
            r = time_steps(tok, mp, seed, p.max_positions, batches, args.warmup, forward, "compiled" in name)
            step = make_ms + r["collate"] + r["forward"] + r["backward"] + r["optimizer"]
            warm = r["warmup_s"] + args.warmup * make_ms / 1000.0  # making the sequences included, as in step
            base = step if base is None else base
            print(
                f"{threads:>7}  {name:<20} {r['collate']:>8.1f} {r['forward']:>8.1f} {r['backward']:>9.1f} "
                f"{r['optimizer']:>6.1f} {step:>8.1f} {r['real_tokens']:>9.2f} {step / base:>12.2f}x "
                f"{warm:>9.1f} {warm + (mp.steps - args.warmup) * step / 1000.0:>8.0f}"
            )
    print(
        f"(step ms: making the sequences + collate + forward + backward + optimizer; warmup s: the "
        f"first {args.warmup} steps in all, compilation included; steps s: the {mp.steps} steps of params.yaml, "
        f"the warmup's then the rest at the step's rate, without bootstrap's held-out measurements)"
    )


if __name__ == "__main__":
    main()
