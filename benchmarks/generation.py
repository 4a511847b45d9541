"""Generation throughput of the toy teacher: one prompt at a time vs batched vs ours.

The embedded default's teacher architecture (params.yaml `bootstrap.teacher`: a 2-layer,
64-wide Llama, char tokenizer) with random weights, sampling at temperature 1, on the
toy task's prompts. Random weights emit eos at random, so every method is held to
exactly `--max-new-tokens` new tokens per prompt (eos suppressed: `min_new_tokens`
for `generate`, `ignore_eos` for our engine, no eos id for continuous batching), and
the benchmark checks the token count of every method. Methods, measured side by side
in one process (torch threads `--threads`): a warm-up run each, then `--repeats` rounds
that time every method once in turn (load from other jobs falls on all alike):

- one at a time: `model.generate` per prompt (on the first `--single` prompts);
- plain batched generate: prompts in their given order, `--batch-size` per call, left-padded;
- transformers continuous batching: `model.generate_batch` (paged attention), with its
  default config and with a config tuned for this workload;
- ours, 1 process: distillflow.engines.generation.TransformersEngine over length-bucketed shards;
- ours, N processes: the same shards spread over `--workers` spawned processes by
  distillflow.engines.shards (wall time includes starting them and loading the model).

Tokens per second counts new tokens only. With CUDA, a second table runs our engine
on a random-initialised ~0.5B-parameter Llama in bfloat16 and estimates the share of
the GPU's memory bandwidth it uses: each decode step reads every weight once plus the
KV cache so far; bytes read / time, against `--peak-gbs` (H200: 4800 GB/s).

Run:
    python benchmarks/generation.py            # CPU table (and the GPU table if CUDA exists)
    python benchmarks/generation.py --quick    # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from distillflow.base import models  # noqa: E402
from distillflow.base.config import GenerationParams, TaskParams  # noqa: E402
from distillflow.base.encoding import prompt_ids  # noqa: E402
from distillflow.engines import shards
from distillflow.engines.generation import Shard, TransformersEngine, length_order, plan_shards  # noqa: E402
from distillflow.tasks.toy import toytask
from distillflow.training import basics


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    model_dir: Path
    p: GenerationParams


def open_bench_engine(spec: BenchSpec) -> TransformersEngine:
    """shards.run_shards's engine opener in each worker process: eos suppressed."""
    tok = models.load_tokenizer(models.ModelRef(str(spec.model_dir), None), Path(), False)
    model = models.load_model(models.ModelRef(str(spec.model_dir), None), Path(), False, "float32").to(spec.p.device)
    return TransformersEngine(model, tok, spec.p, "bench", ignore_eos=True)


def toy_prompts(n: int) -> list[dict[str, Any]]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["task"]
    task = toytask.config_of(TaskParams(**{**raw, "skills": tuple(raw["skills"])}))
    return [{"prompt_id": f"p{i}", "prompt": ex.prompt} for i, ex in zip(range(n), toytask.examples(task, 0))]


def interleaved(repeats: int, fns: list[Callable[[], int]]) -> tuple[list[int], list[list[float]]]:
    """(new tokens, seconds per round) per function: one warm-up run each, then
    `repeats` rounds that time every function once, in turn, so that load from other
    jobs on the machine falls on all of them alike."""
    tokens = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            got = fn()
            times[k].append(time.perf_counter() - t)
            if got != tokens[k]:
                raise RuntimeError(f"token count changed between runs: {tokens[k]} then {got}")
    return tokens, times


def left_padded(tok: Any, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        attn[r, width - len(s) :] = 1
    return ids, attn


def cpu_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tok = models.build_char_tokenizer()
    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["bootstrap"]["teacher"]
    toy = models.ToyArch(arch["hidden_size"], arch["num_layers"], arch["num_heads"], arch["intermediate_size"])
    model = models.build_toy_model(toy, len(tok), tok, seed=0, max_positions=64).eval()
    n_params = sum(t.numel() for t in model.parameters())
    prompts = toy_prompts(args.prompts)
    encoded = [prompt_ids(tok, pr["prompt"]) for pr in prompts]
    T, B = args.max_new_tokens, args.batch_size
    gen_kw = dict(
        max_new_tokens=T,
        min_new_tokens=T,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    p = GenerationParams(
        engine="transformers",
        batch_size=B,
        max_new_tokens=T,
        temperature=1.0,
        top_p=1.0,
        num_samples=1,
        seed=0,
        tensor_parallel_size=1,
        shard_size=B * args.batches_per_shard,
    )

    @torch.no_grad()
    def one_at_a_time() -> int:
        n = 0
        for ids in encoded[: args.single]:
            x = torch.tensor([ids])
            n += model.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen_kw).shape[1] - len(ids)
        return n

    @torch.no_grad()
    def plain_batched() -> int:
        n = 0
        for s in range(0, len(encoded), B):
            ids, attn = left_padded(tok, encoded[s : s + B])
            n += (model.generate(input_ids=ids, attention_mask=attn, **gen_kw).shape[1] - ids.shape[1]) * ids.shape[0]
        return n

    def continuous(config: ContinuousBatchingConfig | None) -> Callable[[], int]:
        gc = GenerationConfig(
            max_new_tokens=T,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_token_id=-1,
            pad_token_id=tok.pad_token_id,
        )

        def go() -> int:
            out = model.generate_batch(inputs=encoded, generation_config=gc, continuous_batching_config=config)
            if len(out) != len(encoded):
                raise RuntimeError(f"generate_batch returned {len(out)} of {len(encoded)} requests")
            return sum(len(o.generated_tokens) for o in out.values())

        return go

    engine = TransformersEngine(model, tok, p, "bench", ignore_eos=True, desc="ours")
    planned = plan_shards(p, [len(e) for e in encoded], len(encoded))
    if len(planned) < args.workers:
        raise ValueError(
            f"{len(planned)} shards for {args.workers} workers: lower --batches-per-shard or raise --prompts"
        )

    def ours() -> int:
        return sum(r["response_tokens"] for s in planned for r in engine.generate(prompts, s))

    scratch = tempfile.TemporaryDirectory(prefix="bench-generation-")  # removed at the end
    tmp = Path(scratch.name)
    basics.save_model(model, tok, tmp / "model")
    spec = BenchSpec(tmp / "model", p)

    def ours_workers() -> int:
        work = Path(tempfile.mkdtemp(dir=tmp))
        shards.run_shards(work, planned, prompts, open_bench_engine, spec, args.workers, 0)
        return sum(r["response_tokens"] for r in shards.gather(work, planned, prompts, 1))

    tuned = ContinuousBatchingConfig(max_batch_tokens=4096, max_requests_per_batch=256, num_blocks=512, page_size=64)
    rows = [
        (f"one prompt at a time ({args.single} prompts)", one_at_a_time),
        (f"plain batched generate (batch {B}, given order)", plain_batched),
        ("transformers continuous batching (defaults)", continuous(None)),
        ("transformers continuous batching (tuned)", continuous(tuned)),
        (f"ours: bucketed engine, 1 process (batch {B})", ours),
        (f"ours: {args.workers} worker processes (incl. start-up)", ours_workers),
    ]
    print(
        f"toy teacher ({n_params / 1e3:.0f}k params, random weights), {len(prompts)} toy prompts "
        f"({min(map(len, encoded))}-{max(map(len, encoded))} tokens), "
        f"{T} new tokens each (eos suppressed), sampling at temperature 1, CPU, torch threads={args.threads}; "
        f"{args.repeats} interleaved rounds after a warm-up. tokens/s: median round (best round); "
        f"vs one at a time: median over rounds of the ratio within the round"
    )
    header = f"{'method':<52} {'new tokens':>10} {'median s':>8} {'tokens/s':>18} {'vs one at a time':>17}"
    print(header)
    print("-" * len(header))
    with scratch:
        tokens, times = interleaved(args.repeats, [fn for _, fn in rows])
    for (name, _), n in zip(rows, tokens):
        want = T * (args.single if name.startswith("one") else len(prompts))
        if n != want:
            raise RuntimeError(f"{name}: {n} new tokens, expected {want}: the comparison would not be fair")
    base = [tokens[0] / t for t in times[0]]
    for (name, _), n, ts in zip(rows, tokens, times):
        ratio = statistics.median(n / t / b for t, b in zip(ts, base))
        rates = f"{n / statistics.median(ts):.0f} ({n / min(ts):.0f})"
        print(f"{name:<52} {n:>10} {statistics.median(ts):>8.2f} {rates:>18} {ratio:>16.1f}x", flush=True)


def gpu_table(args: argparse.Namespace) -> None:
    """Our engine on a random ~0.5B Llama in bfloat16, and the memory bandwidth it uses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.build_char_tokenizer()
    L, H, heads, kv, inter = 24, 1024, 16, 16, 4096
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64 + args.gpu_new_tokens,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    n_params = sum(t.numel() for t in model.parameters())
    prompts = toy_prompts(args.gpu_prompts)
    encoded = [prompt_ids(tok, pr["prompt"]) for pr in prompts]
    T, B = args.gpu_new_tokens, args.gpu_batch_size
    p = GenerationParams(
        engine="transformers",
        batch_size=B,
        max_new_tokens=T,
        temperature=1.0,
        top_p=1.0,
        num_samples=1,
        seed=0,
        tensor_parallel_size=1,
        device="cuda",
        shard_size=0,
    )
    engine = TransformersEngine(model, tok, p, "bench", ignore_eos=True, desc="ours (gpu)")
    shard = Shard(0, tuple(length_order([len(e) for e in encoded])), 0)

    def ours() -> int:
        n = sum(r["response_tokens"] for r in engine.generate(prompts, shard))
        torch.cuda.synchronize()
        return n

    (tokens,), (ts,) = interleaved(args.repeats, [ours])
    seconds = statistics.median(ts)
    # bytes read: per batch and decode step, every weight once plus the KV cache so far
    kv_per_token = 2 * L * kv * (H // heads) * 2  # K and V, bf16
    read = 0
    order = list(shard.prompts)
    for s in range(0, len(order), B):
        batch = [len(encoded[i]) for i in order[s : s + B]]
        width = max(batch)
        for t in range(T):
            read += weight_bytes + len(batch) * (width + t) * kv_per_token
    gbs = read / seconds / 1e9
    name = torch.cuda.get_device_name()
    print(
        f"\n{name}: random Llama ({n_params / 1e6:.0f}M params, bfloat16), {len(prompts)} prompts, {T} new tokens "
        f"each (eos suppressed), batch {B}, median of {args.repeats} runs"
    )
    header = f"{'method':<40} {'new tokens':>10} {'seconds':>8} {'tokens/s':>10} {'est. GB/s read':>14} {'of peak':>8}"
    print(header)
    print("-" * len(header))
    print(
        f"{'ours: bucketed engine, 1 process':<40} {tokens:>10} {seconds:>8.2f} {tokens / seconds:>10.0f} "
        f"{gbs:>14.0f} {gbs / args.peak_gbs:>7.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--single", type=int, default=64, help="prompts for the one-at-a-time row")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches-per-shard", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the stages use min(2, cores))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-prompts", type=int, default=2048)
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    parser.add_argument("--gpu-new-tokens", type=int, default=128)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="the GPU's peak memory bandwidth (H200: 4800)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.single, args.batch_size, args.batches_per_shard, args.repeats = 64, 4, 16, 1, 1
        args.gpu_prompts, args.gpu_new_tokens = 64, 16
    cpu_table(args)
    if torch.cuda.is_available():
        gpu_table(args)
    else:
        print("\n(no CUDA device: the GPU table is skipped)")


if __name__ == "__main__":
    main()
