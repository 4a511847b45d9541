"""params.yaml `evaluate` and the schema of the predictions an evaluation writes."""

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
