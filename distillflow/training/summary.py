"""What a training run reports: one log row per optimizer step, written through DVCLive
(`LiveLog`), and the run summary that goes into the metrics file (`run_summary`).

DVCLive writes one `plots/metrics/<name>.tsv` per logged value (columns step and the
value) under its folder, e.g. plots/train/plots/metrics/loss.tsv. It runs with no
timestamps, no dvc.yaml, no report, no experiment and no summary file, so a rerun
writes the same bytes and dvc.yaml stays the one hand-written DAG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillflow.base import encoding
from distillflow.training.methods import METHODS
from distillflow.training.train_params import TrainParams


class LiveLog:
    """The per-step log of one run in a DVCLive folder. Opening it empties the folder's
    DVCLive files; a resumed run logs the rows restored from its checkpoint again."""

    def __init__(self, folder: Path) -> None:
        from dvclive import Live  # imported here: only the training stages need it

        self.live = Live(str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)

    def log(self, row: dict[str, float]) -> None:
        """One optimizer step: every value but the step, rounded to 6 decimals."""
        self.live.step = int(row["step"])
        for k, v in row.items():
            if k != "step":
                self.live.log_metric(k, round(v, 6) if isinstance(v, float) else v, timestamp=False)


def run_summary(rows: list[dict[str, float]], n_pairs: int, method: str) -> dict[str, Any]:
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
    if "sampled_tokens" in rows[-1]:  # train.online: response tokens the student sampled during the run
        out["sampled_tokens"] = int(rows[-1]["sampled_tokens"])
    return out


def tokens_trained(tok: Any, pairs: list[dict[str, Any]], p: TrainParams, sampled: int | None = None) -> int:
    """Tokens the student ran forward on: prompt + chosen for the methods that read the
    teacher's responses, prompt + rejected for those that read the student's, per pair,
    times epochs. With train.online, `sampled` (the run's `sampled_tokens`, all epochs)
    takes the place of the stored rejected responses' tokens."""
    method = METHODS[p.method]
    reads_chosen, reads_rejected = method.sides(method.section(p))
    total = 0
    for pr in pairs:
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        total += (len(prompt) + len(chosen)) if reads_chosen else 0
        total += (len(prompt) + (len(rejected) if sampled is None else 0)) if reads_rejected else 0
    return total * p.epochs + (sampled if sampled is not None and reads_rejected else 0)
