"""Great Expectations Data Docs for the quality gates: a file-backed GX project in a
temporary folder, each gate's batches run as checkpoints with UpdateDataDocsAction,
and the rendered HTML copied into the stage's tracked report folder
(reports/quality/<stage>/)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class DataDocs:
    """A GX file-backed project in a temporary folder: each gate's batches are run as
    checkpoints with UpdateDataDocsAction, and `export` copies the rendered HTML."""

    def __init__(self) -> None:
        quiet_gx()
        import great_expectations as gx

        self.root = Path(tempfile.mkdtemp(prefix="distillflow-gx-"))
        self.context = no_progress_bars(gx.get_context(mode="file", project_root_dir=self.root))
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


def quiet_gx() -> None:
    """No usage statistics (nothing outside is reachable) and no INFO chatter (one GX
    module sets its own logger to INFO on import, so that one is named too)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations.data_context.types.base  # noqa: F401  (sets its logger's level on import)

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)


def no_progress_bars(context: Any) -> Any:
    """Turn off GX's per-expectation tqdm bars (one per batch would flood stage logs)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context
