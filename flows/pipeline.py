"""The Prefect flow that runs dvc.yaml, for deployments (prefect.yaml's entrypoint).

The flow itself lives in the library (distillflow/orchestration/pipeline.py) so that the
installed `distillflow run` command has it; this file only names it for `prefect deploy`.
"""

from distillflow.orchestration.pipeline import distill

__all__ = ["distill"]
