from pathlib import Path

import pytest
import torch

from distillflow.base import encoding, models
from distillflow.evaluation import evaluator, metrics
from distillflow.evaluation.eval_params import EvaluateParams

from .builders import load, prompt


def test_accuracy_overall_and_per_category() -> None:
    ps = [prompt(0), prompt(1), {**prompt(2), "category": "sort"}]
    gens = [{"response": "1"}, {"response": "3"}, {"response": " 3 "}]
    acc = metrics.accuracy(ps, gens)
    want = {"exact_match": round(2 / 3, 4), "per_category": {"add": 0.5, "sort": 1.0}, "n": 3}
    assert acc == want | {"per_length": {"01-10": round(2 / 3, 4)}}  # no step skill: no step share
    assert metrics.accuracy([{**prompt(0), "reference": None}], [{"response": "x"}]) is None
    # a step skill: the verifier's pass rate, the share of steps right by the rule, and length bins
    down = {**prompt(3), "category": "countdown", "reference": "46 37 28 19 10 1"}  # 16 characters
    walk = {**prompt(4), "category": "walk", "reference": "13 14 16 17 19 20"}  # 17 characters
    acc = metrics.accuracy([down, walk], [{"response": "46 36 27 18 9"}, {"response": "13 15 17 18 20"}])
    assert acc["exact_match"] == 0.5 and acc["per_category"] == {"countdown": 0.0, "walk": 1.0}
    # countdown: 46 right, 36 wrong, then 27 18 9 right by the rule from 36, which ends there (0 < 1): 4 of 5;
    # walk: another right walk, 5 of 5
    assert acc["step_share_per_category"] == {"countdown": 0.8, "walk": 1.0}
    assert acc["step_share"] == 0.9 and acc["per_length"] == {"11-17": 0.5}


EP = EvaluateParams(
    batch_size=4, max_new_tokens=4, temperature=1.0, seed=0, speculative_prompts=3, draft_tokens=2, device="cpu"
)


def test_rouge_l_is_the_word_lcs_f1() -> None:
    assert metrics.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 5 / (6 + 5))
    assert metrics.rouge_l("A b", "a B") == 1.0 and metrics.rouge_l("x", "y") == 0.0
    assert metrics.rouge_l("", "") == 0.0 and metrics.rouge_l("", "a") == 0.0  # as rouge-score: no words, no match
    assert metrics.rouge_l("b a", "a b") == pytest.approx(0.5)  # order matters: LCS is one word


# Pairs with ties, repeats, punctuation, case, digits, non-ASCII letters and empty texts
# (rouge-score gives 0 whenever either side has no word, two empty texts included).
ROUGE_CORPUS = [
    ("the cat sat on the mat", "the cat on the mat"),
    ("A b", "a B"),
    ("x", "y"),
    ("b a", "a b"),
    ("", ""),
    ("", "a"),
    ("a", ""),
    ("!!! ...", "?"),
    ("12 + 34 = 46", "12+34=46"),
    ("Sort: c, b, a -> a b c", "a b c"),
    ("a a a b", "a b a b a"),
    ("héllo wörld", "hello world"),
    ("reverse abcdefg gfedcba", "gfedcba"),
    ("one two three four five six", "six five four three two one"),
    ("the the the", "the"),
]


def test_rouge_l_agrees_with_the_rouge_score_package() -> None:
    from rouge_score import rouge_scorer  # the test extra installs it

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for candidate, reference in ROUGE_CORPUS:
        want = scorer.score(reference, candidate)["rougeL"].fmeasure
        assert metrics.rouge_l(candidate, reference) == pytest.approx(want, rel=1e-12, abs=0.0), (candidate, reference)


def test_length_stats() -> None:
    gens = [{"response_tokens": n, "finish_reason": "length" if n == 9 else "stop"} for n in (1, 2, 3, 9)]
    assert metrics.length_stats(gens) == {"mean": 3.75, "p50": 3, "p90": 9, "max": 9, "truncated": 0.25}


def test_teacher_forced_scores(tiny_models: Path, taught_models: Path) -> None:
    teacher, tok = load(taught_models / "teacher")  # trained, so its greedy choices differ from a random model's
    student, _ = load(tiny_models / "student")
    ps = [prompt(i) for i in range(5)]
    seqs = metrics.sequences(
        tok, ps, [{"response": str(i + 1), "finish_reason": "stop", "token_ids": None} for i in range(5)]
    )
    self_scores = metrics.teacher_forced(teacher, teacher, tok, seqs, len(tok), 2, "x")
    assert self_scores["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and self_scores["greedy_agreement"] == 1.0
    other = metrics.teacher_forced(teacher, student, tok, seqs, len(tok), 2, "x")
    assert other["kl_teacher_student"] > 0.01 and 0.0 <= other["greedy_agreement"] < 1.0
    # NLL against a direct computation on one sequence
    b = encoding.collate(seqs[:1], tok.pad_token_id)
    logp = torch.log_softmax(student(input_ids=b.input_ids).logits[0].double(), -1)
    want = -sum(float(logp[t, b.targets[0, t]]) for t in range(b.input_ids.shape[1]) if b.response_mask[0, t]) / int(
        b.response_mask.sum()
    )
    assert metrics.teacher_forced(None, student, tok, seqs[:1], len(tok), 2, "x") == {
        "nll": pytest.approx(want, rel=1e-5)
    }
    empty = metrics.sequences(tok, ps, [{"response": "", "finish_reason": "length", "token_ids": None} for _ in ps])
    with pytest.raises(ValueError, match="x have no tokens to score"):
        metrics.teacher_forced(teacher, student, tok, empty, len(tok), 2, "x")
    # per sequence (the comparison's per-prompt scores): each row is that sequence scored alone
    lengths = [str(10**i) for i in range(5)]  # responses of different lengths, batched 2 at a time
    varied = metrics.sequences(tok, ps, [{"response": r, "finish_reason": "stop", "token_ids": None} for r in lengths])
    rows = metrics.teacher_forced(teacher, student, tok, varied, len(tok), 2, "x", per_sequence=True)["per_sequence"]
    for i, seq in enumerate(varied):
        alone = metrics.teacher_forced(teacher, student, tok, [seq], len(tok), 1, "x")
        n = rows["tokens"][i]
        assert n == len(seq[1]) and rows["nll"][i] / n == pytest.approx(alone["nll"], rel=1e-5)
        assert rows["kl"][i] / n == pytest.approx(alone["kl_teacher_student"], rel=1e-4, abs=1e-6)
        assert rows["agree"][i] / n == pytest.approx(alone["greedy_agreement"], abs=1e-6)


def spec(teacher: torch.nn.Module, student: torch.nn.Module, tok, ps: list[dict], p: EvaluateParams) -> dict:
    vocab = models.check_vocabularies(tok, tok, student.config.vocab_size, teacher.config.vocab_size)
    ends = set(models.end_ids(tok, teacher.generation_config))
    return metrics.speculative(teacher, student, tok, ps, p, vocab, ends)


def test_speculative_decoding_counts_teacher_calls_and_keeps_greedy_output(
    tiny_models: Path, taught_models: Path
) -> None:
    teacher, tok = load(taught_models / "teacher")
    twin, _ = load(taught_models / "teacher")  # a perfect draft
    student, _ = load(tiny_models / "student")
    ps = [prompt(i) for i in range(4)]
    own = spec(teacher, twin, tok, ps, EP)  # every drafted token is accepted
    assert own["prompts"] == 3 and own["matches_greedy"] == 1.0 and own["teacher_calls_per_token_plain"] == 1.0
    assert own["acceptance_rate"] == 1.0 and own["teacher_call_speedup"] > 1.5
    other = spec(teacher, student, tok, ps, EP)
    assert other["matches_greedy"] == 1.0 and other["tokens"] == own["tokens"]
    assert other["teacher_call_speedup"] <= own["teacher_call_speedup"]
    assert other["acceptance_rate"] < 1.0


def test_speculative_plain_decoding_is_the_teachers_greedy_generate(taught_models: Path) -> None:
    """Our decoding loop against transformers' own greedy `generate` (unpadded model)."""
    teacher, tok = load(taught_models / "teacher")
    ends = set(models.end_ids(tok, teacher.generation_config))
    for i in range(3):
        ids = encoding.prompt_ids(tok, prompt(i)["prompt"])
        ours, calls = metrics.greedy(teacher, ids, ends, EP, len(tok), "cpu")
        theirs = teacher.generate(
            torch.tensor([ids]), max_new_tokens=EP.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        assert ours == theirs[: len(ours)] and calls == len(ours)


def test_speculative_decoding_with_padded_widths_drafts_exactly_draft_tokens(taught_models: Path) -> None:
    """A teacher and student of one tokenizer whose logit rows are padded to different
    widths (transformers' assisted generation refuses them); the padded rows never win
    even when they hold the largest logits, and each teacher pass checks exactly
    `draft_tokens` drafted tokens."""
    teacher, tok = load(taught_models / "teacher")
    twin, _ = load(taught_models / "teacher")
    v = len(tok)
    for model, extra in ((teacher, 5), (twin, 13)):
        head = model.get_output_embeddings()
        model.resize_token_embeddings(v + extra)
        with torch.no_grad():
            model.get_output_embeddings().weight[v:] = 50.0  # would win every argmax if not cut
        assert head is not None and model.config.vocab_size == v + extra
    long = EvaluateParams(
        batch_size=4, max_new_tokens=7, temperature=0.0, seed=0, speculative_prompts=2, draft_tokens=3, device="cpu"
    )
    ps = [{**prompt(i), "prompt": "Reverse the letters of abcdefghij."} for i in range(2)]
    ends: set[int] = set()  # no eos: every response is max_new_tokens long, so the pass count is exact
    vocab = models.check_vocabularies(tok, tok, twin.config.vocab_size, teacher.config.vocab_size)
    got = metrics.speculative(teacher, twin, tok, ps, long, vocab, ends)
    # 7 tokens a prompt: draft 3 + 1 from the teacher, twice (the second draft is cut to the 2 left): 2 passes
    assert got["tokens"] == 14 and got["teacher_calls_per_token"] == round(4 / 14, 4)
    assert got["acceptance_rate"] == 1.0 and got["matches_greedy"] == 1.0 and got["draft_tokens"] == 3
    out, _ = metrics.greedy(teacher, encoding.prompt_ids(tok, ps[0]["prompt"]), ends, long, vocab, "cpu")
    assert max(out) < v


def test_run_reports_every_model(tiny_models: Path) -> None:
    loaded = {}
    for name, role in (("teacher", "teacher"), ("student_initial", "student"), ("student_distilled", "student")):
        m, tok = load(tiny_models / role)
        loaded[name] = (m, tok, models.model_fingerprint(models.ModelRef(str(tiny_models / role), None), tiny_models))
    ps = [prompt(i) for i in range(6)]
    got, predictions = evaluator.evaluate_models(loaded, ps, EP)
    assert set(got) == {"teacher", "student_initial", "student_distilled"}
    assert (
        got["student_initial"]["kl_teacher_student"] == got["student_distilled"]["kl_teacher_student"]
    )  # same weights
    assert got["teacher"]["accuracy"]["n"] == 6
    for name in ("student_initial", "student_distilled"):
        m = got[name]
        assert {
            "kl_teacher_student",
            "nll_on_teacher_responses",
            "nll_on_own_responses",
            "greedy_agreement",
            "rouge_l_vs_teacher",
            "speculative",
            "response_tokens",
        } <= set(m)
        assert m["speculative"]["matches_greedy"] == 1.0 and 0.0 <= m["rouge_l_vs_teacher"] <= 1.0
        assert (
            m["own_response_tokens_scored"] > 0 and m["nll_on_own_responses"] > 0
        )  # random models emit scorable characters
    assert len(predictions) == 18 and {p["model"] for p in predictions} == set(got)
