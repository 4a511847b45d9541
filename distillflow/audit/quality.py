"""Data quality gates: Great Expectations suites for every artifact kind, run at
stage boundaries.

    gate = Gate("pairs", "data/pairs/pairs.parquet", "pair", q, quarantine=True, refs=...)
    kept, quarantined = gate.check(table)   # per Arrow batch; repeat for a stream
    report = gate.finish()                   # deterministic: into metrics and manifest

Kinds: prompt, generation, pair, curated (a pair that may train), topk. Each kind has
one suite (`suite_checks`): schema (exact column set), non-null ids and texts,
unique ids, referential integrity against upstream ids, length bounds, the share of
truncated generations, the duplicate rate, train/eval disjointness, and for top-k
finite, sorted log-probs and token ids inside the vocabulary. Thresholds come from
params.yaml `quality` (QualityParams).

What cannot be seen inside one batch of a stream (an id repeated across batches, an id
that exists upstream, a list column's order) is computed in Arrow as a derived column
first (`derive`), and Great Expectations checks that column like any other, so every
verdict and every Data Docs page comes from a GX expectation.

Two levels:
- row checks drop rows: in a quarantining gate (a stage with a quarantine file) a
  failing row is returned with the reason `gate:<expectation>:<column>`, and the stage
  writes it to quarantine; in a strict gate (an input read, a generation output) a
  failing row stops the stage;
- table checks (column set, truncated share, duplicate share, disjointness, the share
  of rows quarantined) stop the stage with GateError naming the artifact, the
  expectation and the observed value.

Counts reconcile per gate: rows_in = kept + quarantined. Data Docs: a Gate given a
`DataDocs` renders each batch's validation with GX's own Data Docs builder; the stage
copies the HTML into its tracked report folder (reports/quality/<stage>/).

Modules: the suites and derived columns are distillflow/audit/suites.py, Data Docs
distillflow/audit/docs.py, the train/eval disjointness check distillflow/audit/disjoint.py
(`in_eval`, `check_disjoint`, re-exported here), the quarantine row shape
distillflow/base/quarantine.py; this module runs the gates.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distillflow.audit.disjoint import check_disjoint, in_eval, read_prompt_ids
from distillflow.audit.docs import DataDocs, no_progress_bars, quiet_gx
from distillflow.audit.suites import (
    DUPLICATE,
    EXISTS,
    FIRST,
    ID_COLUMN,
    IN_EVAL,
    KINDS,
    TOPK_OK,
    Check,
    Kind,
    QualityParams,
    _snake,
    _State,
    derive,
    derived_names,
    suite_checks,
)
from distillflow.base import quarantine as _quarantine
from distillflow.base.io import DataError, parquet_file

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DUPLICATE",
    "EXISTS",
    "FIRST",
    "ID_COLUMN",
    "IN_EVAL",
    "KINDS",
    "TOPK_OK",
    "Check",
    "DataDocs",
    "Gate",
    "GateError",
    "Kind",
    "QualityParams",
    "StageGates",
    "check_disjoint",
    "derive",
    "derived_names",
    "in_eval",
    "read_prompt_ids",
    "suite_checks",
    "validation_summary",
]

log = logging.getLogger("quality")


class GateError(DataError):
    """A table-level expectation failed: the stage stops; the message names the
    artifact, the expectation and the observed value."""


class Gate:
    """One artifact's suite, run batch by batch. `quarantine=True`: row failures are
    returned as quarantined rows; False: any failure raises GateError."""

    def __init__(
        self,
        artifact: str,
        path: Path | str,
        kind: str,
        q: QualityParams,
        *,
        quarantine: bool,
        refs: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        docs: DataDocs | None = None,
        truncation: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; one of {sorted(KINDS)}")
        quiet_gx()
        import great_expectations as gx
        import great_expectations.expectations as gxe

        self.artifact, self.path, self.kind, self.q, self.quarantine = artifact, str(path), kind, q, quarantine
        self.vocab_size = vocab_size
        self.refs = {
            k: (v if isinstance(v, pa.Array) else pa.array(sorted(v), type=pa.string()))
            for k, v in (refs or {}).items()
        }
        self.checks = suite_checks(kind, q, self.refs, truncation)
        self.suite = gx.ExpectationSuite(
            name=f"{kind}-{artifact}".replace("/", "_"),
            expectations=[getattr(gxe, c.expectation)(**c.kwargs) for c in self.checks],
        )
        self.docs = docs
        if docs is not None:
            self._checkpoint, self.suite = docs.checkpoint(artifact.replace("/", "_"), self.suite)
        else:
            context = no_progress_bars(gx.get_context(mode="ephemeral"))
            batch_def = (
                context.data_sources.add_pandas("distillflow")
                .add_dataframe_asset(artifact.replace("/", "_"))
                .add_batch_definition_whole_dataframe("batch")
            )
            self.suite = context.suites.add(self.suite)
            self._batch_def = batch_def
        registered = list(self.suite.expectations)
        if [e.expectation_type for e in registered] != [_snake(c.expectation) for c in self.checks]:
            raise RuntimeError(f"great expectations reordered suite {self.suite.name}'s expectations")
        self._by_id = {e.id: c for e, c in zip(registered, self.checks, strict=True)}
        self._state = _State()
        self.rows_in = self.kept = 0
        self.reasons: Counter[str] = Counter()
        self._results: dict[str, dict[str, Any]] = {
            c.label: {
                "expectation": _snake(c.expectation),
                "level": c.level,
                "kwargs": _plain(c.kwargs),
                "success": True,
                "unexpected": 0,
                "elements": 0,
            }
            for c in self.checks
        }

    def _validate(self, df: pd.DataFrame) -> list[Any]:
        if self.docs is not None:
            result = self._checkpoint.run(batch_parameters={"dataframe": df})
            (validation,) = result.run_results.values()
            return list(validation.results)
        return list(
            self._batch_def.get_batch(batch_parameters={"dataframe": df})
            .validate(self.suite, result_format="COMPLETE")
            .results
        )

    def check(self, table: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
        """Validate `table` in batches of q.batch_rows; returns (kept rows, quarantined
        rows each with `reason`). Raises GateError on a table-level failure."""
        kept_parts: list[pa.Table] = []
        quarantined: list[dict[str, Any]] = []
        for start in range(0, max(table.num_rows, 1), self.q.batch_rows):
            kept, bad = self._check_batch(table.slice(start, self.q.batch_rows))
            kept_parts.append(kept)
            quarantined += bad
        return pa.concat_tables(kept_parts) if kept_parts else table.slice(0, 0), quarantined

    def _check_batch(self, batch: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
        derived = derive(self.kind, batch, self.refs, self._state, self.vocab_size)
        df = derived.to_pandas(types_mapper=None, split_blocks=True, self_destruct=False)
        failing: dict[int, str] = {}
        by_id = self._by_id
        results = self._validate(df)
        if sorted(r.expectation_config.id for r in results) != sorted(by_id):
            raise RuntimeError(
                f"{self.path}: great expectations returned results for other expectations than the suite's"
            )
        # GX reports in its own order; walk the suite's order so the first failure named is stable
        order = {e_id: i for i, e_id in enumerate(by_id)}
        for res in sorted(results, key=lambda r: order[r.expectation_config.id]):
            self._record(by_id[res.expectation_config.id], res, failing)
        self.rows_in += batch.num_rows
        keep_mask = [i not in failing for i in range(batch.num_rows)]
        kept = batch.filter(pa.array(keep_mask, type=pa.bool_()))
        bad_rows = batch.filter(pa.array([not k for k in keep_mask], type=pa.bool_())).to_pylist()
        bad_idx = [i for i in range(batch.num_rows) if i in failing]
        quarantined = [_quarantine.row(row, failing[i]) for row, i in zip(bad_rows, bad_idx, strict=True)]
        self.reasons.update(failing.values())
        self.kept += kept.num_rows
        return kept, quarantined

    def _record(self, check_: Check, res: Any, failing: dict[int, str]) -> None:
        """Add one expectation's batch result to the report; a failure either raises
        (a table check, a strict gate) or marks the failing rows in `failing`."""
        rec = self._results[check_.label]
        r = res.result or {}
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise GateError(
                f"{self.path}: expectation {check_.label} could not run: {res.exception_info.get('exception_message')}"
            )
        rec["elements"] += int(r.get("element_count") or 0)
        rec["unexpected"] += int(r.get("unexpected_count") or 0)
        if "observed_value" in r and r["observed_value"] is not None:
            rec["observed"] = _plain(r["observed_value"])
        if "mostly" in check_.kwargs:
            return  # a share: judged over the whole artifact in finish(), from GX's per-batch counts
        if res.success:
            return
        rec["success"] = False
        if check_.level == "table" or not self.quarantine:
            raise GateError(self._failure(check_, r))
        for i in r.get("unexpected_index_list") or []:
            failing.setdefault(int(i), f"gate:{check_.label}")

    def _failure(self, check_: Check, r: dict[str, Any]) -> str:
        """The message of a failed expectation: the artifact, the check, the first row, what GX saw."""
        if r.get("observed_value") is not None:
            observed = r.get("observed_value")
        else:
            examples = [_short(v) for v in (r.get("partial_unexpected_list") or [])[:3]]
            observed = (
                f"{r.get('unexpected_count')} of {r.get('element_count')} rows unexpected "
                f"({r.get('unexpected_percent', 0):.2f}%), e.g. {examples}"
            )
        first = (r.get("unexpected_index_list") or [None])[0]
        where = f" (first at row {self.rows_in + first})" if isinstance(first, int) else ""
        return f"{self.path}: {self.artifact} failed expectation {check_.label}{where}: observed {observed}"

    def _judge_shares(self) -> None:
        """The `mostly` checks, over the whole artifact: GateError above the allowed share."""
        for c in self.checks:
            if "mostly" not in c.kwargs:
                continue
            rec = self._results[c.label]
            share = rec["unexpected"] / rec["elements"] if rec["elements"] else 0.0
            rec["observed"] = round(share, 6)
            rec["success"] = share <= 1.0 - c.kwargs["mostly"] + 1e-12
            if not rec["success"]:
                raise GateError(
                    f"{self.path}: {self.artifact} failed expectation {c.label}: observed {rec['unexpected']} of "
                    f"{rec['elements']} rows unexpected ({share:.1%}), above the allowed "
                    f"{1.0 - c.kwargs['mostly']:.1%} (params.yaml quality)"
                )

    def finish(self) -> dict[str, Any]:
        """The gate's deterministic report; raises GateError if too many rows were
        quarantined. Counts reconcile: rows_in = kept + quarantined."""
        self._judge_shares()
        quarantined = sum(self.reasons.values())
        if self.rows_in != self.kept + quarantined:
            raise AssertionError(
                f"{self.path}: gate counts do not reconcile: {self.rows_in} in, {self.kept} kept, "
                f"{quarantined} quarantined"
            )
        share = quarantined / self.rows_in if self.rows_in else 0.0
        if share > self.q.max_quarantine_share:
            raise GateError(
                f"{self.path}: {self.artifact}: {quarantined} of {self.rows_in} rows ({share:.1%}) failed row "
                f"expectations, above quality.max_quarantine_share={self.q.max_quarantine_share}: {dict(self.reasons)}"
            )
        return {
            "artifact": self.artifact,  # not the path: an output's folder differs run to run (temporary, or a test's)
            "kind": self.kind,
            "rows_in": self.rows_in,
            "kept": self.kept,
            "quarantined": quarantined,
            "quarantined_by_reason": dict(sorted(self.reasons.items())),
            "success": all(r["success"] for r in self._results.values()),
            "expectations": [self._results[c.label] | {"check": c.label} for c in self.checks],
        }


def _short(value: Any, limit: int = 80) -> Any:
    """A value for an error message: long texts cut (a 1 MB prompt must not flood it)."""
    text = repr(value)
    return value if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _plain(value: Any) -> Any:
    """JSON-safe, deterministic copies of GX kwargs and observed values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class StageGates:
    """A stage's gates: one Data Docs project, the reports in order.

    gates = StageGates(q, docs_dir)             # docs_dir: reports/quality/<stage>
    gates.strict("pairs (input)", path, "pair", table)   # an input read: stops on any failure
    g = gates.gate("curated", path, "curated", quarantine=True, refs=...)
    ...
    report = gates.finish()                     # {"gates": [...], "data_docs_files": n}
    """

    def __init__(self, q: QualityParams, docs_dir: Path | None):
        self.q, self.docs_dir = q, docs_dir
        self.docs = DataDocs() if (q.data_docs and docs_dir is not None) else None
        self.gates: list[Gate] = []

    def gate(self, artifact: str, path: Path | str, kind: str, *, quarantine: bool, **kwargs: Any) -> Gate:
        g = Gate(artifact, path, kind, self.q, quarantine=quarantine, docs=self.docs, **kwargs)
        self.gates.append(g)
        return g

    def strict(self, artifact: str, path: Path | str, kind: str, table: pa.Table, **kwargs: Any) -> None:
        """Check a whole table (an input on read, or an output a stage cannot quarantine
        from); any failing expectation stops the stage."""
        self.gate(artifact, path, kind, quarantine=False, **kwargs).check(table)

    def check_file(self, artifact: str, path: Path, kind: str, *, shown: Path | None = None, **kwargs: Any) -> None:
        """Strict gate over a Parquet file already written (or about to be read),
        streamed in batches of q.batch_rows: any failing expectation stops the stage.
        `shown`: the path to name in messages (a file still in its temporary folder)."""
        gate = self.gate(artifact, shown or path, kind, quarantine=False, **kwargs)
        pf = parquet_file(path)
        try:
            if not pf.metadata.num_rows:
                gate.check(pf.schema_arrow.empty_table())
            for batch in pf.iter_batches(batch_size=self.q.batch_rows):
                gate.check(pa.Table.from_batches([batch]))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc

    def finish(self) -> dict[str, Any]:
        reports = [g.finish() for g in self.gates]
        out: dict[str, Any] = {"gates": reports, "success": all(r["success"] for r in reports)}
        if self.docs is not None:
            assert self.docs_dir is not None
            if self.docs_dir.exists():
                shutil.rmtree(self.docs_dir)
            self.docs_dir.mkdir(parents=True)
            out["data_docs_files"] = self.docs.export(self.docs_dir)
            self.docs.close()
        return out


def validation_summary(validation: dict[str, Any]) -> dict[str, Any]:
    """The metrics view of StageGates.finish(): per gate, the counts and what failed."""
    return {
        g["artifact"]: {
            "rows_in": g["rows_in"],
            "kept": g["kept"],
            "quarantined": g["quarantined"],
            "quarantined_by_reason": g["quarantined_by_reason"],
            "failed_expectations": sorted(e["check"] for e in g["expectations"] if not e["success"]),
        }
        for g in validation["gates"]
    }
