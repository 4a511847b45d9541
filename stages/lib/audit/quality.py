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
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from stages.lib.core.params import check
from stages.lib.data import records
from stages.lib.data.io import DataError, parquet_file

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("quality")

Kind = Literal["prompt", "generation", "pair", "curated", "topk"]
KINDS: dict[str, pa.Schema] = {
    "prompt": records.PROMPT_SCHEMA,
    "generation": records.GENERATION_SCHEMA,
    "pair": records.PAIR_SCHEMA,
    "curated": records.PAIR_SCHEMA,
    "topk": records.TOPK_SCHEMA,
}


@dataclass(frozen=True)
class QualityParams:
    """params.yaml `quality`: the gates' thresholds."""

    min_prompt_chars: int  # a prompt shorter than this is a row failure
    max_prompt_chars: int
    max_response_tokens: int  # a generation longer than this is a row failure (an engine bug)
    max_truncated_share: float  # teacher generations that hit max_new_tokens; above: the stage stops
    max_duplicate_share: float  # pairs repeating (prompt, chosen, rejected); above: the stage stops
    max_quarantine_share: float  # rows a quarantining gate may drop; above: the stage stops
    data_docs: bool  # render GX Data Docs into reports/quality/<stage>/
    batch_rows: int  # rows per validated batch (GX copies each batch to pandas)

    def __post_init__(self) -> None:
        check(self.min_prompt_chars >= 1, "min_prompt_chars", "must be >= 1")
        check(self.max_prompt_chars >= self.min_prompt_chars, "max_prompt_chars", "must be >= min_prompt_chars")
        check(self.max_response_tokens >= 1, "max_response_tokens", "must be >= 1")
        for name in ("max_truncated_share", "max_duplicate_share", "max_quarantine_share"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        check(self.batch_rows >= 1, "batch_rows", "must be >= 1")


class GateError(DataError):
    """A table-level expectation failed: the stage stops; the message names the
    artifact, the expectation and the observed value."""


@dataclass(frozen=True)
class Check:
    expectation: str  # a great_expectations.expectations class name
    kwargs: dict[str, Any]
    level: Literal["row", "table"]

    @property
    def label(self) -> str:
        col = self.kwargs.get("column") or ",".join(self.kwargs.get("column_list", [])) or "table"
        return f"{_snake(self.expectation)}:{col}" + (":share" if "mostly" in self.kwargs else "")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _row(expectation: str, **kwargs: Any) -> Check:
    return Check(expectation, kwargs, "row")


def _table(expectation: str, **kwargs: Any) -> Check:
    return Check(expectation, kwargs, "table")


# Derived columns (computed in Arrow before GX sees a batch); see `derive`.
FIRST = "{}__first_occurrence"  # False where the id was already seen in this artifact
EXISTS = "{}__exists_upstream"  # False where the id is not among the upstream ids
IN_EVAL = "prompt_id__in_eval"  # True where a training row's prompt is an eval prompt
DUPLICATE = "content__duplicate"  # True where (prompt_id, chosen, rejected) repeats
TOPK_OK = {"topk__finite": True, "topk__sorted": True, "topk__ids_in_vocab": True, "topk__lengths_match": True}


def suite_checks(kind: str, q: QualityParams, refs: dict[str, Any], truncation: bool = True) -> list[Check]:
    """The expectations for one artifact kind. `refs` names the upstream id sets the
    gate was given (referential integrity is checked only against what is known);
    `truncation` False skips the truncated-share limit (the student's generations:
    a weak student running to max_new_tokens is the signal distillation works on)."""
    schema = KINDS[kind]
    cols = [f.name for f in schema] + derived_names(kind, refs)
    checks = [_table("ExpectTableColumnsToMatchSet", column_set=cols, exact_match=True)]
    checks += [
        _row("ExpectColumnValuesToNotBeNull", column=f.name)
        for f in schema
        if not f.nullable and not pa.types.is_list(f.type)
    ]
    if kind == "prompt":
        checks += [
            _row("ExpectColumnValuesToBeInSet", column=FIRST.format("prompt_id"), value_set=[True]),
            _row(
                "ExpectColumnValueLengthsToBeBetween",
                column="prompt",
                min_value=q.min_prompt_chars,
                max_value=q.max_prompt_chars,
            ),
            _row("ExpectColumnValuesToBeInSet", column="split", value_set=["train", "eval"]),
        ]
        if "eval" in refs:
            checks.append(_table("ExpectColumnValuesToBeInSet", column=IN_EVAL, value_set=[False]))
    elif kind == "generation":
        checks += [
            _row("ExpectColumnValuesToBeInSet", column=FIRST.format("generation_id"), value_set=[True]),
            _row("ExpectColumnValuesToBeInSet", column="finish_reason", value_set=["stop", "length"]),
            _row(
                "ExpectColumnValuesToBeBetween", column="response_tokens", min_value=0, max_value=q.max_response_tokens
            ),
        ]
        if truncation:  # share of truncated generations: `mostly` is the share that must have stopped
            checks.append(
                _table(
                    "ExpectColumnValuesToBeInSet",
                    column="finish_reason",
                    value_set=["stop"],
                    mostly=1.0 - q.max_truncated_share,
                )
            )
        if "prompt_id" in refs:
            checks.append(_row("ExpectColumnValuesToBeInSet", column=EXISTS.format("prompt_id"), value_set=[True]))
    elif kind in ("pair", "curated"):
        checks += [
            _row("ExpectColumnValuesToBeInSet", column=FIRST.format("pair_id"), value_set=[True]),
            _row(
                "ExpectColumnValueLengthsToBeBetween",
                column="prompt",
                min_value=q.min_prompt_chars,
                max_value=q.max_prompt_chars,
            ),
            _row("ExpectColumnValuesToBeBetween", column="chosen_tokens", min_value=0, max_value=q.max_response_tokens),
            _row(
                "ExpectColumnValuesToBeBetween", column="rejected_tokens", min_value=0, max_value=q.max_response_tokens
            ),
            _table(
                "ExpectColumnValuesToBeInSet", column=DUPLICATE, value_set=[False], mostly=1.0 - q.max_duplicate_share
            ),
        ]
        checks += [
            _row("ExpectColumnValuesToBeInSet", column=EXISTS.format(c), value_set=[True])
            for c in ("prompt_id", "chosen_id", "rejected_id")
            if c in refs
        ]
        if "eval" in refs:
            checks.append(_table("ExpectColumnValuesToBeInSet", column=IN_EVAL, value_set=[False]))
        if kind == "curated":
            checks.append(
                _table(
                    "ExpectColumnValuesToBeInSet",
                    column="chosen_finish_reason",
                    value_set=["stop"],
                    mostly=1.0 - q.max_truncated_share,
                )
            )
    elif kind == "topk":
        checks += [
            _row("ExpectColumnValuesToBeInSet", column="side", value_set=["chosen", "rejected"]),
            _row("ExpectColumnValuesToBeBetween", column="k", min_value=1),
            *[_row("ExpectColumnValuesToBeInSet", column=c, value_set=[True]) for c in TOPK_OK],
        ]
        if "pair_id" in refs:
            checks.append(_row("ExpectColumnValuesToBeInSet", column=EXISTS.format("pair_id"), value_set=[True]))
    labels = [c.label for c in checks]
    if len(set(labels)) != len(labels):
        raise AssertionError(f"suite {kind}: two checks share a label: {labels}")
    return checks


def derived_names(kind: str, refs: dict[str, Any]) -> list[str]:
    """The derived columns `derive` appends for this kind, in order."""
    names = [FIRST.format(c) for c in [ID_COLUMN.get(kind)] if c is not None]
    names += [EXISTS.format(c) for c in refs if c != "eval"]
    names += [IN_EVAL] if "eval" in refs else []
    names += [DUPLICATE] if kind in ("pair", "curated") else []
    names += list(TOPK_OK) if kind == "topk" else []
    return names


ID_COLUMN = {"prompt": "prompt_id", "generation": "generation_id", "pair": "pair_id", "curated": "pair_id"}


def _first_occurrence(values: list[str | None], seen: set[int]) -> list[bool]:
    out = []
    for v in values:
        if v is None:
            out.append(True)  # a null id is the not-null expectation's failure, not this one's
            continue
        key = records.short_digest(v)
        out.append(key not in seen)
        seen.add(key)
    return out


def _topk_flags(batch: pa.Table, vocab_size: int | None) -> dict[str, list[bool]]:
    flags: dict[str, list[bool]] = {name: [] for name in TOPK_OK}
    for ids, lps, target, positions, k in zip(
        *(batch.column(c).to_pylist() for c in ("topk_ids", "topk_logprobs", "target_logprob", "positions", "k")),
        strict=True,
    ):
        ids, lps, target = ids or [], lps or [], target or []
        flags["topk__finite"].append(all(math.isfinite(x) for x in lps) and all(math.isfinite(x) for x in target))
        rows = [lps[i : i + k] for i in range(0, len(lps), k)] if k and k > 0 else []
        flags["topk__sorted"].append(all(a >= b for row in rows for a, b in itertools.pairwise(row)))
        flags["topk__ids_in_vocab"].append(
            all(0 <= t < vocab_size for t in ids) if vocab_size is not None else all(t >= 0 for t in ids)
        )
        n = (positions or 0) * (k or 0)
        flags["topk__lengths_match"].append(len(ids) == n and len(lps) == n and len(target) == (positions or 0))
    return flags


@dataclass
class _State:
    seen: dict[str, set[int]] = field(default_factory=dict)  # records.short_digest of ids
    contents: set[int] = field(default_factory=set)


def derive(kind: str, batch: pa.Table, refs: dict[str, Any], state: _State, vocab_size: int | None) -> pa.Table:
    """`batch` plus the derived columns its suite checks."""
    id_col = ID_COLUMN.get(kind)
    extra: dict[str, pa.Array | list[bool]] = {}
    if id_col is not None:
        extra[FIRST.format(id_col)] = _first_occurrence(
            batch.column(id_col).to_pylist(), state.seen.setdefault(id_col, set())
        )
    for col, ids in refs.items():
        if col != "eval":
            extra[EXISTS.format(col)] = pc.fill_null(pc.is_in(batch.column(col), value_set=ids), True)
    if "eval" in refs:
        extra[IN_EVAL] = pc.fill_null(pc.is_in(batch.column("prompt_id"), value_set=refs["eval"]), False)
    if kind in ("pair", "curated"):
        dup = []
        for key in zip(*(batch.column(c).to_pylist() for c in ("prompt_id", "chosen", "rejected")), strict=True):
            digest = records.short_digest(*(k or "" for k in key))
            dup.append(digest in state.contents)
            state.contents.add(digest)
        extra[DUPLICATE] = dup
    if kind == "topk":
        extra.update(_topk_flags(batch, vocab_size))
    for name, values in extra.items():
        batch = batch.append_column(name, pa.array(values, type=pa.bool_()) if isinstance(values, list) else values)
    return batch


class DataDocs:
    """A GX file-backed project in a temporary folder: each gate's batches are run as
    checkpoints with UpdateDataDocsAction, and `export` copies the rendered HTML."""

    def __init__(self) -> None:
        _quiet_gx()
        import great_expectations as gx

        self.root = Path(tempfile.mkdtemp(prefix="distillflow-gx-"))
        self.context = _no_progress_bars(gx.get_context(mode="file", project_root_dir=self.root))
        self.source = self.context.data_sources.add_pandas("distillflow")
        self._n = 0

    def checkpoint(self, name: str, suite: Any) -> tuple[Any, Any]:
        """(checkpoint, the registered suite) for one gate."""
        import great_expectations as gx

        self._n += 1
        asset = self.source.add_dataframe_asset(f"{self._n:02d}-{name}")
        batch_def = asset.add_batch_definition_whole_dataframe("batch")
        suite = self.context.suites.add(suite)
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{self._n:02d}-{name}", data=batch_def, suite=suite)
        )
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name=f"{self._n:02d}-{name}",
                validation_definitions=[vd],
                result_format="COMPLETE",
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            )
        )
        return checkpoint, suite

    def export(self, dst: Path) -> int:
        """Copy the site's HTML pages and stylesheet (not GX's 4 MB of fonts and
        images) into `dst`; returns the number of files copied."""
        site = self.root / "gx" / "uncommitted" / "data_docs" / "local_site"
        if not site.is_dir():
            raise RuntimeError(f"great expectations rendered no Data Docs under {site}")
        n = 0
        for src in sorted(site.rglob("*")):
            rel = src.relative_to(site)
            if src.is_file() and (
                src.suffix == ".html" or rel.as_posix() == "static/styles/data_docs_default_styles.css"
            ):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst / rel)
                n += 1
        return n

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=False)


def _quiet_gx() -> None:
    """No usage statistics (nothing outside is reachable) and no INFO chatter (one GX
    module sets its own logger to INFO on import, so that one is named too)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations.data_context.types.base  # noqa: F401  (sets its logger's level on import)

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _no_progress_bars(context: Any) -> Any:
    """Turn off GX's per-expectation tqdm bars (one per batch would flood stage logs)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


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
        _quiet_gx()
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
            context = _no_progress_bars(gx.get_context(mode="ephemeral"))
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
            check_ = by_id[res.expectation_config.id]
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
                continue  # a share: judged over the whole artifact in finish(), from GX's per-batch counts
            if res.success:
                continue
            rec["success"] = False
            if check_.level == "table" or not self.quarantine:
                observed = (
                    r.get("observed_value")
                    if r.get("observed_value") is not None
                    else f"{r.get('unexpected_count')} of {r.get('element_count')} rows unexpected ({r.get('unexpected_percent', 0):.2f}%), e.g. {[_short(v) for v in (r.get('partial_unexpected_list') or [])[:3]]}"
                )
                first = (r.get("unexpected_index_list") or [None])[0]
                where = f" (first at row {self.rows_in + first})" if isinstance(first, int) else ""
                raise GateError(
                    f"{self.path}: {self.artifact} failed expectation {check_.label}{where}: observed {observed}"
                )
            for i in r.get("unexpected_index_list") or []:
                failing.setdefault(int(i), f"gate:{check_.label}")
        self.rows_in += batch.num_rows
        keep_mask = [i not in failing for i in range(batch.num_rows)]
        kept = batch.filter(pa.array(keep_mask, type=pa.bool_()))
        bad_rows = batch.filter(pa.array([not k for k in keep_mask], type=pa.bool_())).to_pylist()
        bad_idx = [i for i in range(batch.num_rows) if i in failing]
        quarantined = [{**row, "reason": failing[i]} for row, i in zip(bad_rows, bad_idx, strict=True)]
        self.reasons.update(failing.values())
        self.kept += kept.num_rows
        return kept, quarantined

    def finish(self) -> dict[str, Any]:
        """The gate's deterministic report; raises GateError if too many rows were
        quarantined. Counts reconcile: rows_in = kept + quarantined."""
        for c in self.checks:
            if "mostly" not in c.kwargs:
                continue
            rec = self._results[c.label]
            share = rec["unexpected"] / rec["elements"] if rec["elements"] else 0.0
            rec["observed"] = round(share, 6)
            rec["success"] = share <= 1.0 - c.kwargs["mostly"] + 1e-12
            if not rec["success"]:
                raise GateError(
                    f"{self.path}: {self.artifact} failed expectation {c.label}: observed {rec['unexpected']} of {rec['elements']} rows unexpected "
                    f"({share:.1%}), above the allowed {1.0 - c.kwargs['mostly']:.1%} (params.yaml quality)"
                )
        quarantined = sum(self.reasons.values())
        if self.rows_in != self.kept + quarantined:
            raise AssertionError(
                f"{self.path}: gate counts do not reconcile: {self.rows_in} in, {self.kept} kept, {quarantined} quarantined"
            )
        share = quarantined / self.rows_in if self.rows_in else 0.0
        if share > self.q.max_quarantine_share:
            raise GateError(
                f"{self.path}: {self.artifact}: {quarantined} of {self.rows_in} rows ({share:.1%}) failed row expectations, above quality.max_quarantine_share={self.q.max_quarantine_share}: {dict(self.reasons)}"
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


def summary(validation: dict[str, Any]) -> dict[str, Any]:
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
