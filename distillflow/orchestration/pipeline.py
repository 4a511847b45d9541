"""The DVC pipeline as a Prefect flow: one task per DVC stage, the DAG read from DVC.

    distill(target=None, overrides=[], root=".")

- The DAG is DVC's (distillflow/orchestration/dag.py): one task per stage (foreach stages included), named
  after it; a task is submitted once its upstream stages are done, with
  `wait_for=` its upstream tasks, so Prefect records DVC's edges. Independent stages
  (teacher and student generation) run at the same time in a thread pool.
- Cache key: the stage's fingerprint (distillflow/orchestration/dvc_ops.py: command, declared params
  values, content hashes of deps), computed after its upstream stages finished. Task
  results (a small JSON record) persist in the repo's `.dvc/tmp/distillflow-prefect/`,
  so a hit survives across runs and servers. On a hit no stage code runs; the
  outputs are checked and, if missing, restored from the DVC cache and dvc.lock is
  updated. On a miss, what DVC already has is reused (dvc.lock up to date, or the
  run-cache), else the command runs and is recorded as `dvc repro` records it, so
  `dvc status` is clean after a Prefect run and `dvc repro` has nothing to do.
- Retries with exponential backoff on stages that load models (generation and
  training: they declare distillflow/base/models.py); a failed attempt leaves no partial
  output; other branches finish; a rerun resumes from what is done.
- SIGTERM or SIGINT stops the run (distillflow/orchestration/preempt.py): the running
  stages' processes are ended, their partial outputs removed, nothing more launched;
  a rerun resumes.
- Each stage publishes a markdown artifact (outputs, row counts, drops by reason,
  validation, metrics), and the run a table artifact; stage output goes to the run
  logger.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from distillflow.orchestration import artifacts, codedeps, dvc_ops, preempt, ray_exec
from distillflow.orchestration.dag import Dag, StageSpec, load_dag
from distillflow.orchestration.dvc_adapter import session
from distillflow.orchestration.ray_exec import RayStages

# Where Prefect keeps task results (the cache records), relative to the repo root.
# Inside .dvc/tmp: git- and dvc-ignored, and it lives as long as this DVC cache does.
RESULTS_DIR = ".dvc/tmp/distillflow-prefect"
# A stage whose code loads one of these modules loads a model (generates or trains) and
# gets retries with backoff; cheap data stages fail fast. (dvc.yaml names layer folders,
# so the stage's import closure is read from its module: distillflow/orchestration/codedeps.py.)
RETRY_IF_LOADS = (
    "distillflow/base/models.py",
    "distillflow/engines/generation.py",
    "distillflow/training/basics.py",
)


class PipelineFailed(RuntimeError):
    """Stages failed, or (`signum` set) a signal stopped the run."""

    def __init__(self, message: str, summary: dict[str, Any], signum: int | None = None):
        super().__init__(message)
        self.summary, self.signum = summary, signum


def cache_key(stage: str, fingerprint: str | None) -> str | None:
    """The Prefect cache key of a stage: its name (made file-safe) and fingerprint."""
    if fingerprint is None:
        return None  # always_changed stage: never cached
    return f"{artifacts.artifact_key(stage)}-{fingerprint}"


def _key_fn(context: Any, parameters: dict[str, Any]) -> str | None:
    return cache_key(parameters["stage"], parameters["fingerprint"])


def run_stage(
    root: str,
    stage: str,
    cmd: str | list[str] | None,
    wdir: str,
    outs: list[str],
    fingerprint: str | None,
    ray: dict[str, Any] | None = None,
    side_by_side: bool = False,
    split: bool = False,
) -> dict[str, Any]:
    """One DVC stage (the body of its task; skipped entirely on a cache hit); `ray` (a
    RayStages as a dict): the command runs on Ray if the stage matches its patterns,
    and, when `split`, in parts there first; `side_by_side`: it may run beside other
    stages (dvc_ops.run_command's passive_threads)."""
    logger = get_run_logger()
    path = Path(root)
    attempt = runtime_task_run.run_count
    if preempt.STOP.signum is not None:  # queued for a free thread, or waited out a retry delay
        raise dvc_ops.StageStopped(stage, preempt.STOP.signum)
    logger.info("stage %s: attempt %d, fingerprint %s", stage, attempt, fingerprint)
    reused = dvc_ops.reuse(path, stage)
    started = finished = None
    if reused:
        logger.info(
            "stage %s: not run: %s",
            stage,
            "dvc.lock is up to date" if reused == "up-to-date" else "outputs restored from DVC's run-cache",
        )
        how = reused
    elif cmd is None:
        raise dvc_ops.StageError(
            f"stage {stage!r} is a data source or frozen and its recorded outputs are not in the workspace "
            "or DVC cache (try `dvc pull`)"
        )
    else:
        dvc_ops.remove_outs(path, stage)  # as `dvc repro` does before running a stage
        ok = False
        try:
            on_ray = None if ray is None else RayStages(**{**ray, "patterns": tuple(ray["patterns"])})
            started, finished = dvc_ops.run_command(
                path, stage, cmd, wdir, logger.info, outs, on_ray, passive_threads=side_by_side, split=split
            )
            dvc_ops.commit(path, stage)
            ok = True
        finally:
            if not ok:
                removed = dvc_ops.clean_failed(path, stage, tuple(outs))
                logger.warning(
                    "stage %s: attempt %d failed; removed its partial output: %s", stage, attempt, removed or "none"
                )
        how = "ran"
    after = dvc_ops.stage_fingerprint(path, stage)
    if after != fingerprint:
        raise dvc_ops.StageError(
            f"stage {stage!r}: its inputs changed while it ran "
            f"(fingerprint {fingerprint} before, {after} after); not caching"
        )
    return {
        "stage": stage,
        "fingerprint": fingerprint,
        "how": how,
        "started": started,
        "finished": finished,
        "attempts": attempt,
        "outs": dvc_ops.outs_digests(path, stage),
    }


def _retry_unless_stopped(task: Any, task_run: Any, state: Any) -> bool:
    return not preempt.STOP.requested  # a stopped run retries nothing


stage_task = task(
    run_stage,
    persist_result=True,
    result_serializer="json",
    cache_key_fn=_key_fn,
    retry_condition_fn=_retry_unless_stopped,
)


def _module(spec: StageSpec) -> str | None:
    """The stage module its command runs (`python -m stages.X` -> X); None for another command."""
    if not isinstance(spec.cmd, str) or not spec.cmd.strip().startswith("python -m stages."):
        return None
    return codedeps.stage_module(spec.name, spec.cmd)


def loads_models(spec: StageSpec, root: Path) -> bool:
    """Whether the stage's module (`python -m stages.X`) loads a model, by its imports."""
    module = _module(spec)
    return module is not None and any(f in codedeps.closure(module, root) for f in RETRY_IF_LOADS)


def splits(spec: StageSpec, root: Path) -> bool:
    """Whether `--ray-parts` may split the stage: its module says so (`PARTS = True`:
    the generation stages, whose command takes `--part K/N`; distillflow/engines/parts.py)."""
    module = _module(spec)
    return module is not None and codedeps.constant(root, module, "PARTS") is True


def retries_for(spec: StageSpec, retries: int, retry_stages: list[str] | None, root: Path) -> int:
    """`retries` for a stage matched by a `retry_stages` pattern (fnmatch on its name)
    or, by default, for one that loads models; 0 otherwise."""
    if retry_stages is not None:
        return retries if any(fnmatch(spec.name, p) for p in retry_stages) else 0
    return retries if loads_models(spec, root) else 0


def _submit(
    dag: Dag,
    name: str,
    root: Path,
    results_dir: Path,
    futures: dict[str, PrefectFuture],
    retries: int,
    retry_delay_s: float,
    retry_stages: list[str] | None,
    refresh: bool,
    ray: RayStages | None,
    side_by_side: set[str],
) -> PrefectFuture:
    spec = dag.stages[name]
    fp = dvc_ops.stage_fingerprint(root, name)
    n = retries_for(spec, retries, retry_stages, root)
    configured = stage_task.with_options(
        name=name,
        task_run_name=name,
        refresh_cache=refresh,
        result_storage=results_dir,
        retries=n,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s) if n else 0,
    )
    split = ray is not None and ray.parts > 0 and splits(spec, root)
    return configured.submit(
        str(root),
        name,
        spec.cmd,
        spec.wdir,
        list(spec.outs),
        fp,
        asdict(ray) if ray is not None and (ray.matches(name) or split) else None,
        name in side_by_side,
        split,
        wait_for=[futures[u] for u in sorted(dag.upstream[name])],
    )


@flow(name="distillflow", task_runner=ThreadPoolTaskRunner(max_workers=4))
def distill(
    target: str | None = None,
    overrides: list[str] | None = None,
    root: str = ".",
    retries: int = 2,
    retry_delay_s: float = 10.0,
    retry_stages: list[str] | None = None,
    ray_address: str | None = None,
    ray_stages: list[str] | None = None,
    ray_cpus: float = 2.0,
    ray_gpus: float = 0.0,
    ray_parts: int = 0,
    ray_parts_url: str | None = None,
) -> dict[str, Any]:
    """Run the DVC pipeline (or `target` and its upstream stages) as Prefect tasks.

    overrides: `[file:]key=value` params changes, applied to the params file in place
    as `dvc exp run -S` applies them, before anything runs.
    retries, retry_delay_s: attempts after a failure, and the first delay (doubling).
    retry_stages: fnmatch patterns of the stages that get retries; default: the
    stages that load models (generation and training).
    ray_address: a Ray cluster (host:port, or auto) that runs the commands of the stages
    matching `ray_stages` (fnmatch; default ray_exec.DEFAULT_STAGES), each task asking
    for `ray_cpus` CPUs and `ray_gpus` GPUs (distillflow/orchestration/ray_exec.py).
    ray_parts: split each generation stage into this many parts, each a Ray task
    (0: not split); ray_parts_url: an fsspec URL where parts leave their shards, for
    nodes that do not share the checkout's filesystem (distillflow/engines/parts.py).
    """
    flow_started = time.time()
    logger = get_run_logger()
    root_path = Path(root).resolve()
    previous_cwd = Path.cwd()
    os.chdir(root_path)  # DVC's API resolves some paths against the working directory
    try:
        # One DVC repo and index for the run (distillflow/orchestration/dvc_adapter.py), as `dvc repro` has.
        ray = None
        if ray_address is not None:
            patterns = tuple(ray_stages) if ray_stages else ray_exec.DEFAULT_STAGES
            ray = RayStages(ray_address, patterns, ray_cpus, ray_gpus, ray_parts, ray_parts_url)
        with (
            dvc_ops.run_lock(root_path),
            session(root_path),
            ray_exec.connected(ray),
            preempt.handling_signals(logger.warning),
        ):
            return _distill(
                logger, root_path, target, overrides or [], retries, retry_delay_s, retry_stages, flow_started, ray
            )
    finally:
        os.chdir(previous_cwd)


def _distill(
    logger: Any,
    root: Path,
    target: str | None,
    overrides: list[str],
    retries: int,
    retry_delay_s: float,
    retry_stages: list[str] | None,
    flow_started: float,
    ray: RayStages | None,
) -> dict[str, Any]:
    for change in dvc_ops.apply_overrides(root, overrides) if overrides else []:
        logger.info("params override: %s", change)
    dag = load_dag(root)
    selected = dag.closure([target] if target else None)
    logger.info("DAG from DVC: %d stages, %d edges; running %s", len(dag.stages), len(dag.edges), ", ".join(selected))
    results_dir = root / RESULTS_DIR
    side_by_side = _crowded(dag.side_by_side(selected))
    if ray is not None:
        _log_ray(logger, ray, dag, root, selected)

    summary: dict[str, Any] = {
        "flow_run_id": str(runtime_flow_run.id),
        "flow_started": flow_started,
        "root": str(root),
        "stages": {},
    }
    futures: dict[str, PrefectFuture] = {}
    running: dict[PrefectFuture, str] = {}
    submitted_at: dict[str, float] = {}
    done: set[str] = set()
    failed: dict[str, str] = {}
    refreshed: set[str] = set()
    pending = list(selected)

    def submit(name: str, refresh: bool = False) -> None:
        submitted_at[name] = time.time()
        fut = _submit(
            dag, name, root, results_dir, futures, retries, retry_delay_s, retry_stages, refresh, ray, side_by_side
        )
        futures[name] = fut
        running[fut] = name

    while pending or running:
        for name in [n for n in pending if dag.upstream[n] <= done and not preempt.STOP.requested]:
            pending.remove(name)
            submit(name)
        if not running:
            break  # what is left waits on a failed stage
        fut = next(iter(as_completed(list(running))))
        name = running.pop(fut)
        fut.wait()
        state = fut.state
        if not state.is_completed():
            failed[name] = state.message or state.name
            summary["stages"][name] = {
                "outcome": "stopped" if dvc_ops.StageStopped.__name__ in failed[name] else "failed",
                "message": failed[name],
                "seconds": time.time() - submitted_at[name],
            }
            logger.error("stage %s %s: %s", name, summary["stages"][name]["outcome"], failed[name])
            continue
        record = fut.result()
        cached = state.name == "Cached"
        sync = dvc_ops.ensure(root, name)
        if sync == "missing":
            if name in refreshed:
                raise dvc_ops.StageError(f"stage {name!r}: ran, yet DVC holds no copy of its outputs")
            logger.warning(
                "stage %s: Prefect cache hit, but its outputs are neither in the workspace nor in the DVC cache; "
                "running it again",
                name,
            )
            refreshed.add(name)
            submit(name, refresh=True)
            continue
        seconds = time.time() - submitted_at[name]
        summary["stages"][name] = _completed(logger, root, dag.stages[name], fut, record, cached, sync, seconds)
        done.add(name)
    return _finish(summary, selected, done, failed, preempt.STOP.signum)


def _log_ray(logger: Any, ray: RayStages, dag: Dag, root: Path, selected: list[str]) -> None:
    on_ray = [n for n in selected if ray.matches(n)]
    logger.info("on Ray at %s: %s", ray.address, ", ".join(on_ray) or "no stage")
    if ray.parts:
        split = [n for n in selected if splits(dag.stages[n], root)]
        logger.info("in %d parts on Ray: %s", ray.parts, ", ".join(split) or "no stage")
        if not split:
            logger.warning("--ray-parts: no stage of this run generates in parts")
    if not on_ray and not ray.parts:
        logger.warning("--ray: no stage of this run matches %s; every stage runs here", ", ".join(ray.patterns))


def _crowded(side_by_side: set[str]) -> set[str]:
    """The stages that may run side by side, where their threads may outnumber the cores:
    min(--jobs, how many they are) stages of 2 torch threads each (stagekit/entry.py)
    against os.cpu_count(); none where there are cores to spare (passive waiting then
    only costs: dvc_ops.run_command)."""
    runner = FlowRunContext.get().task_runner
    # other runners (Dask, Ray) run every submitted task at once
    jobs = runner._max_workers if isinstance(runner, ThreadPoolTaskRunner) else len(side_by_side)
    at_once = min(jobs, len(side_by_side))  # Prefect keeps the pool size private (_max_workers)
    return side_by_side if at_once > 1 and 2 * at_once > (os.cpu_count() or 1) else set()


def _completed(
    logger: Any,
    root: Path,
    spec: StageSpec,
    fut: PrefectFuture,
    record: dict[str, Any],
    cached: bool,
    sync: str,
    seconds: float,
) -> dict[str, Any]:
    """A completed stage's summary entry; logs it and publishes its Prefect artifact."""
    if cached:
        outcome = "restored" if sync == "restored" else "cached"
    else:
        outcome = {"ran": "ran", "up-to-date": "up-to-date", "run-cache": "run-cache"}[record["how"]]
    entry = {
        "outcome": outcome,
        "fingerprint": record["fingerprint"],
        "seconds": round(seconds, 3),
        "task_run_id": str(fut.task_run_id),
    }
    if outcome == "ran":
        entry.update(started=record["started"], finished=record["finished"], attempts=record["attempts"])
    logger.info("stage %s: %s (%.1f s)", spec.name, outcome, seconds)
    create_markdown_artifact(
        key=artifacts.artifact_key(spec.name),
        markdown=artifacts.stage_markdown(root, spec, outcome, record, seconds),
        description=f"distillflow stage {spec.name}: {outcome}",
    )
    return entry


def _finish(
    summary: dict[str, Any], selected: list[str], done: set[str], failed: dict[str, str], signum: int | None
) -> dict[str, Any]:
    """The run's summary in DAG order, its table artifact; raises PipelineFailed if a
    stage failed or a signal (`signum`) stopped the run."""
    not_run = [n for n in selected if n not in done and n not in failed]
    why = "the run was stopped" if signum is not None else "an upstream stage failed"
    for name in not_run:
        summary["stages"][name] = {"outcome": "not-run", "message": why}
    summary["stages"] = {n: summary["stages"][n] for n in selected}
    create_table_artifact(
        key="distillflow-run",
        description="distillflow: outcome per stage",
        table=[
            {
                "stage": n,
                "outcome": e["outcome"],
                "seconds": e.get("seconds", ""),
                "fingerprint": (e.get("fingerprint") or "")[:12],
            }
            for n, e in summary["stages"].items()
        ],
    )
    if signum is not None:
        stopped = [n for n in failed if summary["stages"][n]["outcome"] == "stopped"]
        also = [n for n in failed if n not in stopped]
        raise PipelineFailed(
            f"stopped by {signal.Signals(signum).name}: stages stopped (their partial outputs removed): "
            f"{', '.join(stopped) or 'none'}; failed: {', '.join(also) or 'none'}; "
            f"not run: {', '.join(not_run) or 'none'}; finished stages are kept: run again to resume",
            summary,
            signum,
        )
    if failed:
        which = ", ".join(f"{n} ({m.splitlines()[0]})" for n, m in failed.items())
        raise PipelineFailed(f"stages failed: {which}; not run: {', '.join(not_run) or 'none'}", summary)
    return summary
