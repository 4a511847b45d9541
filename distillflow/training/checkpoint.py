"""Resumable training state: saved every `train.checkpoint_every` optimizer steps into
`<out>.checkpoints/state.pt`, restored only by a run with the same key (params, data and
both models), removed once the run is complete. A resumed run ends with the weights of
an uninterrupted one (the batch plan is a pure function of the seed, see train_params.batch_plan).

Under a launcher every rank saves and loads: with DDP rank 0 writes state.pt (every rank
holds the same weights) and every rank reads it; with FSDP2 the student's and
optimizer's shards go to `shards-<step>/` (torch.distributed.checkpoint, one file per
rank) and state.pt, written after them, names that folder."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distillflow.base import records
from distillflow.base.io import atomic_path
from distillflow.training import distributed
from distillflow.training.methods.distillm2 import AlphaCurriculum
from distillflow.training.train_params import TrainParams

log = logging.getLogger("train")


def run_key(p: TrainParams, pairs_digest: str, student_fp: str, teacher_fp: str, dtype: str) -> str:
    """What a checkpoint must match to be resumed: params, data, both models and
    `models.dtype` (the teacher runs in it; a hub model's fingerprint does not say it)."""
    blob = records.canonical_json(
        {"train": asdict(p), "pairs": pairs_digest, "student": student_fp, "teacher": teacher_fp, "dtype": dtype}
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def check_dtypes(file: Path, saved: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> None:
    """A checkpoint restores the float32 master weights exactly: load_state_dict would
    silently cast tensors of another dtype into the model's, so refuse them."""
    wrong = [
        f"{k} ({t.dtype}, the model has {model[k].dtype})"
        for k, t in saved.items()
        if k in model and t.dtype != model[k].dtype
    ]
    if wrong:
        raise ValueError(
            f"train: checkpoint {file} holds student weights of another dtype than the model being trained: "
            f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; delete it to start afresh"
        )


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its resume state (`folder`/state.pt) and the key it must match."""

    folder: Path
    key: str

    @staticmethod
    def beside(out: Path, key: str) -> Checkpoint:
        """The checkpoint folder of a stage writing `out`: `<out>.checkpoints/`, outside
        the (atomically written) output folder."""
        return Checkpoint(out.with_name(out.name + ".checkpoints"), key)

    @property
    def file(self) -> Path:
        return self.folder / "state.pt"

    def load(
        self,
        device: str,
        student: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LambdaLR,
        curriculum: AlphaCurriculum,
    ) -> tuple[int, list[dict[str, float]]]:
        """Restore a run saved by `save`; (next step, log rows so far), or (0, []) when
        there is no checkpoint or it belongs to another configuration."""
        if not self.file.is_file():
            return 0, []
        state = torch.load(self.file, map_location=device, weights_only=True)
        if state["key"] != self.key:
            log.warning(
                "train: ignoring checkpoint %s from another configuration (params, data or models changed)", self.file
            )
            return 0, []
        if "shards" in state:
            distributed.load_sharded(self.folder / state["shards"], student, opt)
        else:
            check_dtypes(self.file, state["student"], student.state_dict())
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        curriculum.gaps_t, curriculum.gaps_s = state["curriculum"]["gaps_t"], state["curriculum"]["gaps_s"]
        return state["step"], state["log"]

    def save(
        self,
        step: int,
        student: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LambdaLR,
        curriculum: AlphaCurriculum,
        log_rows: list[dict[str, float]],
    ) -> None:
        """Every rank calls it (see the module docstring)."""
        state: dict = {"key": self.key, "step": step}
        self.folder.mkdir(parents=True, exist_ok=True)
        if distributed.is_sharded(student):
            shards = f"shards-{step}"
            distributed.save_sharded(self.folder / shards, student, opt)
            state["shards"] = shards
        elif distributed.rank_and_size()[0] == 0:  # the one writer
            state.update(student=student.state_dict(), optimizer=opt.state_dict())
        state.update(scheduler=sched.state_dict(), curriculum=curriculum.state(), log=log_rows)
        if distributed.rank_and_size()[0] == 0:
            with atomic_path(self.file) as tmp:
                torch.save(state, tmp)
            for old in self.folder.glob("shards-*"):  # an earlier save's
                if old.name != state.get("shards"):
                    shutil.rmtree(old)
        distributed.barrier()

    def clear(self) -> None:
        """The run is complete: its resume state is no longer needed."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
