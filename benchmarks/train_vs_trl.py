"""Our train loop against TRL 1.16's distillation trainers: samples/s, peak memory, loss curves.

The same distillation run, side by side in one invocation, on identical models, data,
batches, optimizer and loss:

  ours            distillflow.training.trainer.train (the train stage's loop) with
                  `train.method: gkd` (lmbda 0, so every pair trains on the teacher's
                  response) for the generalized JSD, `kd` (forward KL on the teacher's
                  response) for forward KL; sequences packed into rows (train.packing)
  ours, padded    the same with train.packing off: right-padded batches, the path
                  before packing (the ratio row is packed over padded)
  TRL GKDTrainer  trl.experimental.gkd.GKDTrainer with generation off: lmbda 0 (never
                  the student's samples), seq_kd off (never the teacher's samples), so it
                  trains on the stored teacher responses of the dataset; beta 0.5 is the
                  generalized JSD, beta 0 its forward-KL path (F.kl_div of the student's
                  log-probs against the teacher's)
  TRL Distillation  trl.DistillationTrainer (stable, trl/trainer/distillation_trainer.py)
                  when `--distillation` is given: its API trains on-policy only (it always
                  generates the completions with the student; the dataset holds prompts
                  only, there is no lmbda and no completion column), so it cannot do this
                  work as published. The row runs it with its private
                  `_generate_single_turn` overridden to hand back the stored teacher
                  responses instead of sampling, which leaves its own loss path (the
                  chunked generalized JSD from hidden states) doing the same work; it is
                  TRL's code, but not its supported API

Both losses: generalized JSD at beta 0.5 (m = beta p + (1 - beta) q, TRL's convention,
which ours follows) and forward KL. What is held equal, and how:

  models      one teacher and one student, built here (the params.yaml toy sizes, or
              the tests' tiny Llamas with --quick), saved once with save_pretrained;
              every run loads the same saved weights in float32, teacher frozen. No
              dropout anywhere (Llama's attention dropout is 0; TRL's disable_dropout)
  data        toy-task prompt/response pairs (distillflow.tasks.toy), the response the
              teacher's ("chosen") and a corrupted one ("rejected"). Ours reads the pairs;
              TRL reads the same pairs as conversational `messages` rows (the GKD dataset
              format, tokenized by its collator every step), or with --trl-data tokenized,
              as our token ids with a completion mask. Each TRL run first checks that its
              collator gives exactly our token sequences and loss positions (ours: right
              padded, TRL: left padded; Llama's rotary attention depends on relative
              positions only, so the logits agree to float rounding)
  order       our batch plan (train_params.batch_plan: the seeded shuffle) is computed
              here and the TRL dataset is written in that order; TRL reads it with
              train_sampling_strategy "sequential", so step t sees the same pairs on both
              sides. The pair count is a multiple of the batch size (no short batch)
  optimizer   the same object on both sides: basics.optimizer_and_schedule (AdamW, betas
              0.9/0.98, eps 1e-8, no weight decay, cosine decay to 0 over the run, no
              warmup), handed to TRL through `optimizers=`; grad clipping by total norm at
              train.max_grad_norm on both; batch size as given, no gradient accumulation,
              float32 compute (TRL's bf16 and gradient-checkpointing defaults turned off),
              one seed
  loss        a mean over every response token of the batch: ours `reduction:
              token_mean`, TRL's GKD "batchmean" over `labels != -100` after the causal
              shift, divided by transformers' num_items_in_batch, which is that same count
              with no accumulation; DistillationTrainer divides by the completion tokens.
              Our default `sequence_mean` (mean per pair, then over pairs) has no TRL
              counterpart, so it is not used here. Temperature 1: GKDTrainer's loss never
              applies its `temperature` (that is generation's), ours has none, and
              DistillationTrainer's is set to 1

What does not line up, printed with the results:

  work        equal: ours with method gkd at lmbda 0 runs the teacher's responses only
              (Method.reads: the student's would get no loss weight), as TRL does
  logits      ours computes the divergence chunk by chunk from the final hidden states
              (train.logits chunked, params.yaml); GKDTrainer materialises the full
              (B, T, V) logits of both models over every position

Measurement: every (loss, trainer) runs in its own subprocess, so the peak RSS
(getrusage ru_maxrss: imports and model loading included) is that trainer's; "train
+MiB" is the peak during training over the RSS just before it (VmHWM reset through
/proc/self/clear_refs). The first `--warmup` optimizer steps (the loops' own setup
included) are not timed; samples/s = pairs of the next `--steps` steps over their wall
time, taken after each optimizer step (our on_step hook, a TrainerCallback's
on_step_end). Both sides log the loss every step (TRL: logging_steps 1); tqdm is off on
both. The loss curves are compared step by step over the first `--compare-steps` steps
(default: every step run): max |loss_ours[t] - loss_trl[t]| against 1e-3. With
`--repeats R` each trainer runs R times, in turn, and the best samples/s is kept. Where
ours falls short of `--target` times TRL's samples/s, a cProfile of our timed steps
follows (a separate run, so profiling does not slow the timed ones).

Run:
    python benchmarks/train_vs_trl.py                 # the params.yaml toy models, batch 32
    python benchmarks/train_vs_trl.py --distillation  # also TRL's DistillationTrainer (see above)
    python benchmarks/train_vs_trl.py --quick         # tiny models, a few steps: a smoke test

Needs `trl` (1.16) and `accelerate`: `pip install -c constraints/cpu.lock -e ".[bench]"`.
Threads: `--threads` (default 1) for every run. Benchmark on an idle machine: on a loaded one the absolute figures mean
little and the ratios are noisy.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TQDM_DISABLE"] = "1"  # both loops' progress bars (and save_pretrained's) off, here and in the children

import torch  # noqa: E402

from distillflow.base import encoding, models, params  # noqa: E402
from distillflow.base.config import BootstrapParams, TaskParams  # noqa: E402
from distillflow.stagekit import toymodels  # noqa: E402
from distillflow.tasks.toy import toytask  # noqa: E402
from distillflow.training import basics, trainer  # noqa: E402
from distillflow.training.methods.gkd import GKDParams  # noqa: E402
from distillflow.training.train_params import TrainParams, batch_plan, round_seed  # noqa: E402

LOSSES = {"jsd": 0.5, "fkl": 0.0}  # name -> GKD beta (TRL's convention, and ours)
OUR_METHOD = {"jsd": "gkd", "fkl": "kd"}
TRAINERS = ("ours", "ours_padded", "gkd", "distillation")
LABELS = {
    "ours": "ours",
    "ours_padded": "ours, padded",
    "gkd": "TRL GKDTrainer",
    "distillation": "TRL DistillationTrainer*",
}
SHORT = {"ours_padded": "ours, padded", "gkd": "GKD", "distillation": "Distillation*"}  # in the ratio rows
TOLERANCE = 1e-3  # the largest per-step loss difference the curves may show


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One trainer's run, handed to its subprocess as JSON."""

    trainer: str  # one of TRAINERS
    loss: str  # a key of LOSSES
    folder: str  # models/, pairs.json, order.json
    params: str  # params.yaml: train's other settings (logits, chunk_size)
    seed: int
    batch_size: int
    steps: int  # optimizer steps in all: warm-up and timed
    lr: float
    max_grad_norm: float
    logits: str
    threads: int
    trl_data: str  # messages | tokenized
    profile_from: int  # ours only: profile from this step on; -1: no profile
    out: str  # where the child writes its result (JSON)


# ------------------------------------------------------------------ models and data


def build_models(folder: Path, quick: bool, sections: dict[str, Any]) -> tuple[str, str]:
    """Teacher and student saved under folder/teacher, folder/student; their sizes."""
    tok = models.build_char_tokenizer()
    boot: BootstrapParams = sections["bootstrap"]
    if quick:  # tests/conftest.py's tiny Llamas
        archs = {
            "teacher": models.ToyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
            "student": models.ToyArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        }
        max_positions = 128
    else:  # the pipeline's toy models (params.yaml bootstrap)
        archs = {"teacher": toymodels.arch(boot.teacher), "student": toymodels.arch(boot.student)}
        max_positions = boot.max_positions
    for role, seed in (("teacher", 0), ("student", 1)):
        model = models.build_toy_model(archs[role], len(tok), tok, seed=seed, max_positions=max_positions)
        basics.save_model(model, tok, folder / role)
    return str(archs["teacher"]), str(archs["student"])


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong response of about the answer's length: one digit or letter changed."""
    spots = [i for i, c in enumerate(answer) if c.isalnum()]
    if not spots:
        return answer + "0"
    i = rng.choice(spots)
    pool = "0123456789" if answer[i].isdigit() else "abcdefghij"
    return answer[:i] + rng.choice([c for c in pool if c != answer[i]]) + answer[i + 1 :]


def make_pairs(task: TaskParams, n: int, seed: int) -> list[dict[str, Any]]:
    """n curated-pair records from the toy task: the answer as the teacher's response."""
    rng = random.Random(seed)
    stream = toytask.examples(toytask.config_of(task), seed)
    out = []
    for i, ex in zip(range(n), stream):
        out.append(
            {
                "pair_id": f"pair-{i}",
                "prompt": ex.prompt,
                "chosen": ex.answer,
                "rejected": corrupt(ex.answer, rng),
                "chosen_finish_reason": "stop",
                "chosen_token_ids": None,  # no sampled ids: the text is tokenized
                "rejected_token_ids": None,
                "rejected_finish_reason": "stop",
            }
        )
    return out


def train_params(spec: Spec) -> TrainParams:
    """params.yaml `train` with this benchmark's settings (see the module docstring)."""
    base: TrainParams = params.load_sections(Path(spec.params), {"train": TrainParams})["train"]
    return replace(
        base,
        method=OUR_METHOD[spec.loss],
        seed=spec.seed,
        epochs=1,
        batch_size=spec.batch_size,
        grad_accum_steps=1,
        lr=spec.lr,
        warmup_steps=0,
        max_grad_norm=spec.max_grad_norm,
        reduction="token_mean",
        logits=spec.logits,  # type: ignore[arg-type]
        device="cpu",
        bf16_autocast=False,
        gradient_checkpointing=False,
        packing=spec.trainer != "ours_padded",  # params.yaml's (on) for ours; "ours, padded" turns it off
        checkpoint_every=0,
        teacher_signal="online",
        gkd=GKDParams(beta=LOSSES[spec.loss], lmbda=0.0),
        rounds={},
    )


def load_all(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module, Any, list[dict[str, Any]], list[int]]:
    """(student, teacher, tokenizer, pairs, TRL's row order) as every run reads them."""

    def load(role: str) -> tuple[torch.nn.Module, Any]:
        ref = models.ModelRef(str(folder / role), None)
        return models.load_model(ref, folder / role, False, "float32"), models.load_tokenizer(ref, folder / role, False)

    student, tok = load("student")
    teacher, _ = load("teacher")
    pairs = json.loads((folder / "pairs.json").read_text())
    order = json.loads((folder / "order.json").read_text())
    return student, teacher, tok, pairs, order


# ------------------------------------------------------------------ memory


def reset_peak_rss() -> float:
    """Set the process's peak RSS (VmHWM) to its current RSS; that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field} line; the memory figures need Linux")


# ------------------------------------------------------------------ the children


def run_ours(spec: Spec) -> dict[str, Any]:
    student, teacher, tok, pairs, order = load_all(Path(spec.folder))
    p = train_params(spec)
    stamps: list[float] = []
    prof = cProfile.Profile() if spec.profile_from >= 0 else None

    def on_step(step: int) -> None:
        stamps.append(time.perf_counter())
        if prof is not None and step + 1 == spec.profile_from:
            prof.enable()

    job = trainer.Job(student=student, teacher=teacher, tok_s=tok, tok_t=tok, pairs=pairs, p=p, on_step=on_step)
    start_rss = reset_peak_rss()
    rows = trainer.train(job)
    if prof is not None:
        prof.disable()
    plan = [i for step in batch_plan(len(pairs), p, round_seed(p.seed, 1)) for micro in step for i in micro]
    if plan != order:
        raise RuntimeError("our batch plan differs from the order the TRL dataset was written in")
    out = result(stamps, [r["loss"] for r in rows], start_rss)
    if prof is not None:
        out["profile"] = profile_text(prof, len(stamps) - spec.profile_from)
    return out


def trl_rows(pairs: list[dict[str, Any]], order: list[int], tok: Any, fmt: str) -> list[dict[str, Any]]:
    """The pairs as TRL dataset rows, in our batch plan's order: the teacher's response only."""
    rows = []
    for i in order:
        pr = pairs[i]
        if fmt == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": pr["prompt"]},
                        {"role": "assistant", "content": pr["chosen"]},
                    ]
                }
            )
        else:
            p_ids, c_ids, _ = encoding.encode_pair(tok, pr)
            rows.append(
                {
                    "prompt": pr["prompt"],
                    "input_ids": p_ids + c_ids,
                    "completion_mask": [0] * len(p_ids) + [1] * len(c_ids),
                }
            )
    return rows


def check_same_sequences(batch: dict[str, torch.Tensor], pairs: list[dict[str, Any]], idx: list[int], tok: Any) -> None:
    """TRL's collated batch holds our token sequences, scored at our response positions."""
    for row, i in enumerate(idx):
        p_ids, c_ids, _ = encoding.encode_pair(tok, pairs[i])
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        labels = batch["labels"][row, 1:]
        scored = labels[labels != -100].tolist()
        if ids != p_ids + c_ids or scored != c_ids:
            raise RuntimeError(f"pair {i}: TRL's collator gives other tokens than ours ({ids} / {scored})")


def trl_config(spec: Any, cls: type, output_dir: str, **kw: Any) -> Any:
    """The TrainingArguments both TRL trainers share (see the module docstring); `spec`
    gives batch_size, steps, lr, max_grad_norm and seed (also online_vs_trl.py's)."""
    return cls(
        output_dir=output_dir,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        learning_rate=spec.lr,  # unused: the optimizer is passed in
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        train_sampling_strategy="sequential",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **kw,
    )


def run_trl(spec: Spec) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback

    student, teacher, tok, pairs, order = load_all(Path(spec.folder))
    beta = LOSSES[spec.loss]
    stamps: list[float] = []

    class Stamps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

    opt, sched = basics.optimizer_and_schedule(student, spec.lr, 0, spec.steps)
    out_dir = str(Path(spec.folder) / f"trl-{spec.trainer}-{spec.loss}")  # nothing is saved there
    if spec.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = trl_config(spec, GKDConfig, out_dir, lmbda=0.0, beta=beta, seq_kd=False, temperature=1.0)
        rows = trl_rows(pairs, order, tok, spec.trl_data)
        run = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            optimizers=(opt, sched),
            callbacks=[Stamps()],
        )
        for s in range(0, len(rows), spec.batch_size):  # every batch, before the clock starts
            batch = run.data_collator(rows[s : s + spec.batch_size])
            check_same_sequences(batch, pairs, order[s : s + spec.batch_size], tok)
    else:
        run = distillation_trainer(spec, student, teacher, tok, pairs, order, (opt, sched), Stamps(), out_dir)
    start_rss = reset_peak_rss()
    run.train()
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    return result(stamps, losses, start_rss)


def distillation_trainer(
    spec: Spec,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tok: Any,
    pairs: list[dict[str, Any]],
    order: list[int],
    optimizers: tuple[Any, Any],
    stamps: Any,
    out_dir: str,
) -> Any:
    """TRL's DistillationTrainer, its generation replaced by the stored teacher responses
    (a private override: its API generates on-policy only)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    queue = [encoding.encode_pair(tok, pairs[i]) for i in order]

    class OfflineDistillation(DistillationTrainer):
        cursor = 0

        def _generate_single_turn(
            self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any, has_tool_images: bool = False
        ) -> list[list[int]]:
            batch = queue[self.cursor : self.cursor + len(prompt_ids)]
            self.cursor += len(prompt_ids)
            if [list(p) for p in prompt_ids] != [b[0] for b in batch]:
                raise RuntimeError("DistillationTrainer's prompts are not ours, in our order")
            return [b[1] for b in batch]

    args = trl_config(
        spec,
        DistillationConfig,
        out_dir,
        beta=LOSSES[spec.loss],
        temperature=1.0,
        shuffle_dataset=False,
        max_completion_length=max(len(q[1]) for q in queue),
    )
    rows = [{"prompt": [{"role": "user", "content": pairs[i]["prompt"]}]} for i in order]
    return OfflineDistillation(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        optimizers=optimizers,
        callbacks=[stamps],
    )


def result(stamps: list[float], losses: list[float], start_rss: float) -> dict[str, Any]:
    return {
        "stamps": stamps,
        "losses": losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "train_mib": status_mib("VmHWM") - start_rss,
        "threads": torch.get_num_threads(),  # after training: no library may have changed it
    }


def profile_text(prof: cProfile.Profile, steps: int, lines: int = 15) -> str:
    """Our timed steps' profile: the loop's phases (cumulative), then where the time is spent."""
    stats = pstats.Stats(prof)
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = max(sum(v[2] for v in table.values()), 1e-12)
    phases = {
        "collate (encoding.collate)": ("distillflow/base/encoding.py", "collate"),
        "forward, both models (trainer.sides)": ("distillflow/training/trainer.py", "sides"),
        "  one response through both (trainer.side)": ("distillflow/training/trainer.py", "side"),
        "loss (method.loss)": ("distillflow/training/methods/", "loss"),
        "backward (Tensor.backward)": ("torch/_tensor.py", "backward"),
        "grad clip (clip_grad_norm_)": ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
        "optimizer (AdamW.step)": ("torch/optim/adam", "step"),
        "schedule (LRScheduler.step)": ("torch/optim/lr_scheduler.py", "step"),
    }
    buf = io.StringIO()
    buf.write(f"our loop, {steps} timed steps under cProfile ({total:.2f} s profiled):\n")
    buf.write(f"  {'phase':<46} {'calls/step':>10} {'ms/step':>9} {'share':>6}\n")
    for name, (path, func) in phases.items():
        hits = [v for (f, _, fn), v in table.items() if path in f and fn == func]
        calls = sum(v[1] for v in hits)
        cum = max((v[3] for v in hits), default=0.0) if func != "side" else sum(v[3] for v in hits)
        buf.write(
            f"  {name:<46} {calls / max(steps, 1):>10.1f} {1000 * cum / max(steps, 1):>9.2f} {cum / total:>6.0%}\n"
        )
    buf.write(f"  top {lines} functions by own time:\n")
    body = io.StringIO()
    pstats.Stats(prof, stream=body).strip_dirs().sort_stats("tottime").print_stats(lines)
    keep = [ln for ln in body.getvalue().splitlines() if ln.strip() and not ln.lstrip().startswith(("Ordered", "List"))]
    buf.write("\n".join("    " + ln.strip() for ln in keep[1:]) + "\n")
    return buf.getvalue()


def child(spec_file: Path) -> None:
    spec = Spec(**json.loads(spec_file.read_text()))
    torch.set_num_threads(spec.threads)
    out = run_ours(spec) if spec.trainer in ("ours", "ours_padded") else run_trl(spec)
    Path(spec.out).write_text(json.dumps(out))


# ------------------------------------------------------------------ the parent


def spawn(spec: Spec, work: Path) -> dict[str, Any]:
    label = f"{LABELS[spec.trainer]} ({spec.loss})"
    return run_child(Path(__file__), spec, work / f"spec-{spec.trainer}-{spec.loss}.json", label)


def run_child(script: Path, spec: Any, spec_file: Path, label: str) -> dict[str, Any]:
    """`script --child spec_file` in a process of its own (its own peak RSS), `spec` (a
    dataclass with `threads` and `out`) written to `spec_file`: the result it wrote to
    spec.out. Also benchmarks/online_vs_trl.py's."""
    spec_file.write_text(json.dumps(asdict(spec)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec.threads),
        "MKL_NUM_THREADS": str(spec.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(script.resolve()), "--child", str(spec_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{label} failed with exit code {done.returncode}")
    return json.loads(Path(spec.out).read_text())


def samples_per_s(r: dict[str, Any], warmup: int, batch_size: int) -> float:
    stamps = r["stamps"]
    return (len(stamps) - warmup) * batch_size / (stamps[-1] - stamps[warmup - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--compare-steps", type=int, default=None, help="steps the loss curves are compared over")
    ap.add_argument("--lr", type=float, default=None, help="default: params.yaml train.lr")
    ap.add_argument("--logits", choices=("chunked", "full"), default=None, help="ours; default: params.yaml")
    ap.add_argument("--losses", nargs="+", choices=tuple(LOSSES), help="default: both; jsd with --quick")
    ap.add_argument("--distillation", action="store_true", help="also TRL's DistillationTrainer (private override)")
    ap.add_argument("--trl-data", choices=("messages", "tokenized"), default="messages")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per trainer; the best samples/s is kept")
    ap.add_argument("--target", type=float, default=1.5, help="the samples/s ratio ours/TRL aimed at")
    ap.add_argument("--no-profile", action="store_true", help="no profile even when ours is short of --target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny models, batch 8, 2 + 4 steps, jsd: a smoke test")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = 8, 4, 2, 1
    if args.losses is None:
        args.losses = ["jsd"] if args.quick else list(LOSSES)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1 or args.repeats < 1:
        ap.error("--steps, --warmup, --batch-size and --repeats must be >= 1")

    sections = params.load_sections(
        args.params, {"task": TaskParams, "bootstrap": BootstrapParams, "train": TrainParams}
    )
    train: TrainParams = sections["train"]
    lr = args.lr if args.lr is not None else train.lr
    total = args.warmup + args.steps
    compare = min(args.compare_steps or total, total)
    trainers = [t for t in TRAINERS if t != "distillation" or args.distillation]
    with tempfile.TemporaryDirectory(prefix="train-vs-trl-") as tmp:
        work = Path(tmp)
        teacher_arch, student_arch = build_models(work, args.quick, sections)
        pairs = make_pairs(sections["task"], total * args.batch_size, args.seed)
        (work / "pairs.json").write_text(json.dumps(pairs))
        specs = {
            (t, loss): Spec(
                trainer=t,
                loss=loss,
                folder=str(work),
                params=str(args.params),
                seed=args.seed,
                batch_size=args.batch_size,
                steps=total,
                lr=lr,
                max_grad_norm=train.max_grad_norm,
                logits=args.logits or train.logits,
                threads=args.threads,
                trl_data=args.trl_data,
                profile_from=-1,
                out=str(work / f"result-{t}-{loss}.json"),
            )
            for loss in args.losses
            for t in trainers
        }
        p = train_params(next(iter(specs.values())))
        order = [i for step in batch_plan(len(pairs), p, round_seed(p.seed, 1)) for micro in step for i in micro]
        (work / "order.json").write_text(json.dumps(order))
        lengths = [
            len(a) + len(b) for a, b, _ in (encoding.encode_pair(models.build_char_tokenizer(), q) for q in pairs)
        ]
        print(
            f"teacher {teacher_arch}\nstudent {student_arch}\n"
            f"{len(pairs)} pairs, {sum(lengths) / len(lengths):.0f} tokens a sequence (prompt + teacher response); "
            f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, lr {lr}, "
            f"max_grad_norm {train.max_grad_norm}, our logits: {args.logits or train.logits}, TRL data: "
            f"{args.trl_data}, {args.threads} thread(s), best of {args.repeats}"
        )
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(args.repeats):
            for key, spec in specs.items():
                r = spawn(spec, work)
                r["samples_s"] = samples_per_s(r, args.warmup, args.batch_size)
                if key not in results or r["samples_s"] > results[key]["samples_s"]:
                    results[key] = r
        short = report(results, args, trainers, compare)
        if short and not args.no_profile:
            for loss in short:
                spec = replace(specs[("ours", loss)], profile_from=args.warmup, out=str(work / f"profile-{loss}.json"))
                print(f"\n{loss}: ours is short of {args.target}x TRL GKDTrainer's samples/s; where its time goes")
                print(spawn(spec, work)["profile"], end="")


def report(
    results: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace, trainers: list[str], n: int
) -> list[str]:
    """Print the table; the losses where ours is short of the target against GKDTrainer."""
    header = (
        f"{'loss':<16} {'trainer':<26} {'samples/s':>10} {'peak RSS MiB':>13} {'train +MiB':>11} "
        f"{'loss[0]':>9} {'loss[last]':>10} {'max |dloss|':>12}"
    )
    print(header)
    print("-" * len(header))
    short = []
    for loss in args.losses:
        ours = results[("ours", loss)]
        diffs = {}
        for t in trainers:
            r = results[(t, loss)]
            if len(r["losses"]) != len(ours["losses"]) or r["threads"] != args.threads:
                raise SystemExit(
                    f"{LABELS[t]}: {len(r['losses'])} losses (ours {len(ours['losses'])}), {r['threads']} threads "
                    f"(asked {args.threads}): not the same run"
                )
            diffs[t] = max(abs(a - b) for a, b in zip(ours["losses"][:n], r["losses"][:n]))
            name = f"{loss} (beta {LOSSES[loss]})" if t == "ours" else ""
            print(
                f"{name:<16} {LABELS[t]:<26} {r['samples_s']:>10.1f} {r['peak_rss_mib']:>13.0f} "
                f"{r['train_mib']:>11.1f} {r['losses'][0]:>9.5f} {r['losses'][-1]:>10.5f} "
                f"{'' if t == 'ours' else f'{diffs[t]:.2e}':>12}"
            )
        for t in trainers[1:]:
            r = results[(t, loss)]
            ratio = ours["samples_s"] / r["samples_s"]
            rss = ours["peak_rss_mib"] / r["peak_rss_mib"]
            train_mib = ours["train_mib"] / max(r["train_mib"], 1e-9)
            verdict = "within" if diffs[t] <= TOLERANCE else "OUTSIDE"
            print(
                f"{'':<16} {'ours / ' + SHORT[t]:<26} {ratio:>9.2f}x {rss:>12.2f}x {train_mib:>10.2f}x   "
                f"loss curves {verdict} {TOLERANCE:g}"
            )
            if t == "gkd" and ratio < args.target:
                short.append(loss)
    print(
        f"(samples/s: pairs of the timed steps over their wall time; peak RSS: the whole process, imports and models "
        f"included; train +MiB: peak during training over the RSS before it; max |dloss|: the largest per-step "
        f"difference from our loss curve over the first {n} steps)"
    )
    if args.distillation:
        print(
            "* DistillationTrainer generates on-policy only; here its private _generate_single_turn hands back the "
            "stored teacher responses (not its public API)"
        )
    return short


if __name__ == "__main__":
    main()
