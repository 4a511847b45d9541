"""The score stage (offline teacher top-k signal) and training from it."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from benchmarks.score_memory import old_rows  # the replaced list-based scorer, the reference
from distillflow.base import encoding
from distillflow.stagekit import scorestep
from distillflow.training import stored_topk, trainer
from stages import score

from .builders import PAIRS, fresh, load, pair, sp, tp, train_run


def scored(folder: Path, k: int, batch_size: int = 5) -> pa.Table:
    student, teacher, tok_s, tok_t = fresh(folder)
    return score.run(teacher, tok_t, PAIRS, sp(k, batch_size, "cpu"))


def test_rows_cover_every_response_position_with_sorted_topk(taught_models: Path) -> None:
    rows = scored(taught_models, 4).to_pylist()
    assert [(r["pair_id"], r["side"]) for r in rows[:2]] == [
        (PAIRS[0]["pair_id"], "chosen"),
        (PAIRS[0]["pair_id"], "rejected"),
    ]
    assert len(rows) == 2 * len(PAIRS)
    _, teacher, _, tok = fresh(taught_models)
    for r in rows:
        pr = next(p for p in PAIRS if p["pair_id"] == r["pair_id"])
        prompt, chosen, rejected = encoding.encode_pair(tok, pr)
        assert r["positions"] == len(chosen if r["side"] == "chosen" else rejected)
        lps = torch.tensor(r["topk_logprobs"]).view(r["positions"], 4)
        assert torch.all(lps[:, :-1] >= lps[:, 1:])  # descending per position
        assert torch.all(torch.tensor(r["target_logprob"]) <= lps[:, 0] + 1e-6)
    # The stored numbers are the teacher's own log-softmax at those positions.
    r = rows[0]
    b = encoding.collate([encoding.encode_pair(tok, PAIRS[0])[:2]], tok.pad_token_id)
    with torch.no_grad():
        lp = (
            teacher(input_ids=b.input_ids, attention_mask=b.attention_mask)
            .logits[0][b.response_mask[0]]
            .log_softmax(-1)
        )
    torch.testing.assert_close(torch.tensor(r["topk_logprobs"]).view(-1, 4), lp.topk(4, dim=-1).values)


def test_k_larger_than_vocabulary_is_refused(taught_models: Path) -> None:
    with pytest.raises(ValueError, match="score.k: 1000 is larger than the vocabulary"):
        scored(taught_models, 1000)


@pytest.mark.parametrize("method", ["distillm2", "kd", "dpkd"])
def test_topk_signal_at_full_vocabulary_matches_the_online_teacher(taught_models: Path, method: str) -> None:
    """With k = V nothing is left out, so the offline run must track the online one."""
    student, teacher, tok_s, tok_t = fresh(taught_models)
    online = train_run(student, teacher, tok_s, tok_t, PAIRS, tp(method=method, epochs=3))
    rows = scored(taught_models, len(tok_t))
    student, _, tok_s, tok_t = fresh(taught_models)
    offline = train_run(
        student,
        None,
        tok_s,
        tok_t,
        PAIRS,
        tp(method=method, epochs=3, teacher_signal="topk"),
        scores=stored_topk.index_scores(rows),
    )
    assert [r["loss"] for r in offline] == pytest.approx([r["loss"] for r in online], rel=1e-4, abs=1e-5)


def test_small_k_trains_without_a_teacher_model(taught_models: Path) -> None:
    rows = scored(taught_models, 4)
    student, _, tok_s, tok_t = fresh(taught_models)
    log = train_run(
        student, None, tok_s, tok_t, PAIRS, tp(epochs=6, teacher_signal="topk"), scores=stored_topk.index_scores(rows)
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])


def test_missing_or_misaligned_scores_fail_naming_the_pair(taught_models: Path) -> None:
    rows = scored(taught_models, 4)
    student, _, tok_s, tok_t = fresh(taught_models)
    with pytest.raises(Exception, match="no teacher scores for pair"):
        train_run(
            student,
            None,
            tok_s,
            tok_t,
            [*PAIRS, pair(99)],
            tp(epochs=1, batch_size=9, teacher_signal="topk"),
            scores=stored_topk.index_scores(rows),
        )
    with pytest.raises(ValueError, match="set score.k > 0"):
        train_run(student, None, tok_s, tok_t, PAIRS, tp(teacher_signal="topk"), scores={})


# --- streaming: typed Arrow batches, the file, the reader ---------------------------------------------------------


def test_streamed_scores_match_the_old_list_path(
    taught_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distillflow.base import io, records
    from distillflow.engines import scoring

    _, teacher, _, tok = fresh(taught_models)
    monkeypatch.setattr(scoring, "HEAD_CHUNK", 7)  # several head chunks per batch, cutting across rows
    new = score.run(teacher, tok, PAIRS, sp(4, 3, "cpu"))
    old = pa.Table.from_pylist(old_rows(teacher, tok, PAIRS, 4, 3), schema=records.TOPK_SCHEMA)
    assert new.schema == old.schema == records.TOPK_SCHEMA
    for name in ("pair_id", "side", "positions", "k", "topk_ids"):
        assert new.column(name).to_pylist() == old.column(name).to_pylist(), name
    for name in ("topk_logprobs", "target_logprob"):
        torch.testing.assert_close(
            torch.tensor(new.column(name).combine_chunks().values.to_numpy()),
            torch.tensor(old.column(name).combine_chunks().values.to_numpy()),
            rtol=1e-5,
            atol=1e-5,
        )
    # The writer: streamed batches give the bytes io.write_table gives for the same rows
    # (one row group), and the same table over several row groups.
    batches = list(scoring.score_batches(teacher, tok, PAIRS, sp(4, 3, "cpu")))
    io.write_table(tmp_path / "old.parquet", new.to_pylist(), records.TOPK_SCHEMA)
    n, positions = scorestep.stream_topk(tmp_path / "new.parquet", batches, batch_rows=10_000)
    assert (tmp_path / "new.parquet").read_bytes() == (tmp_path / "old.parquet").read_bytes()
    assert (n, positions) == (2 * len(PAIRS), sum(r["positions"] for r in new.to_pylist()))
    scorestep.stream_topk(tmp_path / "groups.parquet", batches, batch_rows=4)
    assert io.read_table(tmp_path / "groups.parquet", records.TOPK_SCHEMA).equals(new)
    # The reader: tensors from the Arrow columns equal the old ones built from Python lists.
    arrays = stored_topk.index_scores(io.read_table(tmp_path / "groups.parquet", records.TOPK_SCHEMA))
    assert list(arrays) == [(r["pair_id"], r["side"]) for r in new.to_pylist()]
    for r in new.to_pylist():
        k, ids, lps, tgt = arrays[(r["pair_id"], r["side"])]
        assert k == 4 and ids.dtype == torch.int32
        assert torch.equal(ids.long(), torch.tensor(r["topk_ids"]).view(r["positions"], 4))
        assert torch.equal(lps, torch.tensor(r["topk_logprobs"], dtype=torch.float32).view(r["positions"], 4))
        assert torch.equal(tgt, torch.tensor(r["target_logprob"], dtype=torch.float32))


def test_index_scores_names_a_row_whose_lists_do_not_fit_its_positions() -> None:
    from distillflow.base import records
    from distillflow.base.io import DataError

    row = {"pair_id": "p1", "side": "chosen", "positions": 2, "k": 2, "topk_ids": [1, 2, 3]}
    table = pa.Table.from_pylist(
        [row | {"topk_logprobs": [0.0, -1.0, -2.0], "target_logprob": [0.0, -1.0]}], schema=records.TOPK_SCHEMA
    )
    with pytest.raises(
        DataError, match=r"pair p1 \(chosen\), row 0: .* have \(3, 3, 2\) entries, expected \(4, 4, 2\)"
    ):
        stored_topk.index_scores(table)


def test_score_device_must_be_where_the_teacher_is(tiny_models: Path) -> None:
    _, teacher, _, tok = fresh(tiny_models)
    with pytest.raises(ValueError, match="score.device is cuda, but the teacher's parameters are on cpu"):
        score.run(teacher, tok, PAIRS, sp(2, 2, "cuda"))
    with pytest.raises(ValueError, match="device"):
        sp(2, 2, "tpu")  # type: ignore[arg-type]


# --- a teacher whose output layer is padded past the tokenizer ----------------------------------------------------

PAD = 13


def padded_teacher(tok: object) -> torch.nn.Module:
    """A tiny Llama with PAD head rows past the tokenizer, given a bias so large that a
    top-k over the whole head would pick the padding rows at every position."""
    from distillflow.base import models

    arch = models.ToyArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = models.build_toy_model(arch, len(tok) + PAD, tok, seed=3, max_positions=64)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[len(tok) :] = 1e4
    model.lm_head = head
    return model.eval()


def test_padded_head_rows_are_never_stored(tiny_models: Path, tmp_path: Path) -> None:
    from distillflow.audit import quality

    _, _, _, tok = fresh(tiny_models)
    teacher = padded_teacher(tok)
    b = encoding.collate([encoding.encode_pair(tok, PAIRS[0])[:2]], tok.pad_token_id)
    with torch.no_grad():
        naive = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[0][b.response_mask[0]]
    assert bool((naive.topk(4, dim=-1).indices >= len(tok)).all())  # what an uncut top-k would store
    p = sp(4, 3, "cpu")
    table = score.run(teacher, tok, PAIRS, p)
    ids = table.column("topk_ids").combine_chunks().values.to_numpy()
    assert ids.size == 4 * sum(table.column("positions").to_pylist()) > 0
    assert int(ids.max()) < len(tok)
    # The output gate checks ids against the tokenizer's length, not the head's width.
    q = quality.QualityParams(
        min_prompt_chars=1,
        max_prompt_chars=2000,
        max_response_tokens=64,
        max_truncated_share=0.05,
        max_duplicate_share=0.2,
        max_quarantine_share=0.5,
        data_docs=False,
        batch_rows=3,
    )
    ids_ = [pr["pair_id"] for pr in PAIRS]
    scorestep.stream_topk(tmp_path / "ok.parquet", score.scoring.score_batches(teacher, tok, PAIRS, p), batch_rows=5)
    scorestep.gate_topk(quality.StageGates(q, None), tmp_path / "ok.parquet", tmp_path / "ok.parquet", len(tok), ids_)
    bad = table.to_pylist()
    bad[-1]["topk_ids"] = [len(tok), *bad[-1]["topk_ids"][1:]]
    scorestep.stream_topk(tmp_path / "bad.parquet", [pa.Table.from_pylist(bad, schema=table.schema)], batch_rows=5)
    with pytest.raises(quality.GateError, match=r"bad.parquet: teacher top-k failed expectation .*ids_in_vocab"):
        scorestep.gate_topk(
            quality.StageGates(q, None), tmp_path / "bad.parquet", tmp_path / "bad.parquet", len(tok), ids_
        )


def test_score_stage_streams_and_gates_against_the_tokenizer_length(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main(): a saved teacher whose head is PAD rows wider than its tokenizer; the file
    equals score.run's table, and an id at len(tok) (inside the head) fails the gate."""
    import json
    import sys

    import yaml

    from distillflow.base import io, models, records
    from distillflow.engines import scoring
    from distillflow.stagekit import entry
    from distillflow.training import basics

    from .conftest import ROOT

    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    monkeypatch.delenv("DVC_STAGE", raising=False)

    _, _, _, tok = fresh(tiny_models)
    arch = models.ToyArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    teacher = models.build_toy_model(arch, len(tok) + PAD, tok, seed=3, max_positions=64)
    basics.save_model(teacher, tok, tmp_path / "models" / "teacher")
    io.write_table(tmp_path / "curate" / "curated.parquet", PAIRS, records.PAIR_SCHEMA)
    params = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    params["score"].update(k=4, batch_size=3, device="cpu")
    params["quality"].update(batch_rows=4, data_docs=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def main(out: str) -> None:
        argv = ["score", "--params", str(tmp_path / "params.yaml"), "--pairs", str(tmp_path / "curate")]
        argv += ["--models", str(tmp_path / "models"), "--out", str(tmp_path / out)]
        monkeypatch.setattr(sys, "argv", [*argv, "--metrics", str(tmp_path / f"{out}.json")])
        entry.run_stage(score.main, "score")

    main("score")
    got = io.read_table(tmp_path / "score" / "topk.parquet", records.TOPK_SCHEMA)
    loaded, _ = load(tmp_path / "models" / "teacher")
    assert got.equals(score.run(loaded, tok, PAIRS, sp(4, 3, "cpu")))
    metrics = json.loads((tmp_path / "score.json").read_text())
    assert metrics["rows"] == 2 * len(PAIRS) and metrics["positions"] == sum(got.column("positions").to_pylist())
    assert metrics["gates"]["teacher top-k"]["rows_in"] == 2 * len(PAIRS)
    # train's reader (load_inputs with the topk signal): the file's rows as tensors, no teacher loaded
    t_dir = tmp_path / "models" / "teacher"
    ref = models.ModelRef(str(t_dir), None)
    *_, teacher_, _, _, stored = trainer.load_inputs(
        tp(teacher_signal="topk"), ref, t_dir, ref, t_dir, tmp_path / "score", False, "float32"
    )
    assert teacher_ is None and stored is not None and len(stored) == 2 * len(PAIRS)
    for r in got.to_pylist():
        k, ids, lps, tgt = stored[(r["pair_id"], r["side"])]
        assert k == 4 and ids.tolist() == torch.tensor(r["topk_ids"]).view(-1, 4).tolist()
        assert torch.equal(tgt, torch.tensor(r["target_logprob"], dtype=torch.float32))

    real = scoring.score_batches

    def one_padding_id(*args: object) -> object:
        for batch in real(*args):  # type: ignore[arg-type]
            rows = batch.to_pylist()
            rows[0]["topk_ids"][0] = len(tok)  # a head row, but no token
            yield pa.RecordBatch.from_pylist(rows, schema=batch.schema)

    monkeypatch.setattr(scoring, "score_batches", one_padding_id)
    with pytest.raises(SystemExit) as exc:
        main("bad")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "teacher top-k failed expectation" in err and "ids_in_vocab" in err
    assert not (tmp_path / "bad").exists()
