"""The thin command line every stage's main() shares: paths in, params file, logging.

Paths come from dvc.yaml's `cmd` (the one place they are written); params come from
the params file named there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillflow.audit import lineage
from distillflow.base.errors import UsageError


def parse_paths(
    doc: str | None,
    *names: str,
    optional: tuple[str, ...] = (),
    values: dict[str, type] | None = None,
    optional_values: dict[str, Callable[[str], Any]] | None = None,
) -> argparse.Namespace:
    """Parse `--params PATH` and `--<name> PATH` for each name (required),
    `--<name> PATH` for each `optional` name (None when absent), `--<name> VALUE`
    of the given type for each of `values` (required; e.g. a matrix stage's seed) and
    for each of `optional_values` (None when absent)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params file (params.yaml)")
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    for name in optional:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, default=None)
    for name, typ in (values or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, required=True)
    for name, typ in (optional_values or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A fixed thread count keeps CPU float reductions, and so outputs, repeatable. Only
    # stages that run models import torch (the data stages stay light: 1M-row curate).
    # Under a launcher the node's cores are shared by its LOCAL_WORLD_SIZE ranks.
    if "torch" in sys.modules:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        sys.modules["torch"].set_num_threads(max(1, min(2, (os.cpu_count() or 1) // ranks)))
    return args


def running_stage() -> str:
    """The stage this process runs: its main module's name (`python -m stages.teacher` -> teacher)."""
    return Path(sys.modules["__main__"].__file__).stem


def run_stage(main: Callable[[], None], stage: str | None = None) -> None:
    """Run a stage's main() as one OpenLineage run of `stage` (default: running_stage()).

    START is emitted before main() and FAIL (ABORT on Ctrl-C) when it raises;
    COMPLETE comes with the run record (lineage.write_manifest), or here when main()
    wrote none. A refusal of the user's input (errors.UsageError: bad data naming the
    file, row and field, a params key, a model property) ends the process with
    `error: <message>` and exit status 2, not a traceback through the library that
    noticed it.
    """
    ol = lineage.start_run(stage or running_stage())
    try:
        main()
    except UsageError as exc:
        ol.fail(lineage.now(), exc)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as exc:
        if exc.code not in (0, None):
            ol.fail(lineage.now(), exc)
            raise
        ol.finish(lineage.now())
        raise
    except BaseException as exc:
        ol.fail(lineage.now(), exc)
        raise
    ol.finish(lineage.now())
