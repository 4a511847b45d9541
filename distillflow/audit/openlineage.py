"""OpenLineage RunEvents of a stage run, built and sent with the openlineage-python client.

One run per stage process, three moments:

- START when the stage's main() begins (`core.entry.run_stage`, through `lineage.start_run`);
- COMPLETE when the stage writes its run record (`lineage.write_run_record`), with the
  input and output datasets (schema, version = sha256, row counts) and the run record
  as a custom run facet; `entry.run_stage` completes a run that wrote no record (report);
- FAIL when main() raises (ABORT on Ctrl-C), with the error message and traceback
  (after COMPLETE too, when the stage fails after writing its record).

Where they go:

- files: `<lineage dir>/openlineage/<job>/<runId>-<eventType>.json` (`StageFileTransport`,
  a client Transport keeping the layout these files had before the client was used);
- also, when the client is configured through its own conventions (`OPENLINEAGE_URL`,
  with `OPENLINEAGE_ENDPOINT` and `OPENLINEAGE_API_KEY`; or `OPENLINEAGE_CONFIG` /
  `OPENLINEAGE__TRANSPORT__*`), the transport the client builds from them: HTTP to
  Marquez for `OPENLINEAGE_URL=http://localhost:5000`. The files are the record; an
  event the configured transport could not take is logged as an error naming the file
  that holds it, and the stage goes on (a lineage server outage does not fail a stage).

`OPENLINEAGE_DISABLED=true` (the client's switch) turns both off.

Under torchrun only rank 0 (which writes the files) emits events.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attr
import pyarrow.parquet as pq
from openlineage.client.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState, set_producer
from openlineage.client.facet_v2 import (
    RunFacet,
    data_quality_metrics_input_dataset,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    processing_engine_run,
    schema_dataset,
)
from openlineage.client.serde import Serde
from openlineage.client.transport.transport import Config, Transport

from distillflow.base.io import write_json

log = logging.getLogger(__name__)

PRODUCER = "https://github.com/distillflow/distillflow/tree/main/distillflow/audit/openlineage.py"
NAMESPACE = os.environ.get("DISTILLFLOW_OPENLINEAGE_NAMESPACE", "distillflow")
PIPELINE_JOB = "distillflow.pipeline"
# the client's own configuration: when any is set, events also go where it says
CLIENT_CONFIG_VARS = ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG")
set_producer(PRODUCER)  # the facets' _producer


@attr.define
class DistillflowRunFacet(RunFacet):
    """The run record's identity and cost (custom facet)."""

    run_id: str
    git: dict[str, Any]
    host: str
    cost: dict[str, Any]
    counts: dict[str, Any]
    validation: Any
    models: dict[str, str]
    seeds: dict[str, int]

    @staticmethod
    def _get_schema() -> str:
        return "urn:distillflow:facets:RunRecord"


class StageFileTransport(Transport):
    """Each event as `<root>/<job>/<runId>-<eventType>.json` (deterministic JSON)."""

    kind = "distillflow_file"
    config_class = Config

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, event: RunEvent) -> Path:
        return self.root / event.job.name / f"{event.run.runId}-{event.eventType.value}.json"

    def emit(self, event: RunEvent) -> None:  # type: ignore[override]
        write_json(self.path(event), Serde.to_dict(event))


def configured() -> bool:
    """Whether the environment configures the client (see the module doc)."""
    return any(os.environ.get(v) for v in CLIENT_CONFIG_VARS) or any(
        k.startswith("OPENLINEAGE__TRANSPORT") for k in os.environ
    )


def _engine_version() -> str:
    try:
        return importlib.metadata.version("distillflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class StageRun:
    """The OpenLineage run of one stage process: START, then COMPLETE or FAIL (or ABORT)."""

    def __init__(self, job: str, root: Path, parent: str | None, emit: bool = True) -> None:
        self.job, self.parent = job, parent
        self.run_id = str(uuid.uuid4())
        self.files = StageFileTransport(root)
        self.clients: list[OpenLineageClient] = []
        if emit:
            self.clients.append(OpenLineageClient(transport=self.files))
            if configured():
                self.clients.append(OpenLineageClient())
        self.state: RunState | None = None

    def facets(self) -> dict[str, RunFacet]:
        facets: dict[str, RunFacet] = {
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=_engine_version(), name="distillflow", openlineageAdapterVersion="none"
            )
        }
        if self.parent is not None:
            facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=self.parent), job=parent_run.Job(namespace=NAMESPACE, name=PIPELINE_JOB)
            )
        return facets

    def job_description(self) -> Job:
        kind = job_type_job.JobTypeJobFacet(processingType="BATCH", integration="DISTILLFLOW", jobType="STAGE")
        return Job(namespace=NAMESPACE, name=self.job, facets={"jobType": kind})

    def emit(self, state: RunState, when: str, facets: dict[str, RunFacet], **datasets: Any) -> None:
        event = RunEvent(
            eventType=state,
            eventTime=when,
            run=Run(runId=self.run_id, facets=facets),
            job=self.job_description(),
            producer=PRODUCER,
            **datasets,
        )
        self.state = state
        for n, client in enumerate(self.clients):
            if n == 0:
                client.emit(event)  # the file: its errors are the stage's
                continue
            try:
                client.emit(event)
            except Exception as exc:  # noqa: BLE001 - any transport's failure; the event is in the file
                log.error(
                    "OpenLineage: %s event not sent through the %s transport (%s: %s); it is in %s",
                    state.value,
                    client.transport.kind,
                    type(exc).__name__,
                    exc,
                    self.files.path(event),
                )

    def start(self, when: str) -> None:
        self.emit(RunState.START, when, self.facets())

    def complete(
        self,
        when: str,
        out_dir: Path,
        out: Path,
        manifest: dict[str, Any],
        record: dict[str, Any],
        steps: Sequence[tuple[list[InputDataset], list[OutputDataset]]] = (),
    ) -> None:
        """COMPLETE with the manifest's datasets and those of the `steps` this process
        wrote before it (an on-policy round's student, pairs, curate and score folders);
        an input one of them wrote is an output of this run, not an input."""
        facet = DistillflowRunFacet(
            **{k: record[k] for k in ("run_id", "git", "host", "cost", "counts", "validation", "models", "seeds")}
        )
        inputs, outputs = datasets(out_dir, out, manifest)
        for step_inputs, step_outputs in steps:
            inputs, outputs = inputs + step_inputs, outputs + step_outputs
        written = {d.name for d in outputs}
        inputs = list({d.name: d for d in inputs if d.name not in written}.values())
        self.emit(RunState.COMPLETE, when, {**self.facets(), "distillflow_run": facet}, inputs=inputs, outputs=outputs)

    def finish(self, when: str) -> None:
        """COMPLETE, unless the run record already completed the run."""
        if self.state is RunState.START:
            self.emit(RunState.COMPLETE, when, self.facets())

    def fail(self, when: str, exc: BaseException) -> None:
        """FAIL (ABORT on Ctrl-C) with the error; also after COMPLETE, when the stage failed
        after writing its record: the last event is the run's state."""
        state = RunState.ABORT if isinstance(exc, KeyboardInterrupt) else RunState.FAIL
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SystemExit):
            message = f"exit status {exc.code}"
        error = error_message_run.ErrorMessageRunFacet(
            message=message,
            programmingLanguage="PYTHON",
            stackTrace="".join(traceback.format_exception(exc)),
        )
        self.emit(state, when, {**self.facets(), "errorMessage": error})


# --- datasets ---------------------------------------------------------------------


def _dataset_facets(sha256: str, schema_file: Path) -> dict[str, Any]:
    facets: dict[str, Any] = {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=sha256)}
    if schema_file.is_file() and schema_file.suffix == ".parquet":
        fields = [
            schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in pq.read_schema(schema_file)
        ]
        facets["schema"] = schema_dataset.SchemaDatasetFacet(fields=fields)
    return facets


def datasets(out_dir: Path, out: Path, manifest: dict[str, Any]) -> tuple[list[InputDataset], list[OutputDataset]]:
    """The manifest's inputs and outputs as OpenLineage datasets (namespace `file`,
    absolute paths); `out` is the out folder's final path, `out_dir` where it is written."""
    inputs = []
    for entry in manifest["inputs"].values():
        path = Path(entry["path"])
        input_facets = {}
        if "rows" in entry:
            metrics = data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(
                columnMetrics={}, rowCount=entry["rows"]
            )
            input_facets["dataQualityMetrics"] = metrics
        inputs.append(
            InputDataset(
                namespace="file",
                name=str(path.resolve()),
                facets=_dataset_facets(entry["sha256"], path),
                inputFacets=input_facets,
            )
        )
    outputs = [
        OutputDataset(
            namespace="file",
            name=str((out / name).resolve()),
            facets=_dataset_facets(entry["sha256"], out_dir / name),
            outputFacets={
                "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=entry["rows"]
                )
            },
        )
        for name, entry in manifest["outputs"].items()
    ]
    return inputs, outputs


# --- this process's run -----------------------------------------------------------

_current: StageRun | None = None


def begin(job: str, root: Path, when: str, parent: str | None) -> StageRun:
    """Start this process's run (emitting START; nothing on a torchrun rank other than 0)."""
    global _current
    if _current is not None and _current.state is RunState.START:
        raise RuntimeError(f"lineage: the run of {_current.job} is in progress in this process; one run per process")
    _current = StageRun(job, root, parent, emit=os.environ.get("RANK", "0") == "0")
    _current.start(when)
    return _current


def current() -> StageRun:
    if _current is None:
        raise RuntimeError(
            "lineage: no OpenLineage run started in this process; a stage's main() runs under"
            " distillflow.stagekit.entry.run_stage (or call lineage.start_run first)"
        )
    return _current
