import pytest

from stages import curate

from .test_pairs import prompt

ALL_ON = curate.CurateParams(
    drop_duplicates=True, drop_empty_chosen=True, drop_empty_rejected=True, drop_truncated_chosen=True,
    drop_truncated_rejected=True, max_chosen_tokens=10, max_rejected_tokens=10, require_correct_chosen=True,
)


def pair(i: int = 0, chosen: str = "1", rejected: str = "9", cf: str = "stop", rf: str = "stop", ct: int = 2, rt: int = 2, reference: str | None = "1") -> dict:
    pr = prompt(i)
    return {
        "pair_id": f"p{i}{chosen}{rejected}", "prompt_id": pr["prompt_id"], "chosen_id": "c", "rejected_id": "r",
        "prompt": pr["prompt"], "chosen": chosen, "rejected": rejected, "reference": reference, "category": "add",
        "chosen_finish_reason": cf, "rejected_finish_reason": rf, "chosen_tokens": ct, "rejected_tokens": rt,
    }


@pytest.mark.parametrize(
    "row, reason",
    [
        (pair(chosen=" "), "empty_chosen"),
        (pair(rejected=""), "empty_rejected"),
        (pair(cf="length"), "truncated_chosen"),
        (pair(rf="length"), "truncated_rejected"),
        (pair(ct=11), "chosen_too_long"),
        (pair(rt=11), "rejected_too_long"),
        (pair(chosen="2"), "chosen_incorrect"),
    ],
)
def test_each_filter_gives_its_reason(row: dict, reason: str) -> None:
    kept, quarantine, counts = curate.run(ALL_ON, [row])
    assert kept == [] and [q["reason"] for q in quarantine] == [reason]
    assert quarantine[0]["pair_id"] == row["pair_id"]  # the whole row is kept, with the reason


def test_clean_pair_is_kept_and_no_reference_means_no_correctness_check() -> None:
    kept, quarantine, _ = curate.run(ALL_ON, [pair(), pair(1, chosen="anything", reference=None)])
    assert len(kept) == 2 and quarantine == []


def test_duplicates_dropped_after_first_and_counts_reconcile() -> None:
    rows = [pair(0), pair(0), pair(1, chosen="7"), pair(0)]
    kept, quarantine, counts = curate.run(ALL_ON, rows)
    assert [q["reason"] for q in quarantine] == ["duplicate_pair", "chosen_incorrect", "duplicate_pair"]
    assert counts == {"pairs_in": 4, "kept": 1, "quarantined": 3, "dropped_by_reason": {"chosen_incorrect": 1, "duplicate_pair": 2}}


def test_disabled_filters_keep_everything() -> None:
    off = curate.CurateParams(False, False, False, False, False, 100, 100, False)
    rows = [pair(chosen=""), pair(cf="length"), pair(chosen="wrong")]
    kept, quarantine, _ = curate.run(off, rows)
    assert len(kept) == 3 and not quarantine

