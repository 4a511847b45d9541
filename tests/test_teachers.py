"""Several teachers (models.teachers, distillflow/base/teachers.py): the params and
their refusals, routing, the pairs' order, and the score stage's mixed and routed top-k
against a naive reference (each model's full log-softmax, mixed by hand)."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distillflow.base import encoding, models, records
from distillflow.base.config import ModelParams, ModelsParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import DataError
from distillflow.base.params import load_sections
from distillflow.base.teachers import TeacherParams, teacher_set
from distillflow.data import pairing
from distillflow.engines import scoring
from distillflow.stagekit import scorestep, trainrun

from .builders import PAIRS, gen, load, prompt, sp, tp

TOY = ModelParams("toy", None)


def entry(label: str, weight: float, name: str = "toy") -> TeacherParams:
    return TeacherParams(label=label, name=name, revision=None, weight=weight)


def two(routing: str = "mix", weights: tuple[float, float] = (1.0, 3.0)):  # noqa: ANN201
    return teacher_set(TOY.ref(), (entry("a", weights[0]), entry("b", weights[1])), routing)


def test_an_empty_list_is_the_single_teacher() -> None:
    ts = teacher_set(TOY.ref(), (), "mix")
    assert not ts.several and [(t.label, t.role, t.weight) for t in ts.teachers] == [("teacher", "teacher", 1.0)]
    ts = two()
    assert ts.several and [t.role for t in ts.teachers] == ["teacher", "teacher-b"]
    assert [t.weight for t in ts.teachers] == [0.25, 0.75]  # normalised
    assert ts.seed(0, 7) == 7 and ts.seed(1, 7) != 7  # the second teacher draws its own stream


@pytest.mark.parametrize(
    ("entries", "routing", "message"),
    [
        ((entry("a", 1.0), entry("b", 0.0)), "mix", r"models.teachers\[1\].weight: must be a finite number > 0"),
        ((entry("a", 1.0), entry("b", -2.0)), "mix", r"models.teachers\[1\].weight"),
        ((entry("a", 1.0), entry("b", math.nan)), "mix", r"models.teachers\[1\].weight"),
        ((entry("a", 1.0), entry("a", 1.0)), "mix", r"labels must be unique, \['a'\] repeat"),
        ((entry("a", 1.0), entry("B/x", 1.0)), "mix", r"models.teachers\[1\].label: 'B/x' must match"),
        ((entry("a", 1.0, "/models/other"), entry("b", 1.0)), "mix", r"models.teachers\[0\]: must be models.teacher"),
        ((entry("a", 1.0), entry("b", 1.0)), "vote", r"models.routing: must be mix, route or category"),
    ],
)
def test_bad_teacher_lists_are_refused_naming_the_key(entries: tuple, routing: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        teacher_set(TOY.ref(), entries, routing)


def test_a_bad_list_in_a_params_file_names_the_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text(
        "models:\n  teacher: {name: toy, revision: null}\n  student: {name: toy, revision: null}\n"
        "  trust_remote_code: false\n  dtype: float32\n  cross_tokenizer: none\n  routing: mix\n"
        "  teachers: [{label: a, name: toy, revision: null, weight: 1}, {label: b, name: toy, revision: null, "
        "weight: 0}]\n"
    )
    with pytest.raises(ParamsError, match=rf"{f}: models: models.teachers\[1\].weight"):
        load_sections(f, {"models": ModelsParams})


def test_routing_follows_the_weights_and_is_a_function_of_the_id() -> None:
    ids = [records.prompt_id(f"prompt {i}") for i in range(4000)]
    route = two("route")
    picks = [route.routed(pid, None) for pid in ids]
    assert picks == [two("route").routed(pid, None) for pid in ids]  # no state: every stage agrees
    share = sum(picks) / len(picks)
    assert abs(share - 0.75) < 0.03, share  # 4.4 binomial standard deviations
    # route: exactly the routed teacher samples a prompt; mix: every teacher samples every prompt
    assert all([route.samples(i, pid, None) for i in range(2)] == [k == 0, k == 1] for pid, k in zip(ids, picks))
    assert all(two("mix").samples(i, pid, None) for pid in ids[:50] for i in range(2))


def test_category_routing_sends_a_prompt_to_the_teacher_of_its_category() -> None:
    """routing category: a prompt whose category is a teacher's label goes to it; any
    other prompt is routed by the hash, as under route."""
    ts = teacher_set(TOY.ref(), (entry("walk", 1.0), entry("countdown", 1.0)), "category")
    ids = [records.prompt_id(f"prompt {i}") for i in range(400)]
    assert all(ts.routed(pid, "walk") == 0 and ts.routed(pid, "countdown") == 1 for pid in ids)
    hashed = teacher_set(TOY.ref(), (entry("walk", 1.0), entry("countdown", 1.0)), "route")
    assert [ts.routed(pid, "minus") for pid in ids] == [hashed.routed(pid, "minus") for pid in ids]
    assert {ts.routed(pid, None) for pid in ids} == {0, 1}
    assert [ts.samples(i, ids[0], "countdown") for i in range(2)] == [False, True]
    assert [hashed.routed(pid, "walk") for pid in ids] != [0] * len(ids)  # route ignores the category


def labelled(pr: dict, model: str, k: int, teacher: str | None) -> dict:
    return {**gen(pr, model, k, text=f"{model}{k}"), "teacher": teacher}


def test_a_prompt_pairs_with_its_routed_teacher_first() -> None:
    prompts = [prompt(i) for i in range(40)]
    teacher = [labelled(pr, m, 0, m) for pr in prompts for m in ("a", "b")]
    student = [labelled(pr, "s", 0, None) for pr in prompts]
    ts = two("mix")
    one, _, _ = pairing.build_pairs(pairing.PairsParams(1), prompts, teacher, student, teachers=ts)
    assert [p["teacher"] for p in one] == [ts.labels[ts.routed(pr["prompt_id"], pr["category"])] for pr in prompts]
    assert {p["teacher"] for p in one} == {"a", "b"}  # both teachers reach the chosen side
    assert all(p["chosen"] == p["teacher"] + "0" for p in one)  # the pair's text is its teacher's
    both, _, _ = pairing.build_pairs(pairing.PairsParams(2), prompts, teacher, student, teachers=ts)
    assert [p["teacher"] for p in both[1::2]] == [("b" if p["teacher"] == "a" else "a") for p in one]


@pytest.fixture(scope="module")
def scorers(tiny_models: Path) -> tuple[list[torch.nn.Module], object]:
    """The tiny teacher and a second random teacher of the same shape (another seed)."""
    first, tok = load(tiny_models / "teacher")
    arch = models.ToyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    second = models.build_toy_model(arch, len(tok), tok, seed=5, max_positions=64).eval()
    return [first, second], tok


def naive(model: torch.nn.Module, tok: object, pr: dict, side: str) -> torch.Tensor:
    """The model's log-softmax over the whole vocabulary at each response position of one
    unpadded sequence: (positions, vocab)."""
    prompt_ids, chosen, rejected = encoding.encode_pair(tok, pr)
    response = chosen if side == "chosen" else rejected
    ids = torch.tensor([prompt_ids + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return logits.float().log_softmax(-1)[:, : len(tok)]


def test_mixed_topk_is_the_log_of_the_weighted_mixture(scorers: tuple) -> None:
    members, tok = scorers
    ts = two("mix")
    k = len(tok)  # the whole vocabulary: nothing is cut, every entry is compared
    table = scoring.score(scoring.Mixture(members, ts), tok, PAIRS, sp(k, 3))
    for row in table.to_pylist():
        pr = next(p for p in PAIRS if p["pair_id"] == row["pair_id"])
        lp = [naive(m, tok, pr, row["side"]) for m in members]
        mixed = torch.logsumexp(torch.stack([lp[0] + math.log(0.25), lp[1] + math.log(0.75)]), dim=0)
        got = torch.tensor(row["topk_logprobs"]).view(row["positions"], k)
        torch.testing.assert_close(got, mixed.sort(dim=-1, descending=True).values, atol=2e-5, rtol=0)
        ids = torch.tensor(row["topk_ids"]).view(row["positions"], k).long()
        torch.testing.assert_close(mixed.gather(-1, ids), got, atol=2e-5, rtol=0)
        _, chosen, rejected = encoding.encode_pair(tok, pr)
        target = torch.tensor(chosen if row["side"] == "chosen" else rejected)
        torch.testing.assert_close(
            torch.tensor(row["target_logprob"]), mixed.gather(-1, target[:, None]).squeeze(-1), atol=2e-5, rtol=0
        )


def test_a_routed_pair_is_scored_by_its_teacher_alone(scorers: tuple) -> None:
    members, tok = scorers
    pairs = [{**pr, "teacher": "ab"[i % 2]} for i, pr in enumerate(PAIRS)]

    def ran(routing: str) -> tuple[list, list[int]]:
        """The scores, and the sequences each teacher's base model ran on."""
        seen = [0, 0]

        def count(k: int) -> Any:
            return lambda mod, args, kw, out: seen.__setitem__(k, seen[k] + len(kw["input_ids"]))

        hooks = [m.base_model.register_forward_hook(count(k), with_kwargs=True) for k, m in enumerate(members)]
        try:
            return scoring.score(scoring.Mixture(members, two(routing)), tok, pairs, sp(6, 3)).to_pylist(), seen
        finally:
            for h in hooks:
                h.remove()

    routed, seen = ran("route")
    _, every = ran("mix")
    # route runs each teacher on its 4 pairs' 8 sequences only, mix runs both on all 16
    assert [e - r for e, r in zip(every, seen)] == [len(PAIRS), len(PAIRS)]
    alone = [scoring.score(m, tok, pairs, sp(6, 3)).to_pylist() for m in members]
    for i, row in enumerate(routed):
        own = alone[(i // 2) % 2][i]  # two rows (chosen, rejected) per pair
        assert own["topk_ids"] == row["topk_ids"]
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), torch.tensor(own["topk_logprobs"]))
        torch.testing.assert_close(torch.tensor(row["target_logprob"]), torch.tensor(own["target_logprob"]))


def test_routing_needs_each_pair_s_teacher(scorers: tuple) -> None:
    members, tok = scorers
    with pytest.raises(DataError, match=r"row 0, field 'teacher': null, but models.routing is route"):
        scoring.score(scoring.Mixture(members, two("route")), tok, PAIRS, sp(4, 3))


def test_several_teachers_train_only_from_their_stored_topk() -> None:
    online = tp(teacher_signal="online")
    with pytest.raises(ParamsError, match="train.teacher_signal: models.teachers lists 2 teachers"):
        trainrun.check_teachers(online, two())
    sampled = tp(teacher_signal="topk", method="opd")
    served = dataclasses.replace(sampled.online, every=2, teacher="served")  # online with topk: a served teacher
    sampled = dataclasses.replace(sampled, online=served)
    with pytest.raises(ParamsError, match="train.online: samples drawn during training are scored by one"):
        trainrun.check_teachers(sampled, two())
    trainrun.check_teachers(tp(teacher_signal="topk"), two())  # the supported path
    trainrun.check_teachers(online, teacher_set(TOY.ref(), (), "mix"))  # one teacher: unchanged


def test_only_the_local_scorer_mixes_teachers(tiny_models: Path) -> None:
    student = (models.ModelRef("toy", None), tiny_models / "student")
    with pytest.raises(ParamsError, match="score.engine: vllm scores one teacher; models.teachers lists 2"):
        scorestep.teacher_loader(student, two(), tiny_models, False, "float32", sp(4, 2, engine="vllm"))


def test_a_generation_file_of_the_older_schema_is_refused_clearly(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillflow.base.io import read_rows

    old = records.GENERATION_SCHEMA.remove(records.GENERATION_SCHEMA.get_field_index("teacher"))
    old = old.with_metadata({"distillflow.schema": "generation", "distillflow.schema_version": "2"})
    f = tmp_path / "generations.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=old), f)
    with pytest.raises(DataError, match=rf"{f}: written with 'generation' schema version 2, this release reads"):
        read_rows(f, records.GENERATION_SCHEMA)
