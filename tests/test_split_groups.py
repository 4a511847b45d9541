"""The split is by group (seed.group_by), not by prompt: the embedded task's phrasings of
one instance, a file's rows of one conversation, all land in one split, in seed's prompt
sets and in bootstrap's training streams alike; a group column missing or null is a
clear error and nothing is written."""

import collections
import dataclasses
import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distillflow import tasks
from distillflow.base import params, records
from distillflow.base.errors import ParamsError
from distillflow.base.io import DataError, read_table
from distillflow.data import sources, split, synthesis
from distillflow.stagekit import toymodels
from distillflow.tasks.toy import toytask
from stages import seed

from .builders import TASK, seed_params
from .conftest import ROOT


def default_sections() -> tuple:
    """params.yaml's `task` (countdown, walk, minus) and `seed` (the toy source, group_by instance)."""
    sections = params.load_sections(ROOT / "params.yaml", seed.SECTIONS)
    return sections["task"], sections["seed"]


def split_of_group(group: str, task) -> str:
    return records.split_of(records.content_id("group", group), task.eval_fraction, task.sft_fraction)


def fields_of(group: str) -> tuple[str, dict[str, str]]:
    """The skill and fields of a group key (`minus:d=7,n=38`): the inverse of toytask.group_of."""
    skill, _, rest = group.partition(":")
    return skill, dict(kv.split("=", 1) for kv in rest.split(","))


def test_the_default_task_keeps_every_instance_in_one_split_in_seed_and_bootstrap() -> None:
    task, p = default_sections()
    assert p.group_by == "instance" and set(task.skills) == {"countdown", "walk", "minus"}
    # seed's prompt sets, as the stage makes them
    train, evals, quarantine, counts = split.prompt_sets(task, p, sources.source_rows(task, p))
    assert len(train) == p.num_train and len(evals) == p.num_eval
    toy = tasks.get("toy")
    for r in train + evals:
        parsed = toy.parse_prompt(r["prompt"], task)
        assert parsed is not None and parsed.group == r["group"]  # the parser and the generator agree
        assert parsed.category == r["category"]  # and the references answer one instance (a walk: any walk)
        assert toy.is_correct(r["reference"], parsed.reference, r["category"])
        assert split_of_group(r["group"], task) == r["split"]
    seed_train, seed_eval = {r["group"] for r in train}, {r["group"] for r in evals}
    assert seed_train.isdisjoint(seed_eval)
    # both phrasings of one instance are in the sets: the split kept them together
    per_group = collections.Counter(r["group"] for r in train + evals)
    assert sum(n > 1 for n in per_group.values()) > 100
    assert {q["reason"] for q in quarantine} == {"duplicate_prompt"} and all(q["group"] for q in quarantine)

    # bootstrap's streams, with the seeds bootstrap.build gives them (bootstrap.seed 0)
    teacher = list(itertools.islice(toymodels.training_examples(task, 0, "teacher"), 3000))
    student = list(itertools.islice(toymodels.training_examples(task, 1, "student"), 3000))
    heldout = toymodels.heldout_examples(task, 99, 400)
    eval_groups = seed_eval | {e.group for e in heldout}
    assert {split_of_group(g, task) for g in eval_groups} == {"eval"}
    assert {e.group for e in teacher}.isdisjoint(eval_groups)
    assert {e.group for e in student}.isdisjoint(eval_groups | seed_train)  # the SFT bucket seed never uses
    # the generator's group is the parser's, for every example drawn
    for e in teacher[:500] + student[:500] + heldout:
        assert toy.parse_prompt(e.prompt, task).group == e.group

    # every phrasing of an instance, drawn or not, gets its instance's split
    instances = {e.group for e in teacher[:300] + student[:300] + heldout[:300]} | seed_eval
    leaked = 0
    for group in instances:
        skill, fields = fields_of(group)
        assert toytask.group_of(skill, fields) == group
        phrasings = [t.format(**fields) for t in toytask.TEMPLATES[skill]]
        want = split_of_group(group, task)
        for text in phrasings:
            parsed = toy.parse_prompt(text, task)
            assert parsed is not None and parsed.group == group
            key = records.split_key(records.prompt_id(records.normalise_prompt(text)), parsed.group)
            assert records.split_of(key, task.eval_fraction, task.sft_fraction) == want
        # what a per-prompt split would have done: phrasings of one instance in two splits
        by_prompt = {records.split_of(records.prompt_id(t), task.eval_fraction, task.sft_fraction) for t in phrasings}
        leaked += len(by_prompt) > 1
    assert leaked > len(instances) // 4


def test_walks_group_is_its_fields_not_its_random_answer() -> None:
    cfg = toytask.config_of(dataclasses.replace(TASK, skills=("walk",)))
    by_group: dict[str, set[str]] = collections.defaultdict(set)
    for ex in itertools.islice(toytask.examples(cfg, 3), 3000):
        skill, fields = fields_of(ex.group)
        assert skill == "walk" and sorted(fields) == ["a", "b", "s", "t"]
        by_group[ex.group].add(ex.answer)
    assert any(len(answers) > 1 for answers in by_group.values())  # one instance, several walks: one group


def test_synthesis_keeps_a_new_phrasing_in_its_instances_split() -> None:
    """A teacher-written toy prompt is split by the instance it parses as: a new phrasing
    of an eval instance is refused, one of a train instance kept with its group."""
    p = seed_params(num_train=40, num_eval=5)
    train, evals, _, _ = split.prompt_sets(TASK, p, sources.source_rows(TASK, p))
    seen = {bytes.fromhex(r["prompt_id"]) for r in train + evals}
    verdicts: dict[str, list[tuple[str | None, str | None]]] = {"train": [], "eval": []}
    for r in train + evals:
        skill, fields = fields_of(r["group"])
        for text in {t.format(**fields) for t in toytask.TEMPLATES[skill]} - {r["prompt"]}:
            if bytes.fromhex(records.prompt_id(text)) not in seen:
                c = synthesis.judge(text, "stop", TASK, p, seen, set())
                assert c.group == r["group"]
                verdicts[r["split"]].append((c.reason, records.split_of(c.pid, TASK.eval_fraction, 0.0)))
    assert verdicts["eval"] and {reason for reason, _ in verdicts["eval"]} == {"in_eval_split"}
    assert verdicts["train"] and {reason for reason, _ in verdicts["train"]} == {None}
    # what a per-prompt split would have kept: a phrasing of an eval instance whose own id is train
    assert "train" in {by_prompt for _, by_prompt in verdicts["eval"]}


def grouped_jsonl(path: Path, extra: list[bytes] = ()) -> Path:
    """60 rows: 20 conversations (int ids) of 3 phrasings each, interleaved, then `extra`."""
    lines = [
        json.dumps({"conv_id": c, "text": f"Question {c}, phrasing {k}?"}).encode() for k in range(3) for c in range(20)
    ]
    path.write_bytes(b"\n".join([*lines, *extra]) + b"\n")
    return path


def test_a_grouped_jsonl_file_splits_by_its_group_column(tmp_path: Path) -> None:
    src = grouped_jsonl(
        tmp_path / "conv.jsonl",
        [b"{not json", json.dumps({"conv_id": 3, "text": "Question 3,  phrasing 0?"}).encode()],  # a duplicate
    )
    task = dataclasses.replace(TASK, eval_fraction=0.3)
    want = {str(c): split_of_group(str(c), task) for c in range(20)}
    n_eval_groups = sum(s == "eval" for s in want.values())
    assert 2 <= n_eval_groups <= 17  # both splits have groups, eval more than the quota holds
    p = seed_params("jsonl", str(src), "text", num_train=1000, num_eval=4, group_by="conv_id")
    out = tmp_path / "out"
    out.mkdir()
    result, outputs = split.stream_to(out, task, p, sources.source_rows(task, p))
    counts = result.counts
    train = read_table(out / "train.parquet", records.PROMPT_SCHEMA).to_pylist()
    evals = read_table(out / "eval.parquet", records.PROMPT_SCHEMA).to_pylist()
    assert (
        counts["read"]
        == 62
        == sum(counts[k] for k in ("train", "eval", "quarantined", "unused_over_quota", "reserved_for_sft"))
    )
    assert counts["dropped_by_reason"] == {"duplicate_prompt": 1, "invalid_json": 1}
    assert counts["train"] == 3 * sum(s == "train" for s in want.values()) and counts["eval"] == 4
    # the eval rows over its quota are unused, never moved to train
    assert counts["unused_over_quota"] == 3 * n_eval_groups - 4
    assert outputs == {"train.parquet": len(train), "eval.parquet": 4, "quarantine.parquet": 2}
    for r in train + evals:
        assert r["split"] == want[r["group"]]  # the group column, str() of the int id
        assert r["prompt"].startswith(f"Question {r['group']},")
    assert {r["group"] for r in train}.isdisjoint(r["group"] for r in evals)
    # ungrouped, the same file's phrasings scatter: a prompt's own id decides
    flat = dataclasses.replace(p, group_by=None)
    train_f, evals_f, _, _ = split.prompt_sets(task, flat, sources.source_rows(task, flat))
    assert all(r["group"] is None for r in train_f + evals_f)
    assert all(r["split"] == records.split_of(r["prompt_id"], 0.3, 0.0) for r in train_f + evals_f)


def assert_nothing_written(out: Path) -> None:
    assert sorted(x.name for x in out.iterdir()) == []  # no train/eval/quarantine parquet, no temporary file


def run_to(tmp_path: Path, p: sources.SeedParams) -> tuple[str, Path]:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    with pytest.raises(DataError) as err:
        split.stream_to(out, TASK, p, sources.source_rows(TASK, p))
    return str(err.value), out


def test_a_group_column_null_or_missing_in_some_rows_is_an_error_naming_file_column_and_count(
    tmp_path: Path,
) -> None:
    rows = [json.dumps({"conv_id": i // 3, "text": f"Row {i}?"}) for i in range(30)]
    rows[6] = json.dumps({"text": "Row 6?"})
    rows[11] = json.dumps({"conv_id": None, "text": "Row 11?"})
    rows[20] = json.dumps({"text": "Row 20?", "other": 1})
    rows[25] = json.dumps({"conv_id": 8})  # quarantined (no prompt): needs no group
    src = tmp_path / "x.jsonl"
    src.write_text("\n".join(rows) + "\n")
    p = seed_params("jsonl", str(src), "text", num_train=1000, num_eval=1000, group_by="conv_id")
    msg, out = run_to(tmp_path, p)
    assert msg == (
        f"{src}: seed.group_by column 'conv_id' is null or missing in 3 of 30 rows read (first at {src}:line=7); "
        "every row needs a group"
    )
    assert_nothing_written(out)
    # Parquet: nulls in the column
    pq_src = tmp_path / "x.parquet"
    ids = [None if i in (4, 9) else f"c{i // 3}" for i in range(30)]
    pq.write_table(pa.table({"q": [f"Row {i}?" for i in range(30)], "conv_id": ids}), pq_src)
    p = seed_params("parquet", str(pq_src), "q", num_train=1000, num_eval=1000, group_by="conv_id")
    msg, out = run_to(tmp_path / "pq", p)
    assert msg == (
        f"{pq_src}: seed.group_by column 'conv_id' is null or missing in 2 of 30 rows read "
        f"(first at {pq_src}:row=4); every row needs a group"
    )
    assert_nothing_written(out)


def test_a_group_column_missing_from_the_file_is_an_error(tmp_path: Path) -> None:
    src = grouped_jsonl(tmp_path / "conv.jsonl")
    p = seed_params("jsonl", str(src), "text", num_train=1000, num_eval=1000, group_by="thread")
    msg, out = run_to(tmp_path, p)
    assert msg == (
        f"{src}: seed.group_by column 'thread' is null or missing in 60 of 60 rows read (first at {src}:line=1); "
        "every row needs a group; no row read has one; rows have fields: conv_id, text"
    )
    assert_nothing_written(out)
    pq_src = tmp_path / "conv.parquet"
    pq.write_table(pa.table({"q": ["A?", "B?"], "conv_id": [1, 2]}), pq_src)
    p = seed_params("parquet", str(pq_src), "q", num_train=1000, num_eval=1000, group_by="thread")
    msg, out = run_to(tmp_path / "pq", p)
    assert msg == (
        f"{pq_src}: seed.group_by column 'thread' is missing from the file (columns: ['q', 'conv_id']); "
        "every row needs a group"
    )
    assert_nothing_written(out)


def test_the_toy_source_must_be_split_by_instance(tmp_path: Path) -> None:
    p = seed_params()
    for bad in (None, "prompt"):
        with pytest.raises(ParamsError, match=r"group_by: the toy source must be split by 'instance'.*leak"):
            dataclasses.replace(p, group_by=bad)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["seed"]["group_by"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"seed: group_by: the toy source must be split by 'instance' .*, got None"):
        params.load_sections(tmp_path / "params.yaml", seed.SECTIONS)
    del raw["seed"]["group_by"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['seed.group_by'\]"):
        params.load_sections(tmp_path / "params.yaml", seed.SECTIONS)
