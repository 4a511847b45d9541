"""The score stage (offline teacher top-k signal) and training from it."""

from pathlib import Path

import pytest
import torch

from stages import score
from stages.lib.data import encoding
from stages.lib.training import trainer

from .builders import PAIRS, fresh, pair, tp, train_run


def scored(folder: Path, k: int) -> list[dict]:
    student, teacher, tok_s, tok_t = fresh(folder)
    return score.run(teacher, tok_t, PAIRS, score.ScoreParams(k=k, batch_size=5))


def test_rows_cover_every_response_position_with_sorted_topk(taught_models: Path) -> None:
    rows = scored(taught_models, 4)
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
        scores=trainer.index_scores(rows),
    )
    assert [r["loss"] for r in offline] == pytest.approx([r["loss"] for r in online], rel=1e-4, abs=1e-5)


def test_small_k_trains_without_a_teacher_model(taught_models: Path) -> None:
    rows = scored(taught_models, 4)
    student, _, tok_s, tok_t = fresh(taught_models)
    log = train_run(
        student, None, tok_s, tok_t, PAIRS, tp(epochs=6, teacher_signal="topk"), scores=trainer.index_scores(rows)
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
            scores=trainer.index_scores(rows),
        )
    with pytest.raises(ValueError, match="set score.k > 0"):
        train_run(student, None, tok_s, tok_t, PAIRS, tp(teacher_signal="topk"), scores={})
