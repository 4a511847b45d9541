from pathlib import Path

import pytest

from stages import evaluate
from stages.lib import models

from .test_pairs import prompt
from .test_train import load


def test_accuracy_overall_and_per_category() -> None:
    ps = [prompt(0), prompt(1), {**prompt(2), "category": "sort"}]
    gens = [{"response": "1"}, {"response": "3"}, {"response": " 3 "}]
    acc = evaluate.accuracy(ps, gens)
    assert acc == {"exact_match": round(2 / 3, 4), "per_category": {"add": 0.5, "sort": 1.0}, "n": 3}
    assert evaluate.accuracy([{**prompt(0), "reference": None}], [{"response": "x"}]) is None


def test_kl_is_zero_for_the_teacher_itself_and_positive_for_another_model(tiny_models: Path) -> None:
    teacher, tok = load(tiny_models / "teacher")
    student, _ = load(tiny_models / "student")
    ps = [prompt(i) for i in range(5)]
    responses = [{"response": str(i + 1), "finish_reason": "stop"} for i in range(5)]
    assert evaluate.kl_on_responses(teacher, teacher, tok, ps, responses, len(tok), 2) == pytest.approx(0.0, abs=1e-6)
    assert evaluate.kl_on_responses(teacher, student, tok, ps, responses, len(tok), 2) > 0.01
    empty = [{"response": "", "finish_reason": "length"} for _ in ps]
    with pytest.raises(ValueError, match="no tokens to score"):
        evaluate.kl_on_responses(teacher, student, tok, ps, empty, len(tok), 2)


def test_run_reports_every_model(tiny_models: Path) -> None:
    loaded = {}
    for name, role in (("teacher", "teacher"), ("student_initial", "student"), ("student_distilled", "student")):
        m, tok = load(tiny_models / role)
        loaded[name] = (m, tok, models.fingerprint(models.ModelRef(str(tiny_models / role), None), tiny_models))
    ps = [prompt(i) for i in range(6)]
    metrics, predictions = evaluate.run(loaded, ps, evaluate.EvaluateParams(batch_size=4, max_new_tokens=4, temperature=1.0, seed=0))
    assert set(metrics) == {"teacher", "student_initial", "student_distilled"}
    assert metrics["student_initial"]["kl_teacher_student"] == metrics["student_distilled"]["kl_teacher_student"]  # same weights
    assert metrics["teacher"]["accuracy"]["n"] == 6
    assert len(predictions) == 18 and {p["model"] for p in predictions} == set(metrics)
