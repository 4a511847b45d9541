"""round: one on-policy round after the first (rounds 2..E, `train.rounds`).

    python -m stages.round --params params.yaml --prompts data/seed --teacher data/teacher \
        --models data/bootstrap --previous data/train --out data/rounds/r2 \
        --metrics metrics/rounds/r2/round.json --live plots/rounds/r2/train --docs reports/quality/rounds/r2

Samples the student the previous round saved (--previous, a train output folder) on the
train prompts with the `student` settings and engine, pairs those samples with the
teacher's responses, curates them, scores them (the topk signal) and trains that
student on them, as the student, pairs, curate, score and train stages do, with the
same code and params (distillflow/stagekit/rounds.py, which the comparison cells call
too). Outputs under --out: student/, pairs/, curate/, score/ (each as its stage writes
it) and train/ (model/, curriculum.json, manifest.json, as the train stage writes
it); the metrics file holds each step's counts and the training summary. It loads the
student and teacher after sampling, so the sampling engine and the training models are
not both held by the time it trains (the vllm engine's memory is freed when it is
garbage-collected; vLLM has not run here yet).
The next round's --previous is this round's train/ folder. A killed round resumes its
sampling shards and its training checkpoint, and writes the same bytes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distillflow.stagekit import launch  # light: the params loader only

if __name__ == "__main__":  # under train.launcher, before the heavy imports below
    launch.relaunch("stages.round")

from distillflow.base import models, params
from distillflow.base.config import teachers_of
from distillflow.base.io import write_json
from distillflow.engines import sampling
from distillflow.stagekit import curating, entry, genstage, pairstep, rounds, scorestep, trainrun
from distillflow.training import distributed
from distillflow.training.train_params import TrainParams

log = logging.getLogger("round")

SECTIONS: dict[str, Any] = {
    **trainrun.TRAIN_SECTIONS,
    **genstage.sections("student"),
    **pairstep.PAIRS_SECTIONS,
    **curating.CURATE_SECTIONS,
    **scorestep.SCORE_SECTIONS,
}
PARAMS = tuple(SECTIONS)


def sampler(used: dict[str, Any], model: Path, work: Path) -> rounds.Sampler:
    """The previous round's saved student, sampled with the student section's engine in
    resumable shards under `work` (sampling.sample, as the student stage does)."""
    p, ref = used["student"], models.ModelRef(str(model), None)
    stats: dict[str, Any] = {}

    def generate(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
        return sampling.sample(
            "student", p, ref, prompts, Path(), work, trust_remote_code=trust, dtype=dtype, stats=stats
        )

    def describe(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return sampling.describe_model(p, ref, Path(), rows)

    return rounds.Sampler(p=p, generate=generate, describe=describe, model_input=model, stats=stats)


def main() -> None:
    args = entry.parse_paths(
        __doc__, "prompts", "teacher", "models", "previous", "out", "metrics", "live", optional=("docs",)
    )
    used = params.load_sections(args.params, SECTIONS)
    p: TrainParams = used["train"]
    trainrun.check_served(p, used["score"])
    teachers = teachers_of(used)
    trainrun.check_teachers(p, teachers)
    trust, dtype = used["models.trust_remote_code"], used["models.dtype"]
    e, curriculum = rounds.previous_round(args.previous, p)
    t_ref = used["models.teacher"].ref()
    t_dir = args.models / "teacher"
    m = trainrun.Models(
        models.ModelRef(str(args.previous / "model"), None),
        Path(),
        args.previous / "model",
        t_ref,
        t_dir,
        models.lineage_input(t_ref, args.models, "teacher"),
    )
    ri = rounds.RoundInputs(
        used=used,
        module="round",
        prompts_dir=args.prompts,
        teacher_file=args.teacher / "generations.parquet",
        teacher_info=scorestep.teacher_description(teachers, args.models, used["score"]),
        load_teacher=scorestep.teacher_loader((m.s_ref, m.s_dir), teachers, args.models, trust, dtype, used["score"]),
        docs=args.docs,
    )
    distributed.init_from_env(p.device)
    work = genstage.work_dir(args.out / "student")
    done = rounds.run_round(
        ri,
        lambda: trainrun.load_learner(p, m, trust, dtype),  # after sampling
        p,
        e,
        curriculum,
        args.out,
        sampler(used, args.previous / "model", work),
        checkpoint=lambda src: trainrun.checkpoint_for(p, src, m, dtype, args.out / "train"),
        live=args.live,
    )
    rank, _ = distributed.rank_and_size()
    distributed.finish()
    if rank != 0:
        return  # rank 0 wrote the round's data and writes what it trained
    shutil.rmtree(work)
    trained = trainrun.Trained(
        learner=done.learner,
        pairs=done.pairs,
        src=done.src,
        rows=done.rows,
        curriculum=curriculum,
        round_index=e,
        inputs=trainrun.lineage_inputs(done.src, args.out / "score" if p.teacher_signal == "topk" else None, m),
        validation=done.validation,
    )
    summary = trainrun.write_trained(args.out / "train", used, m, trained, "round")
    metrics = {**done.counts, "round": summary.pop("round"), "train": summary}
    write_json(args.metrics, metrics)
    assert done.checkpoint is not None  # run_round was given one
    done.checkpoint.clear()
    log.info("round %d: %d pairs, %s", e, len(done.pairs), done.seconds)


if __name__ == "__main__":
    entry.run_stage(main)
