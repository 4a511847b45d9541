"""params.yaml `evaluate`, the schema of the predictions an evaluation writes and of a
comparison cell's per-prompt scores."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from distillflow.base import records
from distillflow.base.config import Device, GenerationParams
from distillflow.base.params import check

PREDICTION_SCHEMA = records.schema(
    "prediction",
    [
        pa.field("model", pa.string(), nullable=False),  # teacher | student_initial | student_distilled
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("response", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=True),  # null where there is no reference
    ],
)


# The comparison's per-prompt scores (one row per eval prompt, the eval file's order):
# every metric the report tests is a ratio of sums of these over prompts, so a paired
# resample of the prompts recomputes it (distillflow/evaluation/analysis.py).
PROMPT_SCORES = records.schema(
    "prompt_scores",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        # the prompt's group (seed.group_by: the toy task's instance); the report resamples
        # groups, so phrasings of one instance count as one draw; null: its own group
        pa.field("group", pa.string(), nullable=True),
        pa.field("correct", pa.bool_(), nullable=True),  # the student's greedy answer; null: no reference
        pa.field("steps_right", pa.int64(), nullable=True),  # null: not a step skill
        pa.field("steps", pa.int64(), nullable=True),
        pa.field("rouge_l", pa.float64(), nullable=False),  # vs the reference teacher's greedy response
        # teacher-forced on the reference teacher's greedy response: sums over its tokens
        pa.field("kl_sum", pa.float64(), nullable=False),  # KL(teacher || student)
        pa.field("agree_sum", pa.float64(), nullable=False),  # positions where both argmaxes agree
        pa.field("nll_teacher_sum", pa.float64(), nullable=False),  # the student's NLL
        pa.field("teacher_tokens", pa.int64(), nullable=False),
        pa.field("nll_own_sum", pa.float64(), nullable=False),  # on its own greedy response
        pa.field("own_tokens", pa.int64(), nullable=False),
        pa.field(
            "nll_sampled_sum", pa.float64(), nullable=False
        ),  # on its response sampled at the training temperature
        pa.field("sampled_tokens", pa.int64(), nullable=False),
        pa.field("teacher_correct", pa.bool_(), nullable=True),  # the reference teacher's greedy answer
        pa.field("initial_correct", pa.bool_(), nullable=True),  # the initial student's greedy answer
    ],
)


@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    """params.yaml `evaluate`."""

    batch_size: int  # prompts (or sequences scored) per batch
    max_new_tokens: int  # response budget of the eval generations
    temperature: float  # 0 = greedy (the default for accuracy)
    seed: int  # sampling seed (matters only with temperature > 0)
    speculative_prompts: int  # eval prompts run through assisted generation (student drafts for teacher); 0 = off
    draft_tokens: int  # tokens the student drafts per teacher verification
    device: Device  # where the models and batches run (generation, teacher-forced scores, speculative decoding)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.speculative_prompts >= 0, "speculative_prompts", "must be >= 0 (0 = off)")
        check(self.draft_tokens >= 1, "draft_tokens", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")

    def generation(self) -> GenerationParams:
        return GenerationParams(
            engine="transformers",
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=1.0,
            num_samples=1,
            seed=self.seed,
            tensor_parallel_size=1,
            device=self.device,
        )
