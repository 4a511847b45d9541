"""dvc.yaml read as a DAG, the Prefect flow that runs it, code deps, lineage commands."""
