"""A served teacher's scores (distillflow/engines/served.py, `score.engine: openai`): the
top-k signal from a real local server (tests/openai_server.py: a tiny model behind
`/v1/completions` with vLLM's `prompt_logprobs`) against the teacher scored in process,
opd trained from them, and the endpoints and tokenizers it must refuse.

Run: pytest tests/test_served.py -q
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from distillflow.base import models, records
from distillflow.base.config import OpenAIParams
from distillflow.base.errors import ParamsError
from distillflow.base.io import DataError, read_table, write_table
from distillflow.engines.served import ServedTeacher
from distillflow.stagekit import entry, trainrun
from distillflow.training import stored_topk
from distillflow.training.onpolicy import OnlineParams
from stages import score, train

from .builders import NO_ENDPOINT, PAIRS, fresh, load, online_opd_pair, same_scores, sp, tp, train_run
from .conftest import ROOT
from .openai_server import Server


@pytest.fixture(scope="module")
def served(tiny_models: Path) -> Iterator[Server]:
    with Server(tiny_models / "teacher") as s:
        yield s


def endpoint(server: Server, cache: Path) -> OpenAIParams:
    return replace(NO_ENDPOINT, base_url=server.base_url, model="tiny-teacher", cache_dir=str(cache))


def table_of(teacher: ServedTeacher, k: int = 4, batch_size: int = 3) -> pa.Table:
    return pa.Table.from_batches(list(teacher.score_batches(PAIRS, k, batch_size)))


def test_served_scores_are_the_in_process_scores_and_train_opd(
    served: Server, tiny_models: Path, tmp_path: Path
) -> None:
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    got = table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "prompt_logprobs"))
    same_scores(got, teacher, tok_t)
    want = score.run(teacher, tok_t, PAIRS, sp(4, 3))
    sent = served.state.requests  # the probe and one request per (pair, side)
    assert sent == 1 + 2 * len(PAIRS)
    assert table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "prompt_logprobs")).equals(got)
    assert served.state.requests == sent + 1  # a rerun reads the response cache; the probe is sent again

    # opd from the served teacher's log-probs trains as from the in-process teacher's
    p = tp(method="opd", teacher_signal="topk", epochs=1)
    rows = train_run(student, None, tok_s, tok_t, PAIRS, p, scores=stored_topk.index_scores(got))
    student, _, tok_s, tok_t = fresh(tiny_models)
    local = train_run(student, None, tok_s, tok_t, PAIRS, p, scores=stored_topk.index_scores(want))
    assert [r["reverse_kl"] for r in rows] == pytest.approx([r["reverse_kl"] for r in local], rel=1e-4)


def test_an_endpoint_without_prompt_logprobs_is_refused(served: Server, tiny_models: Path, tmp_path: Path) -> None:
    _, _, tok_s, _ = fresh(tiny_models)
    served.state.prompt_logprobs = False
    try:
        with pytest.raises(DataError, match=r"score.openai \(http://127.0.0.1:\d+/v1, .*returned no prompt_logprobs"):
            table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "prompt_logprobs"))
    finally:
        served.state.prompt_logprobs = True
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))  # nothing cached


def test_echo_with_logprobs_scores_as_prompt_logprobs_do(served: Server, tiny_models: Path, tmp_path: Path) -> None:
    """score.logprobs_via echo: the completions API's echo + logprobs (token texts, each
    mapped to our one id) gives the in-process scores, the table prompt_logprobs gives."""
    _, teacher, tok_s, tok_t = fresh(tiny_models)
    echo = table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "echo"))
    same_scores(echo, teacher, tok_t)
    assert echo.equals(table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "prompt_logprobs")))
    served.state.echo_ids = True  # a server naming ids (vLLM's return_tokens_as_token_ids): the same table
    try:
        named = table_of(ServedTeacher(endpoint(served, tmp_path / "cache-ids"), tok_s, "echo"))
    finally:
        served.state.echo_ids = False
    assert named.equals(echo)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("echo", False), r"the endpoint returned no logprobs for the echoed prompt"),
        (
            ("echo_shift", 1),
            r"position 1: the endpoint echoed .* where we sent id .*: the echoed tokens differ from ours",
        ),
    ],
)
def test_an_endpoint_that_does_not_echo_our_tokens_with_logprobs_is_refused(
    served: Server, tiny_models: Path, tmp_path: Path, setting: tuple[str, object], message: str
) -> None:
    _, _, tok_s, _ = fresh(tiny_models)
    before = getattr(served.state, setting[0])
    setattr(served.state, setting[0], setting[1])
    try:
        with pytest.raises(DataError, match=r"score.openai \(http://127.0.0.1:\d+/v1, .*tokenizer probe: " + message):
            table_of(ServedTeacher(endpoint(served, tmp_path / "cache"), tok_s, "echo"))
    finally:
        setattr(served.state, setting[0], before)


def swapped_tokenizer() -> PreTrainedTokenizerFast:
    """The toy character tokenizer with its characters in reverse order: same size, other ids."""
    vocab = {t: i for i, t in enumerate([*models.SPECIAL_TOKENS, *reversed(models.CHARSET)])}
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=models.UNK))
    core.add_special_tokens(list(models.SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=models.PAD, unk_token=models.UNK, eos_token=models.END
    )
    tok.chat_template = models.CHAT_TEMPLATE
    return tok


def test_a_teacher_served_with_another_tokenizer_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    other = tmp_path / "teacher"
    shutil.copytree(tiny_models / "teacher", other)
    swapped_tokenizer().save_pretrained(other)
    _, _, tok_s, _ = fresh(tiny_models)
    with Server(other) as s:
        with pytest.raises(DataError, match="tokenizer probe: token id .* the served teacher's tokenizer differs"):
            table_of(ServedTeacher(endpoint(s, tmp_path / "cache"), tok_s, "prompt_logprobs"))
        assert s.state.requests == 1  # refused on the probe, before any pair


def test_score_engine_openai_needs_an_endpoint() -> None:
    with pytest.raises(ParamsError, match="openai: engine openai needs openai.base_url and openai.model"):
        sp(4, 3, engine="openai")


def test_the_score_and_train_stages_distil_opd_from_a_served_teacher(
    served: Server, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages as dvc.yaml runs them, on the smoke profile: score with `engine: openai`
    (its manifest names the endpoint, not the local teacher), then train opd from those
    scores (`teacher_signal: topk`). The teacher's folder stays: the train stage names the
    teacher in its lineage and reads its tokenizer, as with an in-process teacher."""
    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    shutil.copytree(tiny_models, tmp_path / "models")
    write_table(tmp_path / "curate" / "curated.parquet", PAIRS, records.PAIR_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["score"].update(k=4, batch_size=3, engine="openai")
    params["score"]["openai"].update(base_url=served.base_url, model="tiny-teacher", cache_dir=str(tmp_path / "cache"))
    params["train"].update(method="opd", teacher_signal="topk", epochs=1, batch_size=4)
    params["quality"].update(data_docs=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", str(tmp_path / "params.yaml"), "--pairs", str(tmp_path / "curate")]
    common += ["--models", str(tmp_path / "models")]

    argv = [*common, "--out", str(tmp_path / "score"), "--metrics", str(tmp_path / "score.json")]
    monkeypatch.setattr(sys, "argv", ["score", *argv])
    entry.run_stage(score.main, "score")
    got = read_table(tmp_path / "score" / "topk.parquet", records.TOPK_SCHEMA)
    student, teacher, tok_s, tok_t = fresh(tiny_models)
    want = score.run(teacher, tok_t, PAIRS, sp(4, 3))
    assert got.column("topk_ids").to_pylist() == want.column("topk_ids").to_pylist()
    manifest = json.loads((tmp_path / "score" / "manifest.json").read_text())
    assert manifest["teacher"]["endpoint"] == f"openai:tiny-teacher@{served.base_url}"

    argv = [*common, "--scores", str(tmp_path / "score"), "--out", str(tmp_path / "train")]
    argv += ["--metrics", str(tmp_path / "train.json"), "--live", str(tmp_path / "live")]
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    entry.run_stage(train.main, "train")
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["method"] == "opd" and metrics["steps"] == 2
    trained, _ = load(tmp_path / "train" / "model")
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), trained.parameters()))


def test_online_opd_from_a_served_teacher_trains_as_from_the_teacher_in_process(
    served: Server, tiny_models: Path, tmp_path: Path
) -> None:
    """train.online.teacher served: the samples drawn during training are scored by the
    endpoint (the log-prob of each sampled token), and the run matches the one whose
    teacher sits in the process: the same samples, the same reverse-KL estimates."""
    (rows_m, weights_m), (rows_s, weights_s) = online_opd_pair(
        tiny_models / "student", tiny_models / "teacher", served.base_url, tmp_path / "cache"
    )
    assert [r["sampled_tokens"] for r in rows_s] == [r["sampled_tokens"] for r in rows_m]
    assert [r["reverse_kl"] for r in rows_s] == pytest.approx([r["reverse_kl"] for r in rows_m], rel=1e-4, abs=1e-6)
    for a, b in zip(weights_m, weights_s):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="online: teacher: served scores each sampled token through score.openai"):
        tp(method="minillm", online=OnlineParams(2, 8, "served"))


def test_a_served_online_teacher_without_an_endpoint_is_refused_before_loading() -> None:
    p = tp(method="opd", teacher_signal="topk", online=OnlineParams(2, 8, "served"))
    with pytest.raises(ParamsError, match="score.openai: train.online.teacher is served"):
        trainrun.check_served(p, sp(4, 3))
    trainrun.check_served(tp(method="opd", online=OnlineParams(2, 8, "model")), sp(4, 3))  # the teacher in process
