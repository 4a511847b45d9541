"""The step skills (distillflow/tasks/toy/steps.py): answers, the rule after any written
prefix, the verifier, the step score and the teacher's corrupted sequences."""

import itertools
import random

import pytest

from distillflow.tasks.toy import steps, toytask

from .builders import task

CFG = toytask.config_of(
    task(
        skills=("countdown", "walk", "runsum", "addc", "perm", "reverse", "minus"),
        min_len=6,
        max_len=9,
        alphabet="abcdefghij",
    )
)


def take(n: int, seed: int = 0) -> list[toytask.ToyExample]:
    return list(itertools.islice(toytask.examples(CFG, seed), n))


@pytest.mark.parametrize("ex", take(120), ids=lambda e: e.prompt)
def test_answers_are_ground_truth_from_the_prompt(ex: toytask.ToyExample) -> None:
    words = ex.prompt.rstrip(".").split()
    got = [int(t) for t in ex.answer.split()] if ex.skill in ("countdown", "walk") else []
    nums = [int(w.strip(",?")) for w in words if w.strip(",?").isdigit()]
    if ex.skill == "countdown":
        n, d, m = nums
        assert got == list(range(n, m - 1, -d)) and 6 <= len(got) <= 9
    elif ex.skill == "walk":
        a, b, s, t = nums
        assert got[0] == a and got[-1] == b and {y - x for x, y in zip(got, got[1:])} == {s, t}
    elif ex.skill == "runsum":
        xs = [int(w) for w in words if w.isdigit()]
        assert [int(t) for t in ex.answer.split()] == list(itertools.accumulate(xs))
    elif ex.skill == "addc":
        a, b = (int(w) for w in words if w.isdigit())
        assert ex.answer.endswith(f"= {a + b}")
        assert len(ex.answer.split()) == len(str(a)) + 2
    elif ex.skill == "perm":
        word = words[4] if ex.prompt.startswith("List") else words[4]
        assert sorted(ex.answer.split()) == sorted(word) and len(set(word)) == len(word)
    elif ex.skill == "minus":
        d, n = nums if ex.prompt.startswith(("Subtract", "Take")) else nums[::-1]
        assert ex.answer == str(n - d)
    else:
        assert ex.skill == "reverse"
        word = words[3] if ex.prompt.startswith("Reverse") else words[1]
        assert ex.answer == word[::-1]
    assert toytask.is_correct(ex.answer, ex.answer, ex.skill)
    scored = toytask.step_score(ex.answer, ex.answer, ex.skill)
    if ex.skill == "minus":
        assert scored is None  # one short answer, no steps
    else:
        assert scored == (len(steps.split_steps(ex.skill, ex.answer)),) * 2


def test_responses_are_about_15_to_40_tokens_on_the_step_skills() -> None:
    for ex in take(600):
        if ex.skill in steps.STEP_SKILLS:
            assert 11 <= len(ex.answer) <= 40, ex
    lengths = [len(e.answer) for e in take(600) if e.skill in ("countdown", "walk", "runsum", "addc")]
    assert min(lengths) >= 11 and sum(lengths) / len(lengths) > 18


def test_the_rule_follows_what_was_written_not_the_answer() -> None:
    down = steps.instance("countdown", "46 37 28 19 10 1")
    assert down is not None and down.values == (46, 9, 1)
    assert steps.next_steps(down, ["46", "36"]) == {"27"}  # 36 was wrong; the count goes on from it
    assert steps.next_steps(down, ["46", "36", "27", "18"]) == {"9"}
    assert steps.next_steps(down, ["46", "36", "27", "18", "9"]) == frozenset()  # 0 is below the floor of 1: the end
    assert steps.next_steps(down, ["46", "37", "28", "19", "10", "1"]) == frozenset()
    walk = steps.instance("walk", "13 14 16 17")
    assert walk is not None and walk.values == (13, 17, 1, 2)
    assert steps.next_steps(walk, ["13"]) == {"14", "15"}  # two right next steps
    assert steps.next_steps(walk, ["13", "15", "16"]) == {"17"}  # never past the goal
    assert steps.next_steps(walk, ["13", "18"]) == frozenset()  # a step past the goal ends the walk
    big = steps.instance("walk", "20 22 25 27")  # steps of 2 or 3
    assert big is not None and big.values == (20, 27, 2, 3)
    assert steps.next_steps(big, ["20", "22", "24"]) == {"27"}  # 26 would leave 1: the goal out of reach
    inst = steps.instance("runsum", "3 11 12 16")
    assert inst is not None and inst.values == (3, 8, 1, 4)
    assert steps.next_steps(inst, ["3", "12"]) == {"13"}  # 12 was wrong; the next total adds 1 to it
    assert steps.next_steps(inst, ["3", "11", "12", "16"]) == frozenset()  # the end
    assert steps.next_steps(inst, ["3", "x"]) is None  # an unreadable total: no next step is right
    add = steps.instance("addc", "7c0 5c1 8c0 = 857")
    assert add is not None and add.values == (7, 15, 7)
    assert steps.next_steps(add, ["7c0", "5c0"]) == {"7c0"}  # the written carry (0) is what counts
    assert steps.next_steps(add, ["7c0", "5c0", "7c0", "="]) == {"757"}  # the sum the written columns spell
    assert steps.next_steps(add, ["7c0", "5c1", "8c0"]) == {"="}
    perm = steps.instance("perm", "c a d")
    assert perm is not None and steps.next_steps(perm, ["a"]) == {"c", "d"}  # several right next steps
    assert steps.next_steps(perm, ["a", "b"]) == {"c", "d"}  # a wrong letter changes nothing left to list
    carry = steps.instance("addc", "9c1 9c1 = 199")
    assert carry is not None and steps.next_steps(carry, ["9c1", "9c1", "="]) == {"199"}


def test_verifier_accepts_any_order_for_perm_and_never_raises() -> None:
    assert toytask.is_correct("d a c b", "a b c d", "perm")
    assert not toytask.is_correct("d a c", "a b c d", "perm")
    assert not toytask.is_correct("d a c b b", "a b c d", "perm")
    assert not toytask.is_correct("da c b", "a b c d", "perm")
    assert not toytask.is_correct("3 11 12 17", "3 11 12 16", "runsum")
    assert toytask.is_correct("13 15 16 17", "13 14 16 17", "walk")  # another walk to the same goal
    assert not toytask.is_correct("13 16 17", "13 14 16 17", "walk")  # a step of 3
    assert not toytask.is_correct("13 15 16", "13 14 16 17", "walk")  # short of the goal
    assert not toytask.is_correct("12 14 16 17", "13 14 16 17", "walk")  # the wrong start
    for junk in ("", "   ", "=", "c1 = =", "\u00e9\u00e9", "9" * 500):
        refs = [("countdown", "9 5 1"), ("walk", "3 4 5"), ("runsum", "3 11"), ("addc", "7c0 5c1 8c0 = 857")]
        for skill, ref in [*refs, ("perm", "a b"), ("reverse", "ab")]:
            assert not toytask.is_correct(junk, ref, skill)
            right, total = steps.step_score(junk, ref, skill)
            assert 0 <= right <= total and total >= 1


def test_step_score_counts_right_steps_by_the_rule_and_missing_ones_as_wrong() -> None:
    # one wrong total, then the rule from it: 3 of 4 steps are right, and exact match is lost
    assert steps.step_score("3 12 13 17", "3 11 12 16", "runsum") == (3, 4)
    assert not toytask.is_correct("3 12 13 17", "3 11 12 16", "runsum")
    assert steps.step_score("3 11", "3 11 12 16", "runsum") == (2, 4)  # two steps left out
    assert steps.step_score("3 11 12 16 20", "3 11 12 16", "runsum") == (4, 5)  # one step too many
    assert steps.step_score("b a", "a b", "perm") == (2, 2)
    assert steps.step_score("a a", "a b", "perm") == (1, 3)  # the repeat is wrong, and b is still missing
    assert steps.step_score("46 36 27 18 9", "46 37 28 19 10 1", "countdown") == (4, 5)  # ends where its rule ends
    assert toytask.step_score("42", "42", "add") is None  # short answers have no steps


@pytest.mark.parametrize("seed", range(60))
def test_corrupted_sequences_have_one_wrong_step_and_follow_the_rule_after_it(seed: int) -> None:
    rng = random.Random(seed)
    ex = take(12, seed)[seed % 6]  # the six step skills, not minus
    inst = steps.instance(ex.skill, ex.answer)
    assert inst is not None
    made = steps.corrupted(inst, rng, CFG.alphabet)
    if made is None:  # addc's "=" drawn: no wrong step there
        assert ex.skill == "addc"
        return
    written, j = made
    for k, step in enumerate(written):
        valid = steps.next_steps(inst, written[:k])
        assert valid is not None
        assert (step in valid) == (k != j), (written, j, k)
    assert steps.next_steps(inst, written) == frozenset()  # it ends where the rule ends
