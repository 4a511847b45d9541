import itertools

import pytest

from distillflow.tasks.toy import toytask

from .builders import task

CFG = toytask.config_of(
    task(skills=("add", "reverse", "sort", "upper", "count"), max_digits=3, max_len=7, alphabet="abcdefghij")
)


def take(n: int, seed: int = 0) -> list[toytask.ToyExample]:
    return list(itertools.islice(toytask.examples(CFG, seed), n))


def test_generator_is_deterministic_and_seed_dependent() -> None:
    assert take(50, seed=3) == take(50, seed=3)
    assert take(50, seed=3) != take(50, seed=4)


def test_skills_round_robin_so_every_prefix_is_balanced() -> None:
    skills = [e.skill for e in take(10 * len(CFG.skills))]
    for s in CFG.skills:
        assert skills.count(s) == 10


@pytest.mark.parametrize("ex", take(200), ids=lambda e: e.prompt)
def test_answers_are_ground_truth(ex: toytask.ToyExample) -> None:
    words = ex.prompt.rstrip(".?").split()
    if ex.skill == "add":
        nums = [int(w) for w in words if w.isdigit()]
        assert len(nums) == 2 and int(ex.answer) == sum(nums)
    elif ex.skill == "reverse":
        word = next(w for w in words if w in {ex.answer[::-1]})
        assert ex.answer == word[::-1]
    elif ex.skill == "sort":
        word = words[-1] if "order" not in ex.prompt else words[4]
        assert ex.answer == "".join(sorted(word))
    elif ex.skill == "upper":
        word = ex.prompt.split()[1]
        assert ex.answer == word.upper()
    elif ex.skill == "count":
        letter, word = (words[3], words[5]) if ex.prompt.startswith("Count") else (words[2], words[5])
        assert int(ex.answer) == word.count(letter)


def test_is_correct_strips_whitespace_only() -> None:
    assert toytask.is_correct(" 42 ", "42", "add")
    assert not toytask.is_correct("042", "42", "add")
    assert not toytask.is_correct("4 2", "42", "add")
