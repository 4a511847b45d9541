"""distillflow: a data-centric LLM distillation pipeline (DistiLLM-2 and baselines).

The library, in layers that import only downward (tests/test_layers.py holds the order):

    base           errors, params loading, shared params sections, records and ids, io, models,
                   quarantine
    tasks          the task interface and registry; the embedded toy task is one plugin
    engines        generation engines (transformers, vLLM, OpenAI-compatible), scoring, shards
    data           prompt sources, split, synthesis (it generates: above engines), pairing, curation
    training       losses, methods, the trainer
    evaluation     metrics and the evaluator
    audit          quality gates (Great Expectations), lineage manifests, OpenLineage
    stagekit       the bodies the stage modules share (entry point, generation stage, rounds)
    orchestration  dvc.yaml as a DAG, the Prefect flow, code deps, lineage commands
    cli            the `distillflow` command

The stage modules (`python -m stages.<name>`) and Prefect flows live in the repo's
`stages/` and `flows/` folders and are not installed.
"""
