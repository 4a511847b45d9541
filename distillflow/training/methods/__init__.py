"""The distillation methods: `METHODS`, one `Method` object per method, by name
(`train.method`, `compare.runs.<run>.method`).

Each method is one module here holding its params section (if it has one), its loss (a
pure function built from distillflow.training.losses) and the `Method` object that
declares what the trainer must feed it: the teacher (online or as stored top-k, or not
at all), the teacher's responses (chosen), the student's responses (rejected), and which
of its params are ablation switches (`compare.runs.<run>.disable`).

    sft        token NLL on the teacher's responses (SeqKD); no teacher signal
    kd         forward KL on the teacher's responses
    kd_both    forward KL on both responses, equal weights (KD with DistiLLM-2's tokens)
    gkd        generalized JSD(beta) on a lambda-mix of student and teacher responses
    distillm   skew reverse KL(alpha) on both responses, equal weights (DistiLLM v1)
    distillm2  (1 - beta) SKL(alpha_t) on teacher responses + beta SRKL(alpha_s) on
               student responses, rising beta, adaptive alpha (DistiLLM-2); switches
               contrastive, beta_ramp, adaptive_alpha
    dpkd       -log sigmoid(beta_d [(lq(y_t) - lq(y_s)) - (lp(y_t) - lp(y_s))])
    opd        on-policy distillation: sum_t G_t log q(y_t) on the student's samples, G_t the
               (discounted) sum of log q/p from t on; reads only the teacher's log-prob of
               each sampled token (online or the stored top-k's target)
    minillm    MiniLLM: single-step exact reverse KL plus the length-normalised long-term
               policy gradient, importance-weighted, on teacher-mixed samples (train.online)

A loss sees one micro-batch already run through the models (method.MicroBatch: the final
hidden states of student and teacher on each response it reads, and the two LM heads,
heads.Heads) and returns the scalar loss plus numbers worth logging; docs/METHOD.md has
the math. The trainer (trainer.micro_batch) calls `METHODS[train.method].loss` directly.

Adding a method: one module here (its loss and its `Method`), one entry below, its tests;
if it has params, a dataclass in its module, a `train.<name>` field of
train_params.TrainParams and the section in params.yaml.
"""

from __future__ import annotations

from distillflow.training.methods.distillm import DISTILLM
from distillflow.training.methods.distillm2 import DISTILLM2
from distillflow.training.methods.dpkd import DPKD
from distillflow.training.methods.gkd import GKD
from distillflow.training.methods.kd import KD
from distillflow.training.methods.kd_both import KD_BOTH
from distillflow.training.methods.method import Method
from distillflow.training.methods.minillm import MINILLM
from distillflow.training.methods.opd import OPD
from distillflow.training.methods.sft import SFT

METHODS: dict[str, Method] = {m.name: m for m in (DISTILLM2, DISTILLM, GKD, KD, KD_BOTH, SFT, DPKD, OPD, MINILLM)}
