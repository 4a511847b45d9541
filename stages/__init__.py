"""distillflow's pipeline stages: one module per dvc.yaml stage (`python -m stages.<name>`),
plus genstage, the teacher/student body."""
