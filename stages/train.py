"""train: distil the teacher into the student on the curated pairs.

    python -m stages.train --params params.yaml --pairs data/curate --scores data/score \
        --models data/bootstrap --out data/train --metrics metrics/train.json --live plots/train

`train.method` picks the objective (distillflow/training/methods/): `distillm2` (default),
`distillm`, `gkd`, `kd`, `kd_both`, `sft`, `dpkd`, `opd`, `minillm`, all on the same pairs with
the same loop (`train.online` samples the student's responses during the run). The
DistiLLM-2 objective (docs/METHOD.md), per pair i:

    L_i = (1 - beta) * SKL_seq(chosen_i; alpha_t,i) + beta * SRKL_seq(rejected_i; alpha_s,i)

with beta rising on a schedule and alpha adapted per sequence (switches:
`train.distillm2.contrastive`, `.beta_ramp`, `.adaptive_alpha`). Every optimizer step
is logged through DVCLive into the --live folder (loss, its parts, beta, alpha
mean/min/max, lr, grad norm: plots/metrics/<name>.tsv).

Memory: with `logits: chunked` the loss is computed chunk by chunk from the models'
final hidden states, so full (B, T, V) logits never exist. Long runs save a resumable
checkpoint every `checkpoint_every` steps into `<out>.checkpoints/`; a killed run picks
up from it (when params, data and models are unchanged) and ends with the same
weights as an uninterrupted run. The loop, checkpoints and logging live in
distillflow/training/ (trainer.py, shared with the comparison cells). The distilled
student is saved with save_pretrained (safetensors) in out/model.

Several processes: `train.launcher` (python | torchrun | accelerate, processes per node)
makes this command start itself under that launcher, and `train.parallel` picks DDP or
FSDP2 (distillflow/training/distributed.py, docs/training.md); the loss curve is one
process's for the same global batch. `bf16_autocast` and `gradient_checkpointing` are
for GPUs.

Precision: the student trains with float32 master weights whatever `models.dtype` says
(a bfloat16 weight would lose most AdamW updates at lr 1e-5); `train.bf16_autocast`
computes under bf16 autocast; out/model is saved in `models.dtype` (its config's `dtype`
says so). The teacher stays in `models.dtype` (frozen).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distillflow.stagekit import launch  # light: the params loader only

if __name__ == "__main__":  # under train.launcher, before the heavy imports below
    launch.relaunch("stages.train")

from distillflow.base import models, params
from distillflow.base.config import teachers_of
from distillflow.base.io import write_json
from distillflow.stagekit import entry, trainrun
from distillflow.training import distributed
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.train_params import TrainParams

log = logging.getLogger("train")

SECTIONS: dict[str, Any] = trainrun.TRAIN_SECTIONS
PARAMS = tuple(SECTIONS)


def log_done(round_index: int, p: TrainParams, rows: list[dict[str, float]], n_pairs: int, seconds: float) -> None:
    what = f"round {round_index} of {p.total_rounds}, {p.method}, {len(rows)} steps on {n_pairs} pairs"
    log.info("train: %s in %.1fs, final loss %.4f", what, seconds, rows[-1]["loss"])


def main() -> None:
    args = entry.parse_paths(__doc__, "pairs", "scores", "models", "out", "metrics", "live")
    used = params.load_sections(args.params, SECTIONS)
    p: TrainParams = used["train"]
    trainrun.check_served(p, used["score"])
    trainrun.check_teachers(p, teachers_of(used))
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    s_ref, t_ref = used["models.student"].ref(), used["models.teacher"].ref()
    m = trainrun.Models(
        s_ref,
        args.models / "student",
        models.lineage_input(s_ref, args.models, "student"),
        t_ref,
        args.models / "teacher",
        models.lineage_input(t_ref, args.models, "teacher"),
    )
    distributed.init_from_env(p.device)
    run = trainrun.prepare(p, used["quality"], args.pairs / "curated.parquet", args.scores, m, trust, dtype, args.out)
    curriculum = AlphaCurriculum(p.distillm2)
    t0 = time.perf_counter()
    job = trainrun.job(
        run,
        p,
        1,
        curriculum,
        pairs=run.pairs,
        scores=run.scores,
        checkpoint=run.checkpoint,
        live=args.live,
        score=used["score"],
    )
    rows = trainrun.train(run, job)
    rank, _ = distributed.rank_and_size()
    distributed.finish()
    if rank != 0:
        return  # every process holds the same weights and logs; one writes them
    log_done(1, p, rows, len(run.pairs), time.perf_counter() - t0)
    done = trainrun.Trained(
        learner=run,
        pairs=run.pairs,
        src=run.src,
        rows=rows,
        curriculum=curriculum,
        round_index=1,
        inputs=trainrun.lineage_inputs(run.src, args.scores if run.scores is not None else None, m),
        validation=run.validation,
    )
    metrics = trainrun.write_trained(args.out, used, m, done, "train")
    write_json(args.metrics, metrics)
    run.checkpoint.clear()


if __name__ == "__main__":
    entry.run_stage(main)
