"""The comparison's analysis (docs/comparison-plan.md) against a naive reference written
with plain loops; Holm on a hand-worked example; TOST; contrasts; a skill; bad input."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from distillflow.base.errors import ParamsError
from distillflow.evaluation import analysis

RUNS = ("distillm2", "kd", "distillm2_plain_teacher", "kd_plain_teacher")
BOOTS, SEEDS, P = (1, 2, 3), (1, 2), 30
CATS = ["add", "sort", "walk"]


def make_data(seed: int = 0) -> dict:
    """run -> b -> s -> per-prompt columns as plain lists (correct None: no reference)."""
    rnd = random.Random(seed)
    skill = {"add": 0.8, "sort": 0.5, "walk": 0.3}
    data: dict = {}
    for ri, run in enumerate(RUNS):
        for b in BOOTS:
            for s in SEEDS:
                base = 0.05 * ri + 0.03 * b + 0.01 * s
                correct = [None if i % 11 == 5 else rnd.random() < skill[CATS[i % 3]] + base - 0.1 for i in range(P)]
                tokens = [rnd.randint(3, 12) for _ in range(P)]
                kl = [t * rnd.uniform(0.05, 0.3) * (1 + ri / 4) for t in tokens]
                data.setdefault(run, {}).setdefault(b, {})[s] = {
                    "correct": correct,
                    "kl_sum": kl,
                    "teacher_tokens": tokens,
                }
    return data


def replicate(data: dict, runs=RUNS, boots=BOOTS) -> analysis.Replicate:
    shape = (len(runs), len(boots), len(SEEDS), P)
    num = {m: np.zeros(shape) for m in ("exact_match", "kl_teacher_student")}
    den = {m: np.zeros(shape) for m in num}
    for r, run in enumerate(runs):
        for bi, b in enumerate(boots):
            for si, s in enumerate(SEEDS):
                c = data[run][b][s]
                cols = {k: np.array([np.nan if v is None else float(v) for v in c[k]]) for k in c}
                for m in num:
                    num[m][r, bi, si], den[m][r, bi, si] = analysis.ratio_terms(m, cols)
    cats = tuple(CATS[i % 3] for i in range(P))
    return analysis.Replicate(tuple(runs), tuple(boots), SEEDS, cats, num, den)


def naive_metric(cell: dict, metric: str, draw: list[int]) -> float:
    """The metric over the prompts `draw` (with repeats), by loops."""
    if metric == "exact_match":
        known = [cell["correct"][i] for i in draw if cell["correct"][i] is not None]
        return 100.0 * sum(1 for x in known if x) / len(known)
    return sum(cell["kl_sum"][i] for i in draw) / sum(cell["teacher_tokens"][i] for i in draw)


def naive_D(data: dict, contrast: dict, metric: str, draw: list[int]) -> tuple[float, list[float]]:
    ds = []
    for b in BOOTS:
        per_seed = []
        for s in SEEDS:
            per_seed.append(sum(c * naive_metric(data[run][b][s], metric, draw) for run, c in contrast.items()))
        ds.append(sum(per_seed) / len(per_seed))
    return sum(ds) / len(ds), ds


def sample_var(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def naive(data: dict, contrast: dict, metric: str, prompts: list[int], draws: list[list[int]], alpha, margin):
    D, ds = naive_D(data, contrast, metric, prompts)
    vp = sample_var([naive_D(data, contrast, metric, [prompts[j] for j in d])[0] for d in draws])
    se = math.sqrt(sample_var(ds) / len(ds) + vp)
    df = len(ds) - 1
    half = stats.t.ppf(1 - alpha / 2, df) * se
    p = 2 * stats.t.sf(abs(D) / se, df)
    p_tost = max(stats.t.sf((D + margin) / se, df), stats.t.cdf((D - margin) / se, df))
    return {"D": D, "ds": ds, "vp": vp, "se": se, "low": D - half, "high": D + half, "p": p, "p_tost": p_tost}


def draws_of(n: int, resamples: int, seed: int) -> list[list[int]]:
    return [list(map(int, row)) for chunk in analysis.resample_indices(n, resamples, seed) for row in chunk]


@pytest.mark.parametrize(
    ("text", "metric"),
    [
        ("distillm2 - kd", "exact_match"),
        ("distillm2 - kd", "kl_teacher_student"),
        ("distillm2_plain_teacher - kd_plain_teacher - distillm2 + kd", "exact_match"),
    ],
)
def test_estimate_matches_loops_over_the_same_draws(text: str, metric: str) -> None:
    data = make_data()
    an = analysis.Analysis(replicate(data), resamples=60, seed=3)
    contrast = analysis.parse_contrast(text, RUNS, "compare.analysis.primary")
    e = an.estimate(contrast, metric, alpha=0.05, margin=2.0)
    want = naive(data, contrast, metric, list(range(P)), draws_of(P, 60, 3), 0.05, 2.0)
    assert e.per_bootstrap == pytest.approx(want["ds"], rel=1e-12)
    assert e.estimate == pytest.approx(want["D"], rel=1e-12)
    assert e.var_prompts == pytest.approx(want["vp"], rel=1e-10) and e.var_prompts > 0
    assert e.se == pytest.approx(want["se"], rel=1e-10) and e.df == 2
    assert e.interval() == pytest.approx((want["low"], want["high"]), rel=1e-9)
    assert e.p == pytest.approx(want["p"], rel=1e-9) and e.p_tost == pytest.approx(want["p_tost"], rel=1e-9)


def test_resampling_agrees_with_draws_of_another_generator() -> None:
    """v_p from the numpy draws against a loop over random.Random draws: the same
    quantity from other draws (so equal up to resampling noise, 4000 resamples)."""
    data = make_data(1)
    contrast = {"distillm2": 1.0, "kd": -1.0}
    vp = analysis.Analysis(replicate(data), resamples=4000, seed=0).estimate(contrast, "exact_match", 0.05).var_prompts
    rnd = random.Random(7)
    other = [[rnd.randrange(P) for _ in range(P)] for _ in range(4000)]
    ref = sample_var([naive_D(data, contrast, "exact_match", d)[0] for d in other])
    assert vp == pytest.approx(ref, rel=0.12)


def test_the_same_resample_serves_every_cell_and_run() -> None:
    """One set of draws for every cell: the resampled values of one cell do not depend on
    which other runs are present, and a run minus itself has no prompt variance."""
    data = make_data()
    full = analysis.Analysis(replicate(data), 50, 9)
    two = analysis.Analysis(replicate(data, runs=("kd", "distillm2")), 50, 9)
    np.testing.assert_allclose(full.values("exact_match")[1][:, 1], two.values("exact_match")[1][:, 0])
    e = full.estimate({"kd": 1.0, "distillm2": 1.0}, "exact_match", 0.05)
    assert e.var_prompts > 0
    fixed = full.estimate({"kd": 2.0}, "exact_match", 0.05)  # a coefficient scales D and its variances
    one = full.estimate({"kd": 1.0}, "exact_match", 0.05)
    assert fixed.estimate == pytest.approx(2 * one.estimate) and fixed.var_prompts == pytest.approx(4 * one.var_prompts)


def test_a_skill_is_analysed_on_its_own_prompts_resampled_among_themselves() -> None:
    data = make_data()
    rep = replicate(data)
    walk = rep.skill("walk")
    assert list(walk) == [i for i in range(P) if CATS[i % 3] == "walk"] and rep.skills() == sorted(CATS)
    an = analysis.Analysis(rep, 40, 5, prompts=walk, label="skill walk")
    e = an.estimate({"distillm2": 1.0, "kd": -1.0}, "exact_match", 0.05, 2.0)
    want = naive(data, {"distillm2": 1.0, "kd": -1.0}, "exact_match", list(walk), draws_of(len(walk), 40, 5), 0.05, 2.0)
    assert e.estimate == pytest.approx(want["D"]) and e.var_prompts == pytest.approx(want["vp"])
    assert e.interval() == pytest.approx((want["low"], want["high"])) and e.prompts == "skill walk"


def test_holm_on_a_hand_worked_example() -> None:
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone)
    steps = analysis.holm([0.01, 0.04, 0.03, 0.005], 0.05)
    assert [s.p_adjusted for s in steps] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [s.rejected for s in steps] == [True, False, False, True]
    # levels: rank 1 alpha/4, rank 2 alpha/3; the procedure stops at rank 3 (alpha/2), and rank 4 stays there
    assert [s.level for s in steps] == pytest.approx([0.05 / 3, 0.05 / 2, 0.05 / 2, 0.05 / 4])
    assert [s.rejected for s in analysis.holm([0.001, 0.002], 0.05)] == [True, True]
    assert analysis.holm([0.001, 0.002], 0.05)[1].level == pytest.approx(0.05)


def constant(ds: list[float]) -> analysis.Analysis:
    """Two runs whose per-prompt values are constant in each cell: no prompt variance,
    and the per-bootstrap differences `ds` (in points)."""
    shape = (2, len(ds), 1, 10)
    num, den = np.zeros(shape), np.ones(shape)
    for bi, d in enumerate(ds):
        num[0, bi] = 50.0 + d
        num[1, bi] = 50.0
    rep = analysis.Replicate(
        ("x", "y"), tuple(range(1, len(ds) + 1)), (1,), ("a",) * 10, {"rouge_l": num}, {"rouge_l": den}
    )
    return analysis.Analysis(rep, 20, 0)


def test_tost_equivalent_and_not() -> None:
    close = constant([0.1, 0.2, 0.0]).estimate({"x": 1.0, "y": -1.0}, "rouge_l", 0.05, margin=2.0)
    se = 0.1 / math.sqrt(3)  # sample sd of the d_b is 0.1, no prompt variance
    assert close.var_prompts == pytest.approx(0.0, abs=1e-20) and close.se == pytest.approx(se)
    want = max(stats.t.sf((0.1 + 2) / se, 2), stats.t.cdf((0.1 - 2) / se, 2))
    assert close.p_tost == pytest.approx(want) and close.equivalent
    low, high = close.interval(0.10)  # the 90% interval lies inside (-2, 2)
    assert -2 < low and high < 2
    assert not close.rejects and analysis.verdict(close, close.rejects) == "equivalent within ±2"
    wide = constant([3.0, -2.0, 1.0]).estimate({"x": 1.0, "y": -1.0}, "rouge_l", 0.05, margin=2.0)
    assert not wide.equivalent and not wide.rejects and wide.p_tost > 0.05
    assert analysis.verdict(wide, wide.rejects) == "not measured to differ"
    big = constant([5.0, 5.5, 4.5]).estimate({"x": 1.0, "y": -1.0}, "rouge_l", 0.05, margin=2.0)
    assert big.rejects and analysis.verdict(big, big.rejects) == "x > y"
    assert analysis.verdict(big, False) == "not measured to differ"  # e.g. Holm did not reject


def test_primary_and_family_words() -> None:
    an = constant([5.0, 5.5, 4.5])
    prim = analysis.primary(an, "x - y", {"x": 1.0, "y": -1.0}, "rouge_l", 0.05, 2.0)
    assert prim.ordered and prim.words == "x > y" and prim.p_claim == prim.estimate.p
    fam = analysis.family(an, [("y - x", {"y": 1.0, "x": -1.0}), ("x", {"x": 1.0})], "rouge_l", 0.05, 2.0)
    # Holm: x's p is the smaller (rank 1, x2); y - x's is rank 2 (x1)
    assert fam[0].words == "y < x" and fam[0].p_claim == pytest.approx(fam[0].estimate.p)
    assert fam[1].p_claim == pytest.approx(2 * fam[1].estimate.p) and fam[1].level == pytest.approx(0.025)
    assert fam[1].words == "x > 0"  # not a two-run contrast: the contrast's sign
    low, high = fam[1].interval  # Holm-adjusted at 0.025: wider than the uncorrected 95% one
    assert high - low > fam[1].estimate.interval()[1] - fam[1].estimate.interval()[0]


def test_an_interaction_contrast_and_its_words() -> None:
    text = "distillm2_plain_teacher - kd_plain_teacher - distillm2 + kd"
    c = analysis.parse_contrast(text, RUNS, "compare.analysis.family[9]")
    assert c == {"distillm2_plain_teacher": 1.0, "kd_plain_teacher": -1.0, "distillm2": -1.0, "kd": 1.0}
    assert analysis.contrast_label(c) == text
    assert analysis.parse_contrast("-kd + distillm2 + distillm2", None, "k") == {"kd": -1.0, "distillm2": 2.0}
    an = analysis.Analysis(replicate(make_data()), 30, 0)
    e = an.estimate(c, "exact_match", 0.05, 2.0)
    assert analysis.verdict(e, True).endswith(("> 0", "< 0")) and analysis.verdict(e, True).startswith(text)


def test_bad_input_is_refused_with_the_key_or_cells() -> None:
    with pytest.raises(ParamsError, match=r"compare.analysis.family\[2\]: .*names \['dkd'\], not in compare.runs"):
        analysis.parse_contrast("distillm2 - dkd", RUNS, "compare.analysis.family[2]")
    with pytest.raises(ParamsError, match="compare.analysis.primary: cannot read"):
        analysis.parse_contrast("distillm2 * kd", RUNS, "compare.analysis.primary")
    with pytest.raises(ParamsError, match="cannot read"):
        analysis.parse_contrast("distillm2 kd", RUNS, "k")
    with pytest.raises(ParamsError, match="names no run"):
        analysis.parse_contrast("kd - kd", RUNS, "k")
    data = make_data()
    with pytest.raises(ParamsError, match=r"compare.bootstraps: 1 bootstrap\(s\) \[1\]; .* at least 2"):
        analysis.Analysis(replicate(data, boots=(1,)), 10, 0)
    rep = replicate(data)
    rep.den["kl_teacher_student"][1, 2, 0] = 0.0  # kd, bootstrap 3, seed 1: no teacher tokens at all
    an = analysis.Analysis(rep, 10, 0)
    assert an.undefined("kl_teacher_student", ["distillm2", "kd"]) == ["kd-b3-s1"]
    with pytest.raises(ValueError, match=r"undefined \(no denominator\) in cells \['kd-b3-s1'\]"):
        an.estimate({"distillm2": 1.0, "kd": -1.0}, "kl_teacher_student", 0.05)
    with pytest.raises(ValueError, match=r"no cells for \['gkd'\]"):
        an.estimate({"gkd": 1.0}, "exact_match", 0.05)


def test_prompts_of_one_group_are_resampled_together() -> None:
    """With groups (the toy task's instances: two or three phrasings each), a resample
    draws groups and counts each prompt as often as its group: v_p equals the loop over
    the same group draws with every member of a drawn group taken."""
    data = make_data(2)
    groups = tuple(f"g{i // 3}" if i % 7 else None for i in range(P))  # triples, and some prompts alone
    rep = replicate(data)
    grouped = analysis.Replicate(rep.runs, rep.bootstraps, rep.seeds, rep.categories, rep.num, rep.den, groups)
    contrast = {"distillm2": 1.0, "kd": -1.0}
    e = analysis.Analysis(grouped, resamples=50, seed=5).estimate(contrast, "exact_match", 0.05)
    keys: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        keys.setdefault(("prompt", i) if g is None else g, []).append(i)
    members = list(keys.values())
    draws = [[i for j in d for i in members[j]] for d in draws_of(len(members), 50, 5)]
    want = sample_var([naive_D(data, contrast, "exact_match", d)[0] for d in draws])
    assert e.var_prompts == pytest.approx(want, rel=1e-10)
    assert e.estimate == pytest.approx(naive_D(data, contrast, "exact_match", list(range(P)))[0], rel=1e-12)
    ungrouped = analysis.Analysis(rep, resamples=50, seed=5).estimate(contrast, "exact_match", 0.05)
    assert e.var_prompts != pytest.approx(ungrouped.var_prompts, rel=1e-6)
