"""distillflow's pipeline stages: one module per dvc.yaml stage (`python -m stages.<name>`),
run from the repo root; what they share lives in the distillflow package."""
