"""Online on-policy sampling (distillflow/training/onpolicy.py, `train.online`): responses
per second, one prompt at a time against `batch_size` prompts decoded together, for the
student alone (opd) and mixed with the teacher (minillm's a p + (1 - a) q, both models
decoding).

The embedded default's student and teacher architectures (params.yaml `bootstrap`) with
random weights, or the trained ones from `--models DIR` (e.g. data/bootstrap), on the
toy task's prompts, `--max-new-tokens` at most per response. Each setting is timed
`--repeats` times in turn (load from other jobs falls on all alike); the table gives the
median and the batched/one-at-a-time ratio.

Run:
    python benchmarks/online_sampling.py [--models data/bootstrap] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from distillflow.base import models  # noqa: E402
from distillflow.base.config import TaskParams  # noqa: E402
from distillflow.base.encoding import prompt_ids  # noqa: E402
from distillflow.tasks.toy import toytask  # noqa: E402
from distillflow.training import onpolicy  # noqa: E402


def load_models(folder: Path | None) -> tuple[Any, Any, Any]:
    """(student, teacher, tokenizer): trained ones from `folder`, else random default-size ones."""
    if folder is not None:
        loaded = [
            models.load_model(models.ModelRef(str(folder / r), None), folder / r, False, "float32")
            for r in ("student", "teacher")
        ]
        return *loaded, models.load_tokenizer(models.ModelRef(str(folder / "student"), None), folder / "student", False)
    tok = models.build_char_tokenizer()
    boot = yaml.safe_load((ROOT / "params.yaml").read_text())["bootstrap"]
    out = []
    for seed, role in enumerate(("student", "teacher")):
        a = boot[role]
        arch = models.ToyArch(a["hidden_size"], a["num_layers"], a["num_heads"], a["intermediate_size"])
        out.append(models.build_toy_model(arch, len(tok), tok, seed=seed, max_positions=boot["max_positions"]).eval())
    return out[0], out[1], tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="16 prompts, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.repeats = 16, 1
    torch.set_num_threads(args.threads)
    student, teacher, tok = load_models(args.models)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["task"]
    task = toytask.config_of(TaskParams(**{**raw, "skills": tuple(raw["skills"])}))
    ids = [prompt_ids(tok, ex.prompt) for _, ex in zip(range(args.prompts), toytask.examples(task, 0))]
    stop = frozenset(models.stop_ids(student, tok))
    settings = [(bs, mix) for mix in (0.0, 0.2) for bs in (1, args.batch_size)]
    times: dict[tuple[int, float], list[float]] = {k: [] for k in settings}
    lengths: dict[tuple[int, float], float] = {}
    for _ in range(args.repeats):
        for bs, mix in settings:
            s = onpolicy.Sampler(
                vocab=len(tok),
                max_new_tokens=args.max_new_tokens,
                stop=stop,
                teacher_mix=mix,
                device="cpu",
                pad=tok.pad_token_id,
                batch_size=bs,
            )
            t0 = time.perf_counter()
            out = onpolicy.sample(student, teacher, ids, list(range(len(ids))), s)
            times[(bs, mix)].append(time.perf_counter() - t0)
            lengths[(bs, mix)] = sum(len(o[0]) for o in out) / len(out)
    print(
        f"{len(ids)} prompts, at most {args.max_new_tokens} new tokens, {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    print("| sampler | decoding | responses/s | mean length | batched / one at a time |")
    print("|---|---|---|---|---|")
    for mix in (0.0, 0.2):
        one = statistics.median(times[(1, mix)])
        for bs in (1, args.batch_size):
            t = statistics.median(times[(bs, mix)])
            what = "student (opd)" if mix == 0.0 else f"teacher mix a = {mix} (minillm)"
            print(f"| {what} | {bs} at once | {len(ids) / t:.1f} | {lengths[(bs, mix)]:.1f} | {one / t:.2f}x |")


if __name__ == "__main__":
    main()
