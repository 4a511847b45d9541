import dataclasses

import pytest

from distillflow.data import curation
from stages import curate

from .builders import CURATE_OFF, pair

OFF = CURATE_OFF
ALL_ON = dataclasses.replace(
    OFF,
    drop_duplicates=True,
    drop_empty_chosen=True,
    drop_empty_rejected=True,
    drop_truncated_chosen=True,
    drop_truncated_rejected=True,
    min_chosen_tokens=1,
    max_chosen_tokens=10,
    max_rejected_tokens=10,
    max_length_ratio=4.0,
    require_correct_chosen=True,
    student_matches_teacher="drop",
    repetition=curation.RepetitionParams(ngram=2, max_ratio=0.5, min_ngrams=4),
    decontamination=curation.DecontaminationParams(enabled=True, ngram=3, max_overlap=0.5),
    near_duplicates=curation.NearDuplicateParams(enabled=True, threshold=0.8, num_perm=64, shingle_words=2),
)


REPEAT = "the cat sat the cat sat the cat sat the cat sat"


@pytest.mark.parametrize(
    "row, reason",
    [
        (pair(chosen=" "), "empty_chosen"),
        (pair(rejected=""), "empty_rejected"),
        (pair(cf="length"), "truncated_chosen"),
        (pair(rf="length"), "truncated_rejected"),
        (pair(ct=0), "chosen_too_short"),
        (pair(ct=11), "chosen_too_long"),
        (pair(rt=11), "rejected_too_long"),
        (pair(ct=1, rt=9), "length_ratio"),  # (9+1)/(1+1) = 5 > 4
        (pair(chosen=REPEAT, reference=None), "repetitive_chosen"),
        (pair(chosen="2"), "chosen_incorrect"),
        (pair(text="What is the capital of France today?"), "eval_overlap"),
        (pair(rejected="1"), "student_matches_teacher"),
    ],
)
def test_each_filter_gives_its_reason(row: dict, reason: str) -> None:
    evals = ["Tell me: what is the capital of France?"]
    kept, quarantine, counts = curate.run(ALL_ON, [row], evals)
    assert kept == [] and [q["reason"] for q in quarantine] == [reason]
    assert quarantine[0]["pair_id"] == row["pair_id"]  # the whole row is kept, with the reason
    assert counts["pairs_in"] == counts["kept"] + counts["quarantined"] == 1


def test_clean_pair_is_kept_and_no_reference_means_no_correctness_check() -> None:
    kept, quarantine, _ = curate.run(ALL_ON, [pair(), pair(1, chosen="anything", reference=None)])
    assert len(kept) == 2 and quarantine == []


def test_duplicates_dropped_after_first_and_counts_reconcile() -> None:
    on = dataclasses.replace(ALL_ON, near_duplicates=OFF.near_duplicates)
    rows = [pair(0), pair(0), pair(1, chosen="7"), pair(0)]
    _kept, quarantine, counts = curate.run(on, rows)
    assert [q["reason"] for q in quarantine] == ["duplicate_pair", "chosen_incorrect", "duplicate_pair"]
    assert counts == {
        "pairs_in": 4,
        "kept": 1,
        "quarantined": 3,
        "dropped_by_reason": {"chosen_incorrect": 1, "duplicate_pair": 2},
    }


def test_near_duplicates_are_caught_by_minhash_but_templated_prompts_are_not() -> None:
    on = dataclasses.replace(
        OFF, near_duplicates=curation.NearDuplicateParams(enabled=True, threshold=0.8, num_perm=128, shingle_words=2)
    )
    base = "Write a short poem about the sea at night with stars and a quiet boat drifting home"
    rows = [
        pair(0, text=base, chosen="a poem", reference=None),
        pair(1, text=base + " please", chosen="a poem", reference=None),  # one word more: Jaccard 15/16
        pair(2, text="Reverse the word abc.", chosen="cba", reference=None),
        pair(3, text="Reverse the word abd.", chosen="dba", reference=None),  # same template, another task
    ]
    kept, quarantine, _ = curate.run(on, rows)
    assert [q["prompt"] for q in quarantine] == [base + " please"] and quarantine[0]["reason"] == "near_duplicate"
    assert len(kept) == 3


def test_balance_caps_each_category_in_input_order() -> None:
    on = dataclasses.replace(OFF, balance=curation.BalanceParams(key="category", max_per_value=2))
    rows = [pair(i, category="add" if i % 3 else "sort") for i in range(9)]
    kept, _quarantine, counts = curate.run(on, rows)
    assert [r["category"] for r in kept] == ["sort", "add", "add", "sort"]
    assert counts["dropped_by_reason"] == {"over_category_quota": 5}


def test_student_matches_teacher_policy_keep_keeps_them() -> None:
    kept, _, _ = curate.run(OFF, [pair(rejected="1")])
    assert len(kept) == 1


def test_disabled_filters_keep_everything() -> None:
    rows = [pair(chosen=""), pair(cf="length"), pair(chosen="wrong"), pair(chosen=REPEAT)]
    kept, quarantine, _ = curate.run(OFF, rows)
    assert len(kept) == 4 and not quarantine


def test_repetition_ratio_and_ngrams() -> None:
    assert curation.repetition_ratio("a b c d", 2) == (0.0, 3)
    share, total = curation.repetition_ratio(REPEAT, 3)
    assert total == 10 and share == pytest.approx(1 - 3 / 10)
    assert curation.ngrams(["x", "y"], 3) == [("x", "y")]  # shorter than n: itself, so exact matches count


@pytest.mark.parametrize(
    "bad, field", [("max_length_ratio", 0.5), ("student_matches_teacher", "sometimes"), ("min_chosen_tokens", -1)]
)
def test_bad_params_name_the_field(bad: str, field: object) -> None:
    with pytest.raises(ValueError, match=bad):
        dataclasses.replace(OFF, **{bad: field})
