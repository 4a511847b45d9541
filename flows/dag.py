"""The DAG as DVC resolves it: stages, their deps, params, outs and edges.

Nothing here parses dvc.yaml by hand: stages come from DVC's own index, so
`foreach`/`matrix` stages are expanded exactly as `dvc repro` expands them
(`round_student@2`, ...) and the edges are the ones `dvc dag` draws.

Every use of DVC's Python API in this package goes through `open_repo`, which holds
one process-wide lock: DVC's in-process API is not thread-safe, and two DVC
operations on one repo at once fight over its lock and state database (see
docs/STACK.md). Stage commands themselves run outside the lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import Stage as DvcStage

# Serialises every in-process DVC call of this process (fingerprints, commits,
# checkouts). Reentrant so a helper holding it can call another.
DVC_LOCK = threading.RLock()


@contextmanager
def open_repo(root: Path) -> Iterator[Repo]:
    """A fresh DVC Repo on `root`, used under DVC_LOCK and closed afterwards.

    Fresh each time: a Repo caches its index and dvc.lock, which stage commits change.
    The process must run in `root` (the flow changes into it when it starts).
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    if Path.cwd().resolve() != root:
        # DVC resolves some paths against the process's working directory, not the
        # repo (run-cache restore builds its stage from the relative "dvc.yaml").
        raise RuntimeError(f"DVC operations on {root} must run with it as the working directory (cwd is {Path.cwd()})")
    with DVC_LOCK:
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()


def stage_name(stage: DvcStage) -> str:
    """The stage's address relative to the repo root, as `dvc dag` run there prints it.

    (DVC's own `stage.addressing` is relative to the process's working directory.)
    """
    path = Path(stage.path_in_repo).as_posix()
    name = getattr(stage, "name", None)
    if name is None:  # a .dvc file (dvc add / dvc import)
        return path
    return name if path == "dvc.yaml" else f"{path}:{name}"


def find_stage(repo: Repo, name: str) -> DvcStage:
    for stage in repo.index.stages:
        if stage_name(stage) == name:
            return stage
    known = sorted(stage_name(s) for s in repo.index.stages)
    raise KeyError(f"DVC knows no stage {name!r} in {repo.root_dir}; stages: {', '.join(known)}")


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    name: str  # e.g. "teacher", "round_student@2", "sub/dvc.yaml:prep", "data.dvc"
    cmd: str | list[str] | None  # None for a .dvc data source
    wdir: str  # relative to the repo root
    deps: tuple[str, ...]  # repo-relative paths (not params files)
    params: dict[str, tuple[str, ...]]  # params file -> declared keys
    outs: tuple[str, ...]  # repo-relative paths (outs, metrics, plots)
    metrics: tuple[str, ...]  # the outs that are metrics files
    always_changed: bool
    frozen: bool

    @property
    def group(self) -> str:
        """`round_student` for `round_student@2`: the foreach/matrix group name."""
        return self.name.split("@", 1)[0]


@dataclass
class Dag:
    stages: dict[str, StageSpec]  # in a topological order
    edges: set[tuple[str, str]]  # (upstream, downstream)
    upstream: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.upstream = {n: set() for n in self.stages}
        for up, down in self.edges:
            self.upstream[down].add(up)

    def resolve(self, target: str) -> list[str]:
        """Stage names a target means: one stage, or every member of a foreach group."""
        if target in self.stages:
            return [target]
        members = [n for n, s in self.stages.items() if "@" in n and s.group == target]
        if members:
            return members
        raise KeyError(f"no stage {target!r} in dvc.yaml; stages: {', '.join(self.stages)}")

    def closure(self, targets: list[str] | None) -> list[str]:
        """The targets and everything upstream of them (what `dvc repro TARGET` runs), in
        topological order; every stage when targets is empty."""
        if not targets:
            return list(self.stages)
        todo = [n for t in targets for n in self.resolve(t)]
        keep: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(self.upstream[name])
        return [n for n in self.stages if n in keep]

    def downstream(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = [name]
        while todo:
            cur = todo.pop()
            for up, down in self.edges:
                if up == cur and down not in found:
                    found.add(down)
                    todo.append(down)
        return found


def _relative(root_dir: str, path: str) -> str:
    return Path(os.path.relpath(path, root_dir)).as_posix()


def load_dag(root: Path) -> Dag:
    """Read the pipeline from DVC's index (foreach/matrix expanded) and its graph."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency

    root = Path(root).resolve()
    with open_repo(root) as repo:
        index = repo.index
        graph = index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage_name(stage) for stage in index.stages}
        specs: dict[str, StageSpec] = {}
        for stage in index.stages:
            deps = tuple(_relative(repo.root_dir, d.fs_path) for d in stage.deps if not isinstance(d, ParamsDependency))
            params = {
                _relative(repo.root_dir, d.fs_path): tuple(d.params)
                for d in stage.deps
                if isinstance(d, ParamsDependency)
            }
            outs = tuple(_relative(repo.root_dir, o.fs_path) for o in stage.outs)
            metrics = tuple(_relative(repo.root_dir, o.fs_path) for o in stage.outs if o.metric)
            specs[names[stage]] = StageSpec(
                name=names[stage],
                cmd=stage.cmd,
                wdir=_relative(repo.root_dir, stage.wdir) or ".",
                deps=deps,
                params=params,
                outs=outs,
                metrics=metrics,
                always_changed=bool(stage.always_changed),
                frozen=bool(stage.frozen),
            )
        edges = {(names[up], names[down]) for down, up in graph.edges}
        # Topological order, ties broken by dvc.yaml order, so runs and logs read the same way each time.
        position = {n: i for i, n in enumerate(specs)}
        order_graph = nx.DiGraph()
        order_graph.add_nodes_from(specs)
        order_graph.add_edges_from(edges)
        order = list(nx.lexicographical_topological_sort(order_graph, key=lambda n: position[n]))
    return Dag(stages={n: specs[n] for n in order}, edges=edges)
