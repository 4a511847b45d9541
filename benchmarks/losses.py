"""Peak memory and time of the DistiLLM-2 loss: reference-release style vs ours.

The DistiLLM-2 objective on one batch of pairs, with backward into the student:

    (1 - beta) * SKL(alpha) on the teacher responses + beta * SRKL(alpha) on the student
    responses, per-sequence alpha, sequence-mean reduction, student LM head trainable.

Two comparisons, each a row of the table:

``fused`` (from final hidden states, the default training path):
  (a) "reference": in the style of jongwooko/distillm-2 -- full (tokens, V) logits of
      both models from the final hidden states, float32 softmax / log_softmax copies,
      mixtures formed by adding probabilities and taking a log;
  (b) "ours": ``distillflow.training.losses.chunked_divergences_from_hidden`` -- only
      (chunk, V) logits exist at a time, gradients folded into the head/hidden gradients
      per chunk, both terms sharing one weight-gradient buffer.
``public`` (given full logits of both models, ``train.logits: full``):
  (a) the same reference math on the given (tokens, V) logits;
  (b) "ours": the public ``skew_forward_kl`` + ``skew_reverse_kl`` on those logits,
      chunked over positions. Both sides count only what the loss adds beyond the
      given logits, the student logits' gradient included.

Each (case, method) runs in a fresh spawned process. CPU peak memory = peak RSS
(VmHWM, reset through /proc/self/clear_refs once the inputs exist, so that building
them -- the logits methods compute their logits from heads they then drop -- does not
count) minus the RSS at that moment, with glibc's mmap threshold pinned at 1 MiB
(``--system-malloc`` to keep the default) so that RSS follows live tensors rather than
heap fragmentation; on CUDA, torch.cuda.max_memory_allocated minus the allocation
after the inputs. Time = best of ``--repeats`` forward+backward runs after one warm-up
run. Every mask is all-true, so both methods see the same tokens and the comparison is
about materialisation only.

Run:
    python benchmarks/losses.py            # CPU cases (and the GPU case if CUDA exists)
    python benchmarks/losses.py --quick    # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distillflow.training.losses import (  # noqa: E402
    HiddenTerm,
    chunked_divergences_from_hidden,
    skew_forward_kl,
    skew_reverse_kl,
)

BETA = 0.5  # DistiLLM-2's starting contrastive weight
SEQS_PER_SIDE = 2  # sequences in the teacher-response batch and in the student-response batch


@dataclass(frozen=True, kw_only=True)
class Case:
    vocab: int
    tokens: int  # total response tokens: half teacher responses, half student responses
    hidden: int
    device: str
    chunk_size: int
    dtype: str = "float32"

    @property
    def seq_len(self) -> int:
        return self.tokens // (2 * SEQS_PER_SIDE)


@dataclass(frozen=True)
class Result:
    loss: float
    peak_bytes: int
    seconds: float


def make_inputs(case: Case, logits: bool = False) -> dict[str, torch.Tensor]:
    """Hidden states and heads (and, with ``logits``, both models' logits per side).

    Created in place so that no transient inflates the baseline.
    """
    g = torch.Generator(device=case.device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    kw = {"generator": g, "device": case.device, "dtype": dtype}
    shape = (SEQS_PER_SIDE, case.seq_len, case.hidden)
    x = {
        # student hidden states are leaves here; in training they come from the trunk
        "s_chosen": torch.randn(shape, **kw).requires_grad_(True),
        "s_rejected": torch.randn(shape, **kw).requires_grad_(True),
        "t_chosen": torch.randn(shape, **kw),
        "t_rejected": torch.randn(shape, **kw),
        "w_student": torch.randn(case.vocab, case.hidden, **kw).mul_(0.05).requires_grad_(True),
        "w_teacher": torch.randn(case.vocab, case.hidden, **kw).mul_(0.05),
        "mask": torch.ones(SEQS_PER_SIDE, case.seq_len, dtype=torch.bool, device=case.device),
        # per-sequence adaptive alpha (DistiLLM-2 curriculum), constant here
        "alpha_chosen": torch.tensor([0.1, 0.05], device=case.device),
        "alpha_rejected": torch.tensor([0.1, 0.2], device=case.device),
    }
    if logits:
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                x[f"s_logits_{side}"] = (x[f"s_{side}"] @ x["w_student"].T).requires_grad_(True)
                x[f"t_logits_{side}"] = x[f"t_{side}"] @ x["w_teacher"].T
        for name in ("s_chosen", "s_rejected", "t_chosen", "t_rejected", "w_student", "w_teacher"):
            del x[name]  # the logits methods see only the logits
    return x


def reference_loss(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The release's way: everything at full (2B, T, V), probabilities added then logged."""
    b = SEQS_PER_SIDE
    # concatenated forward of chosen + rejected, as the release does
    s_logits = torch.cat([x["s_chosen"], x["s_rejected"]]) @ x["w_student"].T  # (2B, T, V)
    with torch.no_grad():
        t_logits = torch.cat([x["t_chosen"], x["t_rejected"]]) @ x["w_teacher"].T  # (2B, T, V)
    tea_probs = F.softmax(t_logits, dim=-1, dtype=torch.float32)
    stu_probs = F.softmax(s_logits, dim=-1, dtype=torch.float32)
    tea_logprobs = F.log_softmax(t_logits, dim=-1, dtype=torch.float32)
    stu_logprobs = F.log_softmax(s_logits, dim=-1, dtype=torch.float32)
    a_c = x["alpha_chosen"].view(-1, 1, 1)
    a_r = x["alpha_rejected"].view(-1, 1, 1)
    # skew forward KL on the teacher responses: KL(p || a p + (1 - a) q)
    mix_c = a_c * tea_probs[:b] + (1 - a_c) * stu_probs[:b]
    skl = (tea_probs[:b] * (tea_logprobs[:b] - torch.log(mix_c))).sum(-1)
    # skew reverse KL on the student responses: KL(q || (1 - a) p + a q), q detached in the
    # mixture as in the release
    mix_r = (1 - a_r) * tea_probs[b:] + a_r * stu_probs[b:].detach()
    srkl = (stu_probs[b:] * (stu_logprobs[b:] - torch.log(mix_r))).sum(-1)
    mask = x["mask"].float()
    skl_seq = (skl * mask).sum(-1) / mask.sum(-1)
    srkl_seq = (srkl * mask).sum(-1) / mask.sum(-1)
    return ((1 - BETA) * skl_seq + BETA * srkl_seq).mean()


def reference_from_logits(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The release's math, per side, on given (B, T, V) logits."""
    a_c = x["alpha_chosen"].view(-1, 1, 1)
    a_r = x["alpha_rejected"].view(-1, 1, 1)
    tea_c = F.softmax(x["t_logits_chosen"], dim=-1, dtype=torch.float32)
    stu_c = F.softmax(x["s_logits_chosen"], dim=-1, dtype=torch.float32)
    mix_c = a_c * tea_c + (1 - a_c) * stu_c
    skl = (tea_c * (F.log_softmax(x["t_logits_chosen"], dim=-1, dtype=torch.float32) - torch.log(mix_c))).sum(-1)
    tea_r = F.softmax(x["t_logits_rejected"], dim=-1, dtype=torch.float32)
    stu_r = F.softmax(x["s_logits_rejected"], dim=-1, dtype=torch.float32)
    mix_r = (1 - a_r) * tea_r + a_r * stu_r.detach()
    srkl = (stu_r * (F.log_softmax(x["s_logits_rejected"], dim=-1, dtype=torch.float32) - torch.log(mix_r))).sum(-1)
    mask = x["mask"].float()
    skl_seq = (skl * mask).sum(-1) / mask.sum(-1)
    srkl_seq = (srkl * mask).sum(-1) / mask.sum(-1)
    return ((1 - BETA) * skl_seq + BETA * srkl_seq).mean()


def public_loss(x: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """The same objective through the public full-logits functions."""
    kw = {"reduction": "sequence_mean", "chunk_size": chunk_size}
    skl = skew_forward_kl(x["s_logits_chosen"], x["t_logits_chosen"], x["mask"], x["alpha_chosen"], **kw)
    srkl = skew_reverse_kl(
        x["s_logits_rejected"],
        x["t_logits_rejected"],
        x["mask"],
        x["alpha_rejected"],
        detach_mixture_student=True,
        **kw,
    )
    return (1 - BETA) * skl + BETA * srkl


def our_loss(x: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Same objective from the hidden states, chunk by chunk, one shared weight-grad buffer."""
    terms = [
        HiddenTerm(
            student_hidden=x["s_chosen"],
            teacher_hidden=x["t_chosen"],
            mask=x["mask"],
            divergence=skew_forward_kl,
            weight=1 - BETA,
            reduction="sequence_mean",
            kwargs={"alpha": x["alpha_chosen"]},
        ),
        HiddenTerm(
            student_hidden=x["s_rejected"],
            teacher_hidden=x["t_rejected"],
            mask=x["mask"],
            divergence=skew_reverse_kl,
            weight=BETA,
            reduction="sequence_mean",
            kwargs={"alpha": x["alpha_rejected"], "detach_mixture_student": True},
        ),
    ]
    total, _parts = chunked_divergences_from_hidden(terms, x["w_student"], x["w_teacher"], chunk_size=chunk_size)
    return total


# method -> (loss function of the inputs and the chunk size, inputs with logits?)
METHODS = {
    "reference": (lambda x, _chunk: reference_loss(x), False),
    "fused": (lambda x, chunk: our_loss(x, chunk), False),
    "reference_logits": (lambda x, _chunk: reference_from_logits(x), True),
    "public": (public_loss, True),
}
# table row -> (reference method, our method)
COMPARISONS = {"fused": ("reference", "fused"), "public": ("reference_logits", "public")}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; the CPU peak needs Linux")


def _step(x: dict[str, torch.Tensor], method: str, chunk_size: int) -> float:
    for value in x.values():
        value.grad = None
    loss = METHODS[method][0](x, chunk_size)
    loss.backward()
    return loss.item()


def measure(case: Case, method: str, repeats: int, threads: int) -> Result:
    """Runs in a fresh process: one measured step for memory, then timed steps."""
    torch.set_num_threads(threads)
    # Warm up on a tiny problem first so that lazily loaded kernels and allocator
    # pools are not counted as the method's peak memory.
    tiny = Case(vocab=64, tokens=16, hidden=8, device=case.device, chunk_size=4, dtype=case.dtype)
    with_logits = METHODS[method][1]
    _step(make_inputs(tiny, with_logits), method, tiny.chunk_size)
    x = make_inputs(case, with_logits)
    cuda = case.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    loss = _step(x, method, case.chunk_size)  # first step: memory peak (and warm-up)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(x, method, case.chunk_size)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return Result(loss=loss, peak_bytes=max(peak, 0), seconds=min(times))


def _child(conn: object, case: Case, method: str, repeats: int, threads: int) -> None:
    conn.send(measure(case, method, repeats, threads))  # type: ignore[attr-defined]
    conn.close()  # type: ignore[attr-defined]


def run_isolated(case: Case, method: str, repeats: int, threads: int) -> Result:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, case, method, repeats, threads))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError as err:
        proc.join()
        raise RuntimeError(f"{method} on {case} died (exit code {proc.exitcode}); out of memory?") from err
    proc.join()
    return result


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.case:
        cases = []
        for spec in args.case:
            vocab, tokens, hidden, chunk = map(int, spec.split(","))
            cases.append(Case(vocab=vocab, tokens=tokens, hidden=hidden, device="cpu", chunk_size=chunk))
        return cases
    if args.quick:
        return [Case(vocab=1000, tokens=64, hidden=32, device="cpu", chunk_size=8)]
    cases = [
        # chunk x V ~ 4M elements (16 MiB per float32 buffer) on CPU
        Case(vocab=32_000, tokens=2_048, hidden=896, device="cpu", chunk_size=128),
        Case(vocab=152_064, tokens=512, hidden=896, device="cpu", chunk_size=32),
    ]
    if torch.cuda.is_available():
        cases.append(Case(vocab=128_256, tokens=8_192, hidden=4_096, device="cuda", chunk_size=1024, dtype="bfloat16"))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the first (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (kept low: shared machine)")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="VOCAB,TOKENS,HIDDEN,CHUNK",
        help="run this CPU case instead of the default ones (repeatable)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then also counts freed, fragmented heap)",
    )
    args = parser.parse_args()
    if not args.system_malloc:
        # Read by glibc at start-up of the spawned measuring processes: every allocation
        # of 1 MiB or more gets its own mapping, returned to the OS on free, so peak RSS
        # tracks live tensors rather than how the heap happened to fragment.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

    header = (
        f"{'path':<6} {'device':<6} {'vocab':>7} {'tokens':>6} {'hidden':>6} {'chunk':>5} | "
        f"{'ref peak':>10} {'ours peak':>10} {'memory reduction':>16} | "
        f"{'ref s':>7} {'ours s':>7} {'speed ratio':>11} | {'abs diff':>8}"
    )
    print(
        f"DistiLLM-2 loss (SKL + SRKL, fwd+bwd), threads={args.threads}, "
        f"best of {args.repeats} after warm-up; speed ratio = ref time / our time"
    )
    print("fused: from hidden states (ref includes the logits); public: given the logits (loss's extra only)")
    print(header)
    print("-" * len(header))
    for case in _cases(args):
        for path, (ref_method, our_method) in COMPARISONS.items():
            ref = run_isolated(case, ref_method, args.repeats, args.threads)
            ours = run_isolated(case, our_method, args.repeats, args.threads)
            print(
                f"{path:<6} {case.device:<6} {case.vocab:>7} {case.tokens:>6} {case.hidden:>6} "
                f"{case.chunk_size:>5} | "
                f"{_fmt_bytes(ref.peak_bytes):>10} {_fmt_bytes(ours.peak_bytes):>10} "
                f"{ref.peak_bytes / max(ours.peak_bytes, 1):>15.1f}x | "
                f"{ref.seconds:>7.2f} {ours.seconds:>7.2f} {ref.seconds / ours.seconds:>10.2f}x | "
                f"{abs(ref.loss - ours.loss):>8.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
