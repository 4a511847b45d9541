"""The `distillflow` command.

    distillflow check [PARAMS_FILE]   validate a params file for every stage (strict)
    distillflow stages                list the DAG's stages with the params keys each reads
    distillflow params [SECTION ...] [--params FILE] [--markdown]
                                      every setting: key, type, value in the params file, help
    distillflow run [--target STAGE] [-S key=value ...]
                                      run the DVC pipeline as a Prefect flow (distillflow/orchestration/pipeline.py)
    distillflow serve [--cron CRON] [--target STAGE] [-S key=value ...]
                                      serve that flow as a deployment with a schedule
    distillflow dag sync [--check]   write each stage's code deps into dvc.yaml and comparison/dvc.yaml
    distillflow lineage show PATH_OR_ID [--json]
                                      an artifact's or a record's lineage back to its sources
    distillflow lineage verify        recompute every digest: files, manifests and dvc.lock agree?
    distillflow lineage cost [--run ID] [--json]
                                      a run's cost per stage (time, memory, tokens, cache hits)

The pipeline runs with `dvc repro` or, scheduled, observed and with parallel branches,
with `distillflow run` (see docs/orchestration.md); both keep dvc.lock current.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

# Stage modules; round runs rounds 2..E (round_evaluate runs evaluate), compare one cell per compare.runs entry.
STAGES = (
    "identify",
    "bootstrap",
    "seed",
    "teacher",
    "student",
    "pairs",
    "curate",
    "score",
    "train",
    "round",
    "evaluate",
    "compare",
    "report",
)


def stage_module(name: str) -> Any:
    """A stage module of the checkout this command runs in (the stage modules are not
    installed: they run as `python -m stages.<name>` from the repo root)."""
    if not (Path.cwd() / "stages" / f"{name}.py").is_file():
        raise SystemExit(f"no stages/{name}.py under {Path.cwd()}: run distillflow from the repo root")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(f"stages.{name}")


def check_params_file(path: Path) -> int:
    from distillflow.base import params

    failures = 0
    for name in STAGES:
        module = stage_module(name)
        try:
            if name == "compare":  # a matrix: each run reads its own compare.runs entry
                runs = params.select(params.load_yaml(path), "compare.runs", str(path))
                if not isinstance(runs, dict):
                    raise ValueError(
                        f"{path}: compare.runs: expected a mapping of run names, got {type(runs).__name__}"
                    )
                for run in runs:
                    params.load_sections(path, module.sections(run))
            else:
                params.load_sections(path, module.SECTIONS)
        except ValueError as exc:
            failures += 1
            print(f"{name}: {exc}", file=sys.stderr)
        else:
            print(f"{name}: ok ({', '.join(module.PARAMS)})")
    return 1 if failures else 0


def stages(dvc_yaml: Path) -> int:
    spec = yaml.safe_load(dvc_yaml.read_text())["stages"]
    for name, stage in spec.items():
        each = ""
        if "foreach" in stage:  # a template: one stage per entry of the list it iterates
            each, stage = f" (one per entry of {stage['foreach']})", stage["do"]
        elif "matrix" in stage:  # one stage per combination of the lists
            each = f" (one per combination of {' x '.join(stage['matrix'].values())})"
        data = [d for d in stage["deps"] if not d.startswith(("stages/", "distillflow"))]
        print(f"{name}{each}: params {stage['params']}; reads {data or '-'}; writes {stage['outs']}")
    return 0


def _print_summary(summary: dict, total: float) -> None:
    print(f"{'stage':<28} {'outcome':<11} {'seconds':>8}")
    for name, entry in summary.get("stages", {}).items():
        seconds = entry.get("seconds")
        print(f"{name:<28} {entry['outcome']:<11} {'-' if seconds is None else f'{seconds:.1f}':>8}")
    started, invoked, imported = summary.get("flow_started"), summary["invoked"], summary["imported"]
    before = ""
    if started:
        before = (
            f"; {started - invoked:.1f} s before the flow body started: {imported - invoked:.1f} s imports, "
            f"{started - imported:.1f} s Prefect start-up (temporary server if no PREFECT_API_URL) "
            "and flow-run creation"
        )
    print(f"flow run {summary.get('flow_run_id')}: {total:.1f} s{before}")


# Seconds the temporary Prefect server may take to start. A machine's first one creates and
# migrates its SQLite database (PREFECT_HOME): 28.6 s on an idle 2-core machine, over
# Prefect's own 20 s limit, so a first `distillflow run` failed with "Timed out while
# attempting to connect to ephemeral Prefect API server". Later starts take about 14 s.
TEMP_SERVER_STARTUP_S = 180


def prefect_startup_timeout() -> None:
    """Give the temporary server TEMP_SERVER_STARTUP_S to start, unless the user set
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (theirs wins). Before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(TEMP_SERVER_STARTUP_S))


def ray_params(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's ray_* parameters from --ray and the options that need it."""
    given = [
        o
        for o, v in (
            ("--ray-stage", args.ray_stages),
            ("--ray-cpus", args.ray_cpus),
            ("--ray-gpus", args.ray_gpus),
            ("--ray-parts", args.ray_parts),
            ("--ray-parts-url", args.ray_parts_url),
        )
        if v is not None
    ]
    if args.ray_address is None and given:
        raise SystemExit(f"distillflow: {', '.join(given)} need --ray ADDRESS")
    return {
        "ray_address": args.ray_address,
        "ray_stages": args.ray_stages,
        "ray_cpus": 2.0 if args.ray_cpus is None else args.ray_cpus,
        "ray_gpus": 0.0 if args.ray_gpus is None else args.ray_gpus,
        "ray_parts": 0 if args.ray_parts is None else args.ray_parts,
        "ray_parts_url": args.ray_parts_url,
    }


def run_flow(args: argparse.Namespace) -> int:
    """Run the flow in this process (with PREFECT_API_URL unset Prefect starts a
    temporary local server for the run)."""
    invoked = time.time()
    # One run id for every stage this flow runs: their run records (lineage/runs) share it.
    os.environ.setdefault("DISTILLFLOW_RUN_ID", str(uuid.uuid4()))
    prefect_startup_timeout()
    from prefect.task_runners import ThreadPoolTaskRunner

    from distillflow.orchestration.dvc_ops import StageError
    from distillflow.orchestration.pipeline import PipelineFailed, distill

    imported = time.time()
    flow = distill.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.jobs))
    rc = 0
    try:
        summary = flow(
            target=args.target,
            overrides=args.set_params,
            root=str(args.root.resolve()),
            retries=args.retries,
            retry_delay_s=args.retry_delay,
            retry_stages=args.retry_stages,
            **ray_params(args),
        )
    except PipelineFailed as exc:
        summary = exc.summary
        if exc.signum is None:
            rc = 1
            print(f"distillflow run failed: {exc}", file=sys.stderr)
        else:  # the shell's convention for a process ended by a signal
            rc = 128 + exc.signum
            print(f"distillflow run: {exc}", file=sys.stderr)
    except (StageError, KeyError) as exc:  # a bad override or target, a missing dependency: nothing to summarise
        print(f"distillflow run failed: {exc}", file=sys.stderr)
        return 1
    summary["invoked"], summary["imported"] = invoked, imported
    _print_summary(summary, time.time() - invoked)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return rc


def serve(args: argparse.Namespace) -> int:
    """Serve the flow as a deployment with a cron schedule, executing its runs here."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        print(
            "distillflow serve: no PREFECT_API_URL. Schedules need a running Prefect server (the temporary one that "
            "`distillflow run` starts runs no scheduler): start `prefect server start` and set PREFECT_API_URL.",
            file=sys.stderr,
        )
        return 2
    from distillflow.orchestration.pipeline import distill

    params = {
        "target": args.target,
        "overrides": args.set_params,
        "root": str(args.root.resolve()),
        "retries": args.retries,
        "retry_delay_s": args.retry_delay,
        "retry_stages": args.retry_stages,
        **ray_params(args),
    }
    distill.serve(
        name=args.name, cron=args.cron, parameters=params, description="distillflow: the DVC pipeline, scheduled"
    )
    return 0


def lineage(args: argparse.Namespace) -> int:
    """`distillflow lineage show|verify|cost`; exit 1 on a mismatch or an untraceable target."""
    from distillflow.orchestration import trace as lin

    root = args.root.resolve()
    try:
        if args.action == "show":
            tree = lin.show(root, args.target)
            print(json.dumps(tree, indent=2, sort_keys=True) if args.json else "\n".join(lin.render(tree)))
            return 0
        if args.action == "cost":
            table = lin.cost_table(lin.run_records(args.lineage_dir or root / "lineage", args.run))
            print(json.dumps(table, indent=2, sort_keys=True) if args.json else "\n".join(lin.render_cost(table)))
            return 0
        from distillflow.orchestration import verify

        os.chdir(root)  # DVC's API resolves paths against the working directory
        report = verify.verify(root)
    except lin.LineageError as exc:
        print(f"distillflow lineage {args.action}: {exc}", file=sys.stderr)
        return 1
    # Only a mismatch fails it; stages that never ran here, are not checked out or are stale are listed.
    print("\n".join(verify.render_verify(report)))
    return 1 if report.mismatches else 0


def _flow_commands(sub: Any) -> None:
    for cmd, text in (
        ("run", "run the DVC pipeline as a Prefect flow"),
        ("serve", "serve the flow as a deployment with a cron schedule"),
    ):
        p = sub.add_parser(cmd, help=text)
        p.add_argument(
            "--target", help="a stage (or foreach group): run it and what it depends on; default: every stage"
        )
        p.add_argument(
            "-S",
            "--set-param",
            dest="set_params",
            action="append",
            default=[],
            metavar="[FILE:]KEY=VALUE",
            help="change a param before running, as `dvc exp run -S` does (the change stays in the params file)",
        )
        p.add_argument("--root", type=Path, default=Path("."), help="the DVC repo (default: the current directory)")
        p.add_argument("--retries", type=int, default=2, help="retries of generation and training stages (default 2)")
        p.add_argument(
            "--retry-delay", type=float, default=10.0, help="first retry delay in seconds, doubling after (default 10)"
        )
        p.add_argument(
            "--retry-stage",
            dest="retry_stages",
            action="append",
            metavar="PATTERN",
            help="stages (fnmatch pattern, repeatable) that get retries; default: those that load models",
        )
        p.add_argument("--ray", dest="ray_address", metavar="ADDRESS", help="run stages on this Ray cluster (or auto)")
        p.add_argument(
            "--ray-stage",
            dest="ray_stages",
            action="append",
            metavar="PATTERN",
            help="with --ray: the stages (fnmatch, repeatable) that run there; default: the comparison's cells "
            "and bootstrap replicates (compare@*, boot@*, boot_*)",
        )
        p.add_argument("--ray-cpus", type=float, help="with --ray: CPUs per stage task (default 2)")
        p.add_argument("--ray-gpus", type=float, help="with --ray: GPUs per stage task (default 0)")
        p.add_argument(
            "--ray-parts",
            type=int,
            metavar="N",
            help="with --ray: split each generation stage (teacher, student and their replicates) into N parts, "
            "each a Ray task; the stage then gathers them (default: not split)",
        )
        p.add_argument(
            "--ray-parts-url",
            metavar="URL",
            help="with --ray-parts: an fsspec URL (s3://, gs://, file://) where parts leave their shards, for "
            "nodes with their own copy of the checkout and its inputs at the same path (default: the shared checkout)",
        )
    r = sub.choices["run"]
    r.add_argument("-j", "--jobs", type=int, default=4, help="stages run at the same time at most (default 4)")
    r.add_argument("--summary", type=Path, help="also write the per-stage outcome as JSON here")
    v = sub.choices["serve"]
    v.add_argument("--name", default="distillflow-serve", help="deployment name (default distillflow-serve)")
    v.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 03:00 daily)")


def _dag_commands(sub: Any) -> None:
    dag = sub.add_parser("dag", help="dvc.yaml upkeep")
    dsub = dag.add_subparsers(dest="dag_command", required=True)
    dsync = dsub.add_parser("sync", help="rewrite each stage's code deps in dvc.yaml from its imports")
    dsync.add_argument("--check", action="store_true", help="only report; exit 1 if dvc.yaml is out of date")
    dsync.add_argument(
        "--dvc-yaml",
        type=Path,
        action="append",
        help="a pipeline file (repeatable; default: dvc.yaml and comparison/dvc.yaml); stage modules live under .",
    )


def _lineage_commands(sub: Any) -> None:
    lin = sub.add_parser("lineage", help="trace, verify and cost the pipeline's artifacts")
    lsub = lin.add_subparsers(dest="action", required=True)
    show = lsub.add_parser("show", help="an artifact path, model folder or record id, back to its sources")
    show.add_argument(
        "target", help="a path (data/train/model, data/curate/curated.parquet) or a pair_id, generation_id or prompt_id"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of the text tree")
    lsub.add_parser("verify", help="recompute every digest; exit 1 if a file disagrees with dvc.lock or a manifest")
    cost = lsub.add_parser("cost", help="a run's cost, summed per stage")
    cost.add_argument(
        "--run", help="run id (DISTILLFLOW_RUN_ID); default: the newest run in lineage/runs/history.jsonl"
    )
    cost.add_argument("--lineage-dir", type=Path, help="where the run records are (default: ROOT/lineage)")
    cost.add_argument("--json", action="store_true")
    for p in lsub.choices.values():
        p.add_argument("--root", type=Path, default=Path("."), help="the DVC repo (default: the current directory)")


def _params_commands(sub: Any) -> None:
    p = sub.add_parser("params", help="every params setting: key, type, value and help (docs/params.md)")
    p.add_argument("sections", nargs="*", metavar="SECTION", help="params.yaml sections (default: all)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default params.yaml)")
    p.add_argument("--markdown", action="store_true", help="print docs/params.md's Markdown instead")


def params_command(args: argparse.Namespace) -> int:
    from distillflow.orchestration import schema

    render = schema.render_markdown if args.markdown else schema.render_text
    try:
        sys.stdout.write(render(args.params, args.sections or None))
    except (KeyError, ValueError) as exc:
        print(f"distillflow params: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillflow", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a params file for every stage")
    c.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"))
    s = sub.add_parser("stages", help="list the stages of dvc.yaml")
    s.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    _flow_commands(sub)
    _dag_commands(sub)
    _lineage_commands(sub)
    _params_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "lineage":
        return lineage(args)
    if args.command == "check":
        return check_params_file(args.params)
    if args.command == "params":
        return params_command(args)
    if args.command == "run":
        return run_flow(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "dag":
        from distillflow.orchestration import codedeps

        files = args.dvc_yaml or [f for f in codedeps.PIPELINES if f.is_file()]
        return max(codedeps.sync(f, args.check, root=Path(".")) for f in files)
    return stages(args.dvc_yaml)


if __name__ == "__main__":
    sys.exit(main())
