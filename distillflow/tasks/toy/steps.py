"""The step skills of the embedded task: responses made of dependent steps.

    countdown "Count down from 46 by 9."             -> "46 37 28 19 10 1"
    walk      "Walk from 13 to 20 by 1 or 2."        -> "13 14 16 17 19 20" (any such walk is right)
    runsum    "Running sum of 3 8 1 4 9 2."          -> "3 11 12 16 25 27"
    addc      "Add 472 and 385 column by column."    -> "7c0 5c1 8c0 = 857"
    perm      "List each letter of cadbe once."      -> "c a d b e" (any order is right)
    reverse   "Reverse the word qkdfa."              -> "afdkq" (the short control, one step a letter)

Every skill has a rule that gives the valid next steps from what was *written* so far,
not from the right answer: a countdown's next number is the last written one minus the
step, and it ends before a negative number; a walk goes up 1 or 2 from the last written
number and ends on its goal; a running total is the last written total plus the next
number; a column's digit and carry follow from the operand digits and the carry written
in the column before; the letters left to list are those not yet written. So after any
prefix, a wrong one included, the next step is defined, an early error carries into
every later step (exact match is lost for the whole response), and `walk` and `perm`
have several right answers (the teacher's real uncertainty). addc writes each column as
`<digit>c<carry>` from the right, then `=` and the sum the written columns spell.

A skill's `Instance` is recovered from a right reference answer alone (operands are
the differences of running totals, column sums are digit + 10 carry - carry in, ...),
so the verifier and the step score need only (response, reference, skill): the fields
every prompt record carries.

`corrupted` builds the teacher's training sequences with one wrong step: the steps
before it are right, the wrong step is masked out of the loss, and the steps after it
follow the rule from the written (wrong) prefix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

STEP_SKILLS: tuple[str, ...] = ("countdown", "walk", "runsum", "addc", "perm")
SEPARATOR: dict[str, str] = {s: " " for s in STEP_SKILLS} | {"reverse": ""}


@dataclass(frozen=True)
class Instance:
    """What the rule needs: countdown's (start, step), walk's (start, goal), runsum's
    numbers, addc's column sums (operand digits, from the right), perm's letters,
    reverse's reversed word."""

    skill: str
    values: tuple[int, ...] = ()
    letters: str = ""


def split_steps(skill: str, text: str) -> list[str]:
    """A response's steps: space-separated, or characters for reverse."""
    text = text.strip()
    if not text:
        return []
    sep = SEPARATOR[skill]
    return list(text) if sep == "" else text.split(sep)


def join_steps(skill: str, steps: Sequence[str]) -> str:
    return SEPARATOR[skill].join(steps)


def _int(s: str) -> int | None:
    return int(s) if s.isdigit() and len(s) <= 4 else None


def _column(s: str) -> tuple[int, int] | None:
    """(digit, carry) of a written addc column `<digit>c<carry>`, or None."""
    if len(s) == 3 and s[0].isdigit() and s[1] == "c" and s[2] in "01":
        return int(s[0]), int(s[2])
    return None


def next_steps(inst: Instance, written: Sequence[str]) -> frozenset[str] | None:
    """The valid next steps after `written`: empty when the response should end there,
    None when a written step the rule reads is unreadable (no step can be right)."""
    k = len(written)
    if inst.skill in ("countdown", "walk"):
        if k == 0:
            return frozenset({str(inst.values[0])})
        last = _int(written[k - 1])
        if last is None:
            return None
        if inst.skill == "countdown":  # (start, step, floor): down by the step, never below the floor
            _, d, floor = inst.values
            return frozenset({str(last - d)}) if last - d >= floor else frozenset()
        # walk (start, goal, step, step): up by either step while the goal stays reachable; it ends there
        _, goal, *sizes = inst.values
        return frozenset(str(last + s) for s in sizes if _reachable(goal - last - s, sizes))
    if inst.skill == "runsum":
        xs = inst.values
        if k >= len(xs):
            return frozenset()
        if k == 0:
            return frozenset({str(xs[0])})
        last = _int(written[k - 1])
        return None if last is None else frozenset({str(last + xs[k])})
    if inst.skill == "addc":
        cols = len(inst.values)
        if k < cols:
            carry = 0
            if k > 0:
                prev = _column(written[k - 1])
                if prev is None:
                    return None
                carry = prev[1]
            s = inst.values[k] + carry
            return frozenset({f"{s % 10}c{s // 10}"})
        if k == cols:
            return frozenset({"="})
        if k == cols + 1:
            parsed = [_column(w) for w in written[:cols]]
            if any(c is None for c in parsed):
                return None
            digits = "".join(str(d) for d, _ in reversed(parsed))  # type: ignore[misc]
            lead = "1" if parsed[-1][1] == 1 else ""  # type: ignore[index]
            return frozenset({str(int(lead + digits))})
        return frozenset()
    if inst.skill == "perm":
        left = set(inst.letters) - set(written)
        return frozenset(left)
    if inst.skill == "reverse":
        return frozenset({inst.letters[k]}) if k < len(inst.letters) else frozenset()
    raise ValueError(f"not a step skill: {inst.skill!r}")


def _reachable(rest: int, sizes: Sequence[int]) -> bool:
    """Whether steps of `sizes` add up to exactly `rest` (>= 0)."""
    ok = [True] + [False] * max(rest, 0)
    for r in range(1, rest + 1):
        ok[r] = any(r >= s and ok[r - s] for s in sizes)
    return rest >= 0 and ok[rest]


def instance(skill: str, reference: str) -> Instance | None:
    """The instance behind a right reference answer; None when it does not parse."""
    steps = split_steps(skill, reference)
    if skill in ("countdown", "walk"):
        nums = [_int(s) for s in steps]
        if len(nums) < 2 or any(n is None for n in nums):
            return None
        if skill == "countdown":  # the floor is the last number: the prompt's "to <floor>"
            return Instance(skill, values=(nums[0], nums[0] - nums[1], nums[-1]))  # type: ignore[arg-type, operator]
        # a reference walk uses both step sizes (toytask makes it so): they are its differences
        sizes = sorted({b - a for a, b in zip(nums, nums[1:])})  # type: ignore[operator]
        if len(sizes) != 2 or sizes[0] < 1:
            return None
        return Instance(skill, values=(nums[0], nums[-1], *sizes))  # type: ignore[arg-type]
    if skill == "runsum":
        totals = [_int(s) for s in steps]
        if not totals or any(t is None for t in totals):
            return None
        xs = [totals[0]] + [b - a for a, b in zip(totals, totals[1:])]  # type: ignore[operator]
        return Instance(skill, values=tuple(xs))  # type: ignore[arg-type]
    if skill == "addc":
        if "=" not in steps:
            return None
        cols = [_column(s) for s in steps[: steps.index("=")]]
        if not cols or any(c is None for c in cols):
            return None
        sums, carry = [], 0
        for d, c in cols:  # type: ignore[misc]
            sums.append(d + 10 * c - carry)
            carry = c
        return Instance(skill, values=tuple(sums))
    if skill in ("perm", "reverse"):
        return Instance(skill, letters="".join(steps)) if steps else None
    return None


def step_score(response: str, reference: str, skill: str) -> tuple[int, int]:
    """(steps right by the rule from what was written, steps counted): every written
    step is checked against the rule, and where the response stops before the rule
    ends, the steps the rule still needs count as wrong (as many as a rollout from the
    written prefix takes; the reference's remainder when that prefix is unreadable).
    An unparseable response scores 0, never raises."""
    inst = instance(skill, reference)
    ref_steps = split_steps(skill, reference)
    if inst is None:
        return 0, max(len(ref_steps), 1)
    written = split_steps(skill, response)
    right = 0
    for k, step in enumerate(written):
        valid = next_steps(inst, written[:k])
        right += valid is not None and step in valid
    return right, max(len(written) + _still_needed(inst, written, len(ref_steps)), 1)


def _still_needed(inst: Instance, written: list[str], ref_len: int) -> int:
    """How many steps the rule still needs after `written` (a rollout's length; the
    reference's remainder, at least 1, where the rule cannot go on)."""
    out = list(written)
    rng = random.Random(0)
    while (valid := next_steps(inst, out)) is not None:
        if not valid:
            return len(out) - len(written)
        out.append(rng.choice(sorted(valid)))
    return len(out) - len(written) + max(ref_len - len(out), 1)


def verify(response: str, reference: str, skill: str) -> bool:
    """The skill's verifier: perm accepts any order of the reference's letters, each
    once; every other skill wants the reference exactly (surrounding spaces aside)."""
    if skill == "perm":
        got, want = split_steps(skill, response), split_steps(skill, reference)
        return all(len(s) == 1 for s in got) and sorted(got) == sorted(want)
    if skill == "walk":  # any walk from the start to the goal by the two step sizes
        inst = instance(skill, reference)
        got = [_int(s) for s in split_steps(skill, response)]
        if inst is None or not got or any(n is None for n in got):
            return False
        start, goal, *sizes = inst.values
        return (
            got[0] == start and got[-1] == goal and all(b - a in sizes for a, b in zip(got, got[1:]))  # type: ignore[operator]
        )
    return response.strip() == reference.strip()


def rollout(inst: Instance, written: list[str], rng: random.Random) -> list[str]:
    """Continue `written` by the rule to the end (perm: a uniform choice of the letters
    left, so the teacher learns every order)."""
    out = list(written)
    while True:
        valid = next_steps(inst, out)
        if valid is None:
            raise ValueError(f"{inst.skill}: the rule cannot continue {out!r}")
        if not valid:
            return out
        out.append(rng.choice(sorted(valid)))


def _wrong(inst: Instance, written: list[str], rng: random.Random, alphabet: str) -> str | None:
    """A wrong step after `written`, or None where none is defined (addc's `=`, a perm
    whose alphabet has no letter left to misuse)."""
    valid = next_steps(inst, written)
    assert valid
    (right,) = sorted(valid)[:1]
    if inst.skill in ("runsum", "countdown", "walk"):
        wrong = [str(int(right) + d) for d in range(-9, 10) if int(right) + d >= 0]
        return rng.choice([w for w in wrong if w not in valid])
    if inst.skill == "addc":
        if right == "=":
            return None
        col = _column(right)
        if col is not None:
            choices = [f"{d}c{c}" for d in range(10) for c in (0, 1) if (d, c) != col]
            return rng.choice(choices)
        i = rng.randrange(len(right))
        return right[:i] + rng.choice([d for d in "0123456789" if d != right[i]]) + right[i + 1 :]
    if inst.skill == "perm":
        bad = sorted(set(alphabet) - valid)
        return rng.choice(bad) if bad else None
    return rng.choice([c for c in alphabet if c != right])


def corrupted(inst: Instance, rng: random.Random, alphabet: str) -> tuple[list[str], int] | None:
    """(steps, index of the one wrong step): right steps before it, the rule's steps
    from the written prefix after it. None when the drawn place has no wrong step."""
    right = rollout(inst, [], rng)
    j = rng.randrange(len(right))
    bad = _wrong(inst, right[:j], rng, alphabet)
    if bad is None:
        return None
    return rollout(inst, [*right[:j], bad], rng), j
