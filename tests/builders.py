"""Builders the tests share: small literal records, params objects with test-sized values,
tiny-model loading, the stage modules by name, and a subprocess helper with a clean git
identity. One place, so no test module imports another."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import torch

from distillflow.audit import lineage
from distillflow.base import models, records
from distillflow.base.config import GenerationParams, LauncherParams, OpenAIParams, TaskParams
from distillflow.base.io import write_table
from distillflow.data import curation, sources
from distillflow.engines.scoring import ScoreParams
from distillflow.engines.served import ServedTeacher
from distillflow.training import stored_topk, trainer
from distillflow.training.checkpoint import Checkpoint
from distillflow.training.methods.distillm import DistiLLMParams
from distillflow.training.methods.distillm2 import BetaSchedule, DistiLLM2Params
from distillflow.training.methods.dpkd import DPKDParams
from distillflow.training.methods.gkd import GKDParams
from distillflow.training.methods.minillm import MiniLLMParams
from distillflow.training.methods.opd import OPDParams
from distillflow.training.onpolicy import OnlineParams
from distillflow.training.train_params import TrainParams
from stages import bootstrap, compare, curate, evaluate, identify, pairs, report, score, seed, student, teacher, train
from stages import round as round_stage


def prompt(i: int) -> dict:
    text = f"Add {i} and 1."
    return {
        "prompt_id": records.prompt_id(text),
        "prompt": text,
        "split": "train",
        "reference": str(i + 1),
        "category": "add",
        "source": "toy",
        "source_ref": f"toy:{i}",
        "group": f"add:a={i},b=1",
    }


def gen(pr: dict, model: str, k: int, text: str = "x", finish: str = "stop") -> dict:
    gid = records.generation_id(pr["prompt_id"], model, {}, k)
    return {
        "generation_id": gid,
        "prompt_id": pr["prompt_id"],
        "sample_index": k,
        "response": text,
        "finish_reason": finish,
        "prompt_tokens": 5,
        "response_tokens": 2,
        "model": model,
        "engine": "test",
        "sampling": "{}",
        "teacher": None,
        "token_ids": None,
        "token_logprobs": None,
    }


def pair(
    i: int = 0,
    chosen: str = "1",
    rejected: str = "9",
    cf: str = "stop",
    rf: str = "stop",
    ct: int = 2,
    rt: int = 2,
    reference: str | None = "1",
    category: str = "add",
    text: str | None = None,
) -> dict:
    pr = prompt(i)
    p = text or pr["prompt"]
    pid = records.prompt_id(p) if text else pr["prompt_id"]
    return {
        "pair_id": records.pair_id(pid, chosen, rejected + str(i)),
        "prompt_id": pid,
        "chosen_id": "c",
        "rejected_id": "r",
        "prompt": p,
        "chosen": chosen,
        "rejected": rejected,
        "reference": reference,
        "category": category,
        "chosen_finish_reason": cf,
        "rejected_finish_reason": rf,
        "chosen_tokens": ct,
        "rejected_tokens": rt,
        "teacher": None,
        "chosen_token_ids": None,
        "rejected_token_ids": None,
    }


def task(**kw: object) -> TaskParams:
    """Task params: the first toy task's short skills and the step skills' default
    sizes, unless `kw` says otherwise (`.toy()` gives the generator's config)."""
    base: dict[str, object] = {
        "skills": ("add", "reverse", "sort", "upper"),
        "max_digits": 2,
        "min_len": 3,
        "max_len": 5,
        "alphabet": "abcdef",
        **{"min_terms": 6, "max_terms": 9, "min_span": 8, "max_span": 14, "min_columns": 3, "max_columns": 5},
        "eval_fraction": 0.1,
        "sft_fraction": 0.0,
    }
    return TaskParams(**{**base, **kw})  # type: ignore[arg-type]


TASK = task()


def seed_params(
    kind: str = "toy",
    path: str | None = None,
    field: str | None = None,
    num_train: int = 40,
    num_eval: int = 5,
    max_chars: int = 2000,
    group_by: str | None = None,
) -> sources.SeedParams:
    """Seed params with synthesis off (its default); the toy source grouped by instance
    (its only group_by), a file source by `group_by` (default: ungrouped)."""
    return sources.SeedParams(
        source=sources.SourceParams(kind=kind, path=path, config=None, split=None, revision=None, field=field),
        seed=1,
        num_train=num_train,
        num_eval=num_eval,
        max_prompt_chars=max_chars,
        group_by=sources.TOY_GROUP if kind == "toy" else group_by,
    )


def prompts(n: int) -> list[dict]:
    train, _, _, _ = seed.run(
        TASK, seed_params(num_train=n, num_eval=1), seed.source_rows(TASK, seed_params(num_train=n, num_eval=1))
    )
    return train


def gp(**kw: object) -> GenerationParams:
    base = dict(
        engine="transformers",
        batch_size=4,
        max_new_tokens=6,
        temperature=1.0,
        top_p=0.9,
        num_samples=2,
        seed=7,
        tensor_parallel_size=1,
    )
    return GenerationParams(**{**base, **kw})  # type: ignore[arg-type]


D2 = DistiLLM2Params(
    contrastive=True,
    beta_ramp=True,
    adaptive_alpha=True,
    alpha_0=0.1,
    alpha_min=0.01,
    alpha_eps=1e-5,
    reference_batches=2,
    beta=BetaSchedule(0.5, 1.0, 0.5, 1.0),
    detach_mixture_student=True,
)


# No endpoint: `score.openai` as params.yaml has it (engine transformers never reads it).
NO_ENDPOINT = OpenAIParams(
    base_url=None,
    model=None,
    api_key_env=None,
    max_concurrency=2,
    requests_per_second=1000.0,
    max_retries=0,
    timeout_s=30.0,
    cache_dir="unused",
)


def sp(k: int, batch_size: int, device: str = "cpu", **kw: object) -> ScoreParams:
    """score params: the teacher in this process unless `engine`/`openai` say otherwise."""
    base = dict(
        k=k,
        batch_size=batch_size,
        device=device,
        engine="transformers",
        openai=NO_ENDPOINT,
        logprobs_via="prompt_logprobs",
    )
    return ScoreParams(**{**base, **kw})  # type: ignore[arg-type]


def tp(**kw: object) -> TrainParams:
    base = dict(
        method="distillm2",
        seed=0,
        epochs=2,
        batch_size=4,
        grad_accum_steps=1,
        lr=0.01,
        warmup_steps=1,
        max_grad_norm=1.0,
        reduction="sequence_mean",
        logits="chunked",
        chunk_size=16,
        device="cpu",
        bf16_autocast=False,
        gradient_checkpointing=False,
        packing=True,
        checkpoint_every=0,
        parallel="ddp",
        launcher=LauncherParams(kind="python", nproc_per_node=1, args=()),
        teacher_signal="online",
        distillm2=D2,
        distillm=DistiLLMParams(0.1),
        gkd=GKDParams(0.5, 0.5),
        dpkd=DPKDParams(0.1),
        opd=OPDParams(0.0),
        minillm=MiniLLMParams(0.2, True),
        online=OnlineParams(0, 12, "model"),
        rounds={},
    )
    return TrainParams(**{**base, **kw})  # type: ignore[arg-type]


PAIRS = [pair(i, chosen=str(i + 1), rejected=f"{i}x{i}", rf="length" if i % 2 else "stop") for i in range(8)]


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    ref = models.ModelRef(str(folder), None)
    return models.load_model(ref, folder, False, "float32"), models.load_tokenizer(ref, folder, False)


def fresh(tiny_models: Path) -> tuple:
    student, tok_s = load(tiny_models / "student")
    teacher, tok_t = load(tiny_models / "teacher")
    return student, teacher, tok_s, tok_t


STAGES = {
    m.__name__.split(".")[-1]: m
    for m in (
        identify,
        bootstrap,
        seed,
        teacher,
        student,
        pairs,
        curate,
        score,
        train,
        round_stage,
        evaluate,
        compare,
        report,
    )
}


ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def sh(cwd: Path, *cmd: str, timeout: float | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout + done.stderr


def quick_benchmark(script: str) -> str:
    """What `python benchmarks/<script> --quick` prints, run from the repo root (the
    benchmarks' smoke tests)."""
    root = Path(__file__).resolve().parents[1]
    return sh(root, sys.executable, str(root / "benchmarks" / script), "--quick", timeout=120)


# The parts of OpenLineage 2-0-2 (https://openlineage.io/spec/2-0-2/OpenLineage.json)
# that every RunEvent must satisfy: BaseEvent + RunEvent + Run + Job + Dataset, facets
# with _producer and _schemaURL: what the events openlineage-python builds must still hold.
_FACETS = {"type": "object", "additionalProperties": {"type": "object", "required": ["_producer", "_schemaURL"]}}


_DATASET = {
    "type": "object",
    "required": ["namespace", "name"],
    "properties": {
        "namespace": {"type": "string"},
        "name": {"type": "string"},
        "facets": _FACETS,
        "inputFacets": _FACETS,
        "outputFacets": _FACETS,
    },
}


RUN_EVENT_SCHEMA = {
    "type": "object",
    "required": ["eventTime", "producer", "schemaURL", "run", "job"],
    "properties": {
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "eventTime": {"type": "string", "format": "date-time"},
        "producer": {"type": "string", "format": "uri"},
        "schemaURL": {"type": "string", "format": "uri"},
        "run": {
            "type": "object",
            "required": ["runId"],
            "properties": {"runId": {"type": "string", "format": "uuid"}, "facets": _FACETS},
        },
        "job": {
            "type": "object",
            "required": ["namespace", "name"],
            "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}, "facets": _FACETS},
        },
        "inputs": {"type": "array", "items": _DATASET},
        "outputs": {"type": "array", "items": _DATASET},
    },
}


def check_event(event: dict[str, Any]) -> None:
    jsonschema.validate(event, RUN_EVENT_SCHEMA, format_checker=jsonschema.FormatChecker())
    uuid.UUID(event["run"]["runId"])


def write_stage(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "data" / "pairs"
    out.mkdir(parents=True)
    src = tmp_path / "in.parquet"
    write_table(
        src,
        [{"prompt_id": "a", "reason": "r"}],
        pa.schema(
            [pa.field("prompt_id", pa.string()), pa.field("reason", pa.string())], metadata={"distillflow.schema": "x"}
        ),
    )
    n = write_table(out / "pairs.parquet", [], records.PAIR_SCHEMA)
    manifest = lineage.write_manifest(
        out,
        "pairs",
        {"pairs": {"seed": 3, "k": 1}},
        inputs={"src": src},
        outputs={"pairs.parquet": n},
        counts={"kept": 0, "dropped_by_reason": {"x": 1}},
        extra={"validation": {"success": True}},
        cost={"tokens_read": 5},
    )
    return out, manifest


def live_rows(folder: Path) -> list[dict[str, float]]:
    """The per-step rows of a DVCLive folder (one plots/metrics/<name>.tsv per value)."""
    rows: dict[int, dict[str, float]] = {}
    for tsv in sorted((folder / "plots" / "metrics").glob("*.tsv")):
        lines = [ln.split("\t") for ln in tsv.read_text().splitlines()]
        assert lines[0] == ["step", tsv.stem]
        for step, value in lines[1:]:
            rows.setdefault(int(step), {"step": int(step)})[tsv.stem] = float(value)
    return [rows[k] for k in sorted(rows)]


def train_run(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tok_s: object,
    tok_t: object,
    pairs: list[dict],
    p: TrainParams,
    ckpt_dir: Path | None = None,
    key: str = "",
    **kw: object,
) -> list[dict[str, float]]:
    """One trainer run, checkpointing into `ckpt_dir` under `key` when given."""
    ckpt = Checkpoint(ckpt_dir, key) if ckpt_dir is not None else None
    return trainer.train(
        trainer.Job(student=student, teacher=teacher, tok_s=tok_s, tok_t=tok_t, pairs=pairs, p=p, checkpoint=ckpt, **kw)
    )  # type: ignore[arg-type]


# Every curate filter off (tests turn on the ones they check with dataclasses.replace).
CURATE_OFF = curation.CurateParams(
    drop_duplicates=False,
    drop_empty_chosen=False,
    drop_empty_rejected=False,
    drop_truncated_chosen=False,
    drop_truncated_rejected=False,
    min_chosen_tokens=0,
    max_chosen_tokens=100,
    max_rejected_tokens=100,
    max_length_ratio=1000.0,
    require_correct_chosen=False,
    student_matches_teacher="keep",
    repetition=curation.RepetitionParams(ngram=3, max_ratio=1.0, min_ngrams=4),
    decontamination=curation.DecontaminationParams(enabled=False, ngram=8, max_overlap=0.5),
    near_duplicates=curation.NearDuplicateParams(enabled=False, threshold=0.9, num_perm=32, shingle_words=3),
    balance=curation.BalanceParams(key=None, max_per_value=None),
)


# The smoke profile's comparison pipeline (comparison/dvc.yaml), as DVC names its stages:
# bootstraps 1 and 2 (each a teacher and initial student, the control teacher, both
# teachers' responses, the student's samples, pairs, curated pairs and scores), the cells
# kd and distillm2 with seed 1 on each bootstrap, and the report.
_BOOTS = ("1", "2")
SMOKE_COMPARISON = {
    f"comparison/dvc.yaml:{n}"
    for n in (
        *(f"{stage}@{b}" for stage in ("boot", "boot_plain", "boot_student") for b in _BOOTS),
        *(
            f"{stage}@{b}-{t}"
            for stage in ("boot_teacher", "boot_pairs", "boot_curate", "boot_score")
            for b in _BOOTS
            for t in ("default", "plain")
        ),
        *(f"compare@{run}-{b}-1" for run in ("kd", "distillm2") for b in _BOOTS),
        "report",
    )
}


# --- the pipeline tests' helpers (tests/test_pipeline.py, tests/test_pipeline_realarch.py) ---


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@.:/-]+)'", output))


def restored(output: str) -> set[str]:
    """Stages DVC's run-cache restored without running (same command, deps and params as an earlier run)."""
    return set(re.findall(r"Stage '([\w@.:/-]+)' is cached - skipping run", output))


# The smoke profile's comparison, as tests/test_pipeline*.py name it.
COMPARISON = SMOKE_COMPARISON
# always_changed (it hashes the model folders): runs on every repro, its output the same bytes
ALWAYS = {"identify"}
DAG = {"bootstrap", "seed", "teacher", "student", "pairs", "curate", "score", "train", "evaluate"} | ALWAYS


def check_verified(repo: Path) -> None:
    """After the README's first command, `dvc repro` (the comparison never ran: copy_repo
    drops its dvc.lock): `distillflow lineage verify` passes, and lists each comparison
    stage as never ran here, no stage stale or not checked out."""
    verified = subprocess.run(
        [sys.executable, "-m", "distillflow.cli", "lineage", "verify"],
        cwd=repo,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and " 0 mismatches" in verified.stdout, verified.stdout + verified.stderr
    lines = verified.stdout.splitlines()
    assert {s for s in COMPARISON if f"never ran here: {s} (no dvc.lock entry)" in lines} == COMPARISON, lines
    assert lines[-1].endswith(f" 0 mismatches; stages: {len(COMPARISON)} never ran here, 0 not checked out, 0 stale")


def online_opd_pair(student_dir: Path, teacher_dir: Path, base_url: str, cache: Path) -> tuple:
    """Online opd (samples every 2 steps) scored by the teacher in process and by the same
    teacher served at `base_url`: (rows, weights) of each."""
    out = []
    for where in ("model", "served"):
        student, tok_s = load(student_dir)
        teacher, tok_t = load(teacher_dir)
        online = OnlineParams(2, 8, where)
        if where == "model":
            p = tp(method="opd", epochs=2, batch_size=4, online=online)
            rows = train_run(student, teacher, tok_s, tok_t, PAIRS, p)
        else:
            p = tp(method="opd", epochs=2, batch_size=4, online=online, teacher_signal="topk")
            stored = stored_topk.index_scores(score.run(teacher, tok_t, PAIRS, sp(2, 8)))  # the pairs' own scores
            o = replace(NO_ENDPOINT, base_url=base_url, model="tiny-teacher", cache_dir=str(cache))
            served = ServedTeacher(o, tok_s, "prompt_logprobs")
            rows = train_run(student, None, tok_s, tok_t, PAIRS, p, scores=stored, score_samples=served.token_logprobs)
        out.append((rows, [q.detach().clone() for q in student.parameters()]))
    return out


def same_scores(got: pa.Table, teacher: torch.nn.Module, tok: Any) -> None:
    """`got`, a top-k table (k = 4) of PAIRS from a served or vLLM-scored teacher, against the
    same teacher scored in process: the same rows and top-k ids, log-probs within 1e-5."""
    want = score.run(teacher, tok, PAIRS, sp(4, 3))
    for col in ("pair_id", "side", "positions", "k", "topk_ids"):
        assert got.column(col).to_pylist() == want.column(col).to_pylist(), col
    for col in ("topk_logprobs", "target_logprob"):
        a, b = (torch.tensor(t.column(col).combine_chunks().flatten().to_numpy()) for t in (got, want))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def toy_bootstrap(root: Path, teacher_width: int, teacher_steps: int, max_positions: int) -> Path:
    """bootstrap's toy teacher (`teacher_width` wide, 2 heads, `teacher_steps` SFT steps on a
    small toy task) and a student 16 wide (2 steps) under `root`; returns `root`."""
    from distillflow.base import config

    task_ = task(max_digits=1, min_len=2, max_len=3, alphabet="abc")
    size = dict(num_layers=1, num_heads=2, batch_size=32, lr=0.01, warmup_steps=2, examples=0, corrupt_share=0.0)
    p = config.BootstrapParams(
        seed=0,
        max_positions=max_positions,
        workers=1,
        packing=True,
        heldout=8,
        eval_every=40,
        max_new_tokens=8,
        teacher=config.ToyModelParams(
            hidden_size=teacher_width, intermediate_size=2 * teacher_width, steps=teacher_steps, **size
        ),
        student=config.ToyModelParams(hidden_size=16, intermediate_size=32, steps=2, **size),
    )
    toy = config.ModelParams("toy", None)
    bootstrap.run(config.ModelsParams(toy, toy, False, "float32", "none"), task_, p, root)
    return root


def sampler_logprobs(
    model: torch.nn.Module, prompt: list[int], ids: list[int], temperature: float, top_p: float
) -> torch.Tensor:
    """log q(ids[t] | prefix) under the sampler's distribution: logits / temperature,
    then the smallest set of most likely tokens whose mass reaches top_p (a token is
    kept while the mass before it is below top_p), renormalised; greedy: the model's."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    if temperature > 0.0:
        logits = logits / temperature
        probs = logits.softmax(-1)
        order = probs.argsort(-1, descending=True)
        before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
