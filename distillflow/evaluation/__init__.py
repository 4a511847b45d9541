"""Evaluation: every model's responses to the held-out prompts and what they are scored on.

Used by the evaluate stage (teacher, initial and distilled student) and by the comparison
cells (stages/compare.py: one trained student against the teacher). `eval_params` holds
params.yaml `evaluate` and the predictions' schema, `metrics` the scores (exact match per
skill, response lengths, ROUGE-L, teacher-forced NLL / KL / greedy agreement, speculative
decoding), `evaluator` what runs the models and gathers the scores; `comparison` and
`comparison_report` turn the comparison's cells into its report (stages/report.py).
"""
