"""Evaluation: every model's responses to the held-out prompts and what they are scored on.

Used by the evaluate stage (teacher, initial and distilled student) and by the comparison
cells (stages/compare.py: one trained student against its bootstrap's reference teacher).
`eval_params` holds params.yaml `evaluate`, the predictions' schema and the cells'
per-prompt scores' schema, `metrics` the scores (exact match per skill, response lengths,
ROUGE-L, teacher-forced NLL / KL / greedy agreement, per sequence where asked,
speculative decoding), `evaluator` what runs the models and gathers the scores;
`comparison` reads the comparison's cells, `analysis` tests them (paired differences
within bootstraps, prompt resamples, Holm, TOST: docs/comparison-plan.md) and
`comparison_report` writes the report (stages/report.py).
"""
