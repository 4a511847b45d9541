import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillflow import tasks
from distillflow.base import models, params, records
from distillflow.base import quarantine as qshape
from distillflow.base.config import ModelParams
from distillflow.base.io import DataError, read_table, write_table
from distillflow.data import sources, split, synthesis
from distillflow.tasks.toy import toytask
from distillflow.training import basics
from stages import seed

from .builders import TASK, seed_params
from .conftest import ROOT


def reconcile(counts: dict) -> None:
    assert (
        counts["read"]
        == counts["train"]
        + counts["eval"]
        + counts["quarantined"]
        + counts["unused_over_quota"]
        + counts["reserved_for_sft"]
    )
    assert counts["quarantined"] == sum(counts["dropped_by_reason"].values())


def test_toy_source_is_deterministic_disjoint_and_reconciles() -> None:
    p = seed_params()
    train, evals, _quarantine, counts = seed.run(TASK, p, sources.source_rows(TASK, p))
    again = seed.run(TASK, p, sources.source_rows(TASK, p))
    assert (train, evals) == again[:2]
    assert len(train) == 40 and len(evals) == 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}
    assert all(r["reference"] and r["category"] and r["source_ref"].startswith("toy:seed=1:index=") for r in train)
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in evals} == {"eval"}
    reconcile(counts)


def test_jsonl_bad_rows_are_quarantined_with_reasons(tmp_path: Path) -> None:
    f = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"text": "What is distillation?"}).encode(),
        b"{not json",
        b"\xff\xfe invalid utf-8",
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * 1_000_000}).encode(),
        json.dumps({"text": "What is  distillation?"}).encode(),  # duplicate after normalisation
        *[json.dumps({"text": f"Question number {i}?"}).encode() for i in range(60)],
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    p = seed_params("jsonl", str(f), "text", num_train=1000, num_eval=1000, max_chars=10_000)
    train, evals, quarantine, counts = seed.run(TASK, p, sources.source_rows(TASK, p))
    by_ref = {q["source_ref"]: q["reason"] for q in quarantine}
    assert by_ref == {
        f"{f}:line=2": "invalid_json",
        f"{f}:line=3": "invalid_utf8",
        f"{f}:line=4": "missing_field:text",
        f"{f}:line=5": "null_prompt",
        f"{f}:line=6": "not_a_string",
        f"{f}:line=7": "empty_prompt",
        f"{f}:line=8": "prompt_too_long",
        f"{f}:line=9": "duplicate_prompt",
    }
    assert len(train) + len(evals) == 61
    assert counts["read"] == len(lines)
    reconcile(counts)
    assert all(r["reference"] is None and r["source"] == "jsonl" for r in train)


def test_parquet_source_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": [f"Prompt {i}" for i in range(50)]}), f)
    p = seed_params("parquet", str(f), "q", num_train=1000, num_eval=1000)
    train, evals, _, _counts = seed.run(TASK, p, sources.source_rows(TASK, p))
    assert len(train) + len(evals) == 50
    assert train[0]["source_ref"].startswith(f"{f}:row=")
    with pytest.raises(DataError, match=r"p.parquet: no column 'prompt'"):
        list(sources.source_rows(TASK, seed_params("parquet", str(f), "prompt")))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        list(sources.source_rows(TASK, seed_params("parquet", str(broken), "q")))


def test_empty_source_fails_clearly(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    p = seed_params("jsonl", str(f), "text")
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}: the file has no rows$"):
        seed.run(TASK, p, sources.source_rows(TASK, p))


def test_a_source_with_the_wrong_field_names_the_reason_and_the_fields_rows_have(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(40)))
    p = seed_params("jsonl", str(f), "prompt")
    want = f"{f}: 0 of 40 rows usable: missing field 'prompt' (40); rows have fields: question, answer"
    with pytest.raises(DataError) as err:
        seed.run(TASK, p, sources.source_rows(TASK, p))
    assert str(err.value) == want


def test_nothing_usable_names_the_top_reasons_with_counts(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": "   "})] * 3 + ["{not json"] * 5 + [json.dumps({"text": 7})] + [json.dumps({"q": 1})]
    f.write_text("\n".join(lines) + "\n")
    p = seed_params("jsonl", str(f), "text")
    with pytest.raises(DataError) as err:
        seed.run(TASK, p, sources.source_rows(TASK, p))
    assert str(err.value) == (
        f"{f}: 0 of 10 rows usable: invalid_json (5), empty_prompt (3), missing field 'text' (1), "
        "and 1 more reason; rows have fields: q"
    )


def test_file_sources_need_path_and_field() -> None:
    with pytest.raises(ValueError, match="path: source kind 'jsonl' needs a path"):
        sources.SourceParams(kind="jsonl", path=None, config=None, split=None, revision=None, field="text")
    with pytest.raises(ValueError, match="split: an hf source needs a split"):
        sources.SourceParams(
            kind="hf", path="HuggingFaceH4/ultrachat_200k", config=None, split=None, revision=None, field="prompt"
        )


def reconcile_files(folder: Path, counts: dict) -> None:
    """The written files hold the counted rows and read back with their schemas."""
    assert read_table(folder / "train.parquet", records.PROMPT_SCHEMA).num_rows == counts["train"]
    assert read_table(folder / "eval.parquet", records.PROMPT_SCHEMA).num_rows == counts["eval"]
    assert read_table(folder / "quarantine.parquet", qshape.PROMPT_SCHEMA).num_rows == counts["quarantined"]
    reconcile(counts)


def big_rows(n: int) -> list[object]:
    """n prompt values, with a duplicate, an empty and a non-string every so often."""
    values: list[object] = []
    for i in range(n):
        values.append("" if i % 997 == 1 else 7 if i % 1009 == 2 else f"Prompt number {i % (n - 100)}: say something.")
    return values


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streaming_a_50k_row_source_reconciles(tmp_path: Path, kind: str) -> None:
    n = 50_000
    values = big_rows(n)
    src = tmp_path / f"src.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"q": pa.array([v if isinstance(v, str) else None for v in values], pa.string())}), src)
    else:
        src.write_text("".join(json.dumps({"q": v}) + "\n" for v in values))
    p = seed_params(kind, str(src), "q", num_train=1_000_000, num_eval=1_000)  # eval fills up, train never
    out = tmp_path / "out"
    out.mkdir()
    result, outputs = split.stream_to(out, TASK, p, sources.source_rows(TASK, p), batch_rows=4096)
    counts = result.counts
    assert counts["read"] == n and counts["train"] > 40_000 and counts["eval"] == 1_000
    assert counts["unused_over_quota"] > 0 and counts["dropped_by_reason"]["duplicate_prompt"] > 0
    assert outputs == {
        "train.parquet": counts["train"],
        "eval.parquet": 1_000,
        "quarantine.parquet": counts["quarantined"],
    }
    assert pq.ParquetFile(out / "train.parquet").num_row_groups == -(-counts["train"] // 4096)
    reconcile_files(out, counts)
    # the same rows, in the same order, as the in-memory path
    train, _, quarantine, again = seed.run(TASK, p, sources.source_rows(TASK, p))
    assert again == counts
    assert read_table(out / "train.parquet", records.PROMPT_SCHEMA).to_pylist() == train
    assert read_table(out / "quarantine.parquet", qshape.PROMPT_SCHEMA).to_pylist() == quarantine


def test_streamed_outputs_are_the_bytes_write_table_gave(tmp_path: Path) -> None:
    """params.yaml's toy default, streamed, is byte-identical to io.write_table of the
    same rows (the pre-streaming writer), so the reference run's dvc.lock stays valid."""
    sections = params.load_sections(ROOT / "params.yaml", seed.SECTIONS)
    task, p = sections["task"], sections["seed"]
    streamed, listed = tmp_path / "streamed", tmp_path / "listed"
    streamed.mkdir()
    result, _ = split.stream_to(streamed, task, p, sources.source_rows(task, p))
    train, evals, quarantine, counts = seed.run(task, p, sources.source_rows(task, p))
    assert counts == result.counts
    write_table(listed / "train.parquet", train, records.PROMPT_SCHEMA)
    write_table(listed / "eval.parquet", evals, records.PROMPT_SCHEMA)
    write_table(listed / "quarantine.parquet", quarantine, qshape.PROMPT_SCHEMA)
    for name in ("train.parquet", "eval.parquet", "quarantine.parquet"):
        assert (streamed / name).read_bytes() == (listed / name).read_bytes(), name


def synth_params(
    num_prompts: int, max_attempts: int, batch_size: int = 4, max_new_tokens: int = 8
) -> sources.SeedParams:
    s = sources.SynthesisParams(
        enabled=True,
        num_prompts=num_prompts,
        max_attempts=max_attempts,
        few_shot=3,
        engine="transformers",
        device="cpu",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        seed=7,
    )
    return dataclasses.replace(seed_params(num_train=40, num_eval=5), synthesis=s)


def new_toy_prompts(seen: set[str]) -> dict[str, str]:
    """A fresh toy prompt per split (from another generator seed), in neither set."""
    found: dict[str, str] = {}
    for ex in toytask.examples(toytask.config_of(TASK), 99):
        pid = records.prompt_id(ex.prompt)
        split = records.split_of(records.split_key(pid, ex.group), TASK.eval_fraction, TASK.sft_fraction)
        if pid not in seen and split not in found:
            found[split] = ex.prompt
        if len(found) == 2:
            return found
    raise AssertionError("unreachable: the toy stream is endless")


def check_synthesis(out: Path, counts: dict) -> tuple[list[dict], list[dict]]:
    """Synthetic rows are train-only, new, traced to real seed ids; rejections are
    quarantined with a reason; every count reconciles. Returns (synthetic, rejected)."""
    train = read_table(out / "train.parquet", records.PROMPT_SCHEMA).to_pylist()
    evals = read_table(out / "eval.parquet", records.PROMPT_SCHEMA).to_pylist()
    quarantine = read_table(out / "quarantine.parquet", qshape.PROMPT_SCHEMA).to_pylist()
    s = counts["synthesis"]
    synthetic = [r for r in train if r["source"] == "synthetic"]
    seeded = {r["prompt_id"] for r in train if r["source"] != "synthetic"}
    rejected = [q for q in quarantine if q["reason"].startswith("synthesis:")]
    assert len(train) == counts["train"] + s["accepted"] and len(synthetic) == s["accepted"]
    assert len(quarantine) == counts["quarantined"] + s["rejected"] and len(rejected) == s["rejected"]
    assert s["attempted"] == s["accepted"] + s["rejected"] == sum(s["rejected_by_reason"].values()) + s["accepted"]
    eval_ids = {r["prompt_id"] for r in evals}
    for r in synthetic:
        ref = json.loads(r["source_ref"])
        assert len(ref["examples"]) == 3 and set(ref["examples"]) <= seeded
        assert r["split"] == "train" and r["prompt_id"] not in seeded | eval_ids
    assert len({r["prompt_id"] for r in synthetic}) == len(synthetic)
    for q in rejected:
        assert set(json.loads(q["source_ref"])["examples"]) <= seeded
    return synthetic, rejected


def test_synthesis_keeps_new_train_prompts_and_quarantines_the_rest(tmp_path: Path) -> None:
    p = synth_params(num_prompts=2, max_attempts=8, batch_size=4)
    base, _, _, _ = seed.run(TASK, p, sources.source_rows(TASK, p))
    fresh = new_toy_prompts({r["prompt_id"] for r in base})
    # what the "teacher" answers, attempt by attempt
    script = [
        ("4. " + base[0]["prompt"], "stop"),
        ("432", "stop"),
        ("Add 1 and", "length"),
        (fresh["eval"], "stop"),
        (fresh["train"], "stop"),
        ("  " + fresh["train"], "stop"),
        ("Add 123 and 4.", "stop"),
        (fresh["train"].upper(), "stop"),
    ]
    calls: list[int] = []

    def generate(prompts: list[dict]) -> list[dict]:
        start = sum(calls)
        calls.append(len(prompts))
        assert all(
            pr["prompt"].startswith("Here are example tasks: 1. ") and "\n" not in pr["prompt"] for pr in prompts
        )
        return [
            {
                "prompt_id": pr["prompt_id"],
                "generation_id": f"g{start + i}",
                "response": script[start + i][0],
                "finish_reason": script[start + i][1],
            }
            for i, pr in enumerate(prompts)
        ]

    out = tmp_path / "out"
    out.mkdir()
    result, _ = split.stream_to(out, TASK, p, sources.source_rows(TASK, p), synth=(generate, "sha256:fake"))
    s = result.counts["synthesis"]
    assert calls == [4, 4] and s["attempted"] == 8 and s["accepted"] == 1  # one new prompt, said twice
    assert s["rejected_by_reason"] == {
        "duplicate_of_seed": 1,
        "duplicate_of_synthetic": 1,
        "in_eval_split": 1,
        "truncated": 1,
        "unparseable": 3,
    }
    synthetic, rejected = check_synthesis(out, result.counts)
    (row,) = synthetic
    assert row["prompt"] == fresh["train"] and row["reference"] and row["category"] in TASK.skills
    assert json.loads(row["source_ref"])["model"] == "sha256:fake"
    assert {q["reason"] for q in rejected} == {f"synthesis:{r}" for r in s["rejected_by_reason"]}


def test_parse_toy_prompt_checks_the_task_ranges() -> None:
    assert tasks.get("toy").parse_prompt("Add 4 and 38.", TASK) == ("add", "42", "add:a=4,b=38")
    assert tasks.get("toy").parse_prompt("What is 4 plus 38?", TASK) == ("add", "42", "add:a=4,b=38")  # one instance
    assert tasks.get("toy").parse_prompt("Reverse the word abc.", TASK) == ("reverse", "cba", "reverse:w=abc")
    assert tasks.get("toy").parse_prompt("Add 04 and 38.", TASK) is None  # leading zero: not a generator output
    assert tasks.get("toy").parse_prompt("Reverse the word xyz.", TASK) is None  # outside the alphabet
    assert tasks.get("toy").parse_prompt("Reverse the word abc", TASK) is None


def test_synthesis_end_to_end_with_a_tiny_teacher(tmp_path: Path) -> None:
    """A real (tiny, random) teacher through the real engine: few of its outputs parse
    as toy prompts, and whatever it says, every attempt is accounted for."""
    p = synth_params(num_prompts=2, max_attempts=6, batch_size=3, max_new_tokens=8)
    # few-shot prompts are about 190 tokens: a teacher with a 256-position context (the
    # 64-position tiny models are refused before generating: tests/test_preflight.py)
    tok = models.build_char_tokenizer()
    arch = models.ToyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    basics.save_model(models.build_toy_model(arch, len(tok), tok, seed=0, max_positions=256), tok, tmp_path / "teacher")
    tiny_models = tmp_path
    sections = {
        "models.teacher": ModelParams("toy", None),
        "models.trust_remote_code": False,
        "models.dtype": "float32",
    }
    generate, fingerprint, details = synthesis.open_generate(p.synthesis, synthesis.teacher_of(sections, tiny_models))
    out = tmp_path / "out"
    out.mkdir()
    result, outputs = split.stream_to(out, TASK, p, sources.source_rows(TASK, p), synth=(generate, fingerprint))
    assert outputs["train.parquet"] == result.counts["train"] + result.counts["synthesis"]["accepted"]
    assert result.counts["synthesis"]["attempted"] == 6 or result.counts["synthesis"]["accepted"] == 2
    check_synthesis(out, result.counts)
    assert details["sampling"]["max_new_tokens"] == 8 and fingerprint.startswith("sha256:")
    with pytest.raises(ValueError, match="pass --models data/bootstrap"):
        synthesis.teacher_of(sections, None)


def jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in prompts))
    return path


def test_an_eval_source_is_the_eval_set_and_its_prompts_never_train(tmp_path: Path) -> None:
    """seed.eval_source: a held-out set (a benchmark) gives the eval prompts; the source
    gives only train prompts, and one of them that is an eval prompt is quarantined."""
    bench = jsonl(tmp_path / "bench.jsonl", [f"Benchmark question {i}?" for i in range(6)] + ["Benchmark question 0?"])
    pool = jsonl(tmp_path / "pool.jsonl", [f"Train question {i}?" for i in range(30)] + ["Benchmark  question 3?"])
    held = sources.SourceParams(kind="jsonl", path=str(bench), config=None, split=None, revision=None, field="text")
    p = dataclasses.replace(seed_params("jsonl", str(pool), "text", num_train=100, num_eval=5), eval_source=held)
    train, evals, quarantine, counts = seed.run(
        TASK, p, sources.source_rows(TASK, p), sources.source_rows(TASK, p, held)
    )
    assert [r["prompt"] for r in evals] == [f"Benchmark question {i}?" for i in range(5)]  # num_eval of them
    assert len(train) == 30 and {r["split"] for r in train} == {"train"}  # no eval_fraction split of the source
    assert {r["prompt_id"] for r in train}.isdisjoint(r["prompt_id"] for r in evals)
    assert [(q["reason"], q["source_ref"]) for q in quarantine] == [("eval_prompt", f"{pool}:line=31")]
    assert counts["dropped_by_reason"] == {"eval_prompt": 1} and counts["eval"] == 5
    reconcile(counts)
    with pytest.raises(ValueError, match="eval_source: must be a jsonl, parquet or hf source"):
        dataclasses.replace(p, eval_source=dataclasses.replace(held, kind="toy", path=None, field=None))


def test_a_small_file_with_no_eval_prompt_says_how_many_the_fraction_needs(tmp_path: Path) -> None:
    # 12 prompts at eval_fraction 0.1: none of these lands in eval (the split is a hash of the prompt)
    texts = [f"Small question {i}?" for i in range(40)]
    kept = [
        t for t in texts if records.split_of(records.prompt_id(t), TASK.eval_fraction, TASK.sft_fraction) == "train"
    ][:12]
    assert len(kept) == 12
    p = seed_params("jsonl", str(jsonl(tmp_path / "small.jsonl", kept)), "text", num_train=100, num_eval=5)
    with pytest.raises(
        DataError, match=r"12 of 12 rows usable, giving 12 train and 0 eval prompts; task.eval_fraction"
    ):
        seed.run(TASK, p, sources.source_rows(TASK, p))
    with pytest.raises(DataError, match=r"about 30 usable prompts give at least one eval prompt .* seed.eval_source"):
        seed.run(TASK, p, sources.source_rows(TASK, p))


@pytest.mark.parametrize("skills", [("add",), ("countdown",)])
def test_a_task_too_small_for_the_quota_is_a_clear_error(skills: tuple[str, ...]) -> None:
    """The toy stream is endless, its distinct prompts are not: asking for more stops with
    the counts found and what to change, for the first task's skills and the step skills."""
    task = dataclasses.replace(TASK, skills=skills, max_digits=1, min_terms=6, max_terms=6, min_span=8, max_span=8)
    p = seed_params(num_train=1000, num_eval=100)  # countdown with 6 numbers: about 980 distinct prompts
    with pytest.raises(
        ValueError,
        match=r"the toy task yielded only \d+ train / \d+ eval distinct prompts in \d+ draws; "
        "widen `task` or lower seed.num_train / seed.num_eval",
    ):
        seed.run(task, p, sources.source_rows(task, p))
