"""Params sections shared by several stages (`models`, `task`, generation settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.lib.models import ModelRef
from stages.lib.params import check
from stages.lib.toytask import SKILLS, ToyTaskConfig


@dataclass(frozen=True)
class ModelParams:
    """One model: `name: toy` (built by bootstrap), a local folder, or a hub id."""

    name: str
    revision: str | None

    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.revision)


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelsParams:
    """params.yaml `models`."""

    teacher: ModelParams
    student: ModelParams
    trust_remote_code: bool
    dtype: Dtype


@dataclass(frozen=True)
class TaskParams:
    """params.yaml `task`: the embedded toy task and the train/eval split."""

    skills: tuple[str, ...]
    max_digits: int
    min_len: int
    max_len: int
    alphabet: str
    eval_fraction: float

    def __post_init__(self) -> None:
        check(len(self.skills) > 0, "skills", "name at least one skill")
        for s in self.skills:
            check(s in SKILLS, "skills", f"unknown skill {s!r}; known: {list(SKILLS)}")
        check(1 <= self.max_digits <= 9, "max_digits", "must be in 1..9")
        check(1 <= self.min_len <= self.max_len, "min_len", "must be >= 1 and <= max_len")
        check(len(self.alphabet) >= 2 and self.alphabet.isalpha() and self.alphabet.islower(), "alphabet", "must be at least two lower-case letters")
        check(0.0 < self.eval_fraction < 1.0, "eval_fraction", "must be in (0, 1)")

    def toy(self) -> ToyTaskConfig:
        return ToyTaskConfig(self.skills, self.max_digits, self.min_len, self.max_len, self.alphabet)


@dataclass(frozen=True)
class GenerationParams:
    """params.yaml `teacher` / `student`: how responses are sampled."""

    engine: Literal["transformers", "vllm"]
    batch_size: int
    max_new_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    num_samples: int
    seed: int
    tensor_parallel_size: int  # vllm only; must be 1 for transformers

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0 (0 = greedy)")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.num_samples >= 1, "num_samples", "must be >= 1")
        check(not (self.temperature == 0.0 and self.num_samples > 1), "num_samples", "greedy decoding (temperature 0) gives one distinct sample; set num_samples: 1")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.engine == "vllm" or self.tensor_parallel_size == 1, "tensor_parallel_size", "only the vllm engine shards a model; use 1 with transformers")
