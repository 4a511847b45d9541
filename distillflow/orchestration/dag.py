"""The DAG as DVC resolves it: stages, their deps, params, outs and edges.

Nothing here parses dvc.yaml by hand: stages come from DVC's own index, so
`foreach`/`matrix` stages are expanded exactly as `dvc repro` expands them
(`round@2`, ...) and the edges are the ones `dvc dag` draws.

DVC is read through distillflow/orchestration/dvc_adapter.py (one opened repo per flow run, under one
process-wide lock: DVC's in-process API is not thread-safe; see docs/STACK.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distillflow.orchestration.dvc_adapter import project, stage_name

__all__ = ["Dag", "StageSpec", "load_dag", "stage_name"]


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    name: str  # e.g. "teacher", "round@2", "sub/dvc.yaml:prep", "data.dvc"
    cmd: str | list[str] | None  # None for a .dvc data source
    wdir: str  # relative to the repo root
    deps: tuple[str, ...]  # repo-relative paths (not params files)
    params: dict[str, tuple[str, ...]]  # params file -> declared keys
    outs: tuple[str, ...]  # repo-relative paths (outs, metrics, plots)
    metrics: tuple[str, ...]  # the outs that are metrics files
    always_changed: bool
    frozen: bool
    dvcfile: str = "dvc.yaml"  # the file that defines it (a data source: its .dvc file)

    @property
    def group(self) -> str:
        """`round` for `round@2`: the foreach/matrix group name."""
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
        """Stage names a target means, across every pipeline file: one stage, every member
        of a foreach/matrix group, or every stage of a pipeline file (`comparison/dvc.yaml`);
        a stage of another file may be named without its `file:` prefix when that is
        unambiguous (`report` for `comparison/dvc.yaml:report`)."""
        if target in self.stages:
            return [target]
        in_file = [n for n, s in self.stages.items() if s.dvcfile == target]
        if in_file:
            return in_file
        for name in (target, *sorted({n.rsplit(":", 1)[0] + ":" + target for n in self.stages if ":" in n})):
            members = [n for n, s in self.stages.items() if n == name or ("@" in n and s.group == name)]
            if members:
                return members
        raise KeyError(f"no stage {target!r} in the pipelines; stages: {', '.join(self.stages)}")

    def default(self) -> list[str]:
        """What a plain `distillflow run` runs, as a plain `dvc repro` does: the stages of
        the root dvc.yaml and what they depend on; not the other pipeline files' stages
        (the method comparison, comparison/dvc.yaml), which run when targeted."""
        return self._upstream_closure([n for n, s in self.stages.items() if s.dvcfile == "dvc.yaml"])

    def closure(self, targets: list[str] | None) -> list[str]:
        """The targets and everything upstream of them (what `dvc repro TARGET` runs), in
        topological order; with no targets, `default()`."""
        if not targets:
            return self.default()
        return self._upstream_closure([n for t in targets for n in self.resolve(t)])

    def _upstream_closure(self, names: list[str]) -> list[str]:
        todo = list(names)
        keep: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(self.upstream[name])
        return [n for n in self.stages if n in keep]

    def side_by_side(self, selected: list[str]) -> set[str]:
        """The selected stages that may run while another selected stage runs: those with
        a selected stage that is neither upstream nor downstream of them (teacher and
        student generation; a comparison's cells)."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.stages)
        graph.add_edges_from(self.edges)
        chosen = set(selected)
        return {n for n in selected if chosen - nx.ancestors(graph, n) - nx.descendants(graph, n) - {n}}

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


def load_dag(root: Path) -> Dag:
    """Read the pipeline from DVC's index (foreach/matrix expanded) and its graph."""
    import networkx as nx

    with project(Path(root)) as p:
        described, edges = p.describe()
    specs = {d["name"]: StageSpec(**d) for d in described}
    # Topological order, ties broken by dvc.yaml order, so runs and logs read the same way each time.
    position = {n: i for i, n in enumerate(specs)}
    order_graph = nx.DiGraph()
    order_graph.add_nodes_from(specs)
    order_graph.add_edges_from(edges)
    order = list(nx.lexicographical_topological_sort(order_graph, key=lambda n: position[n]))
    return Dag(stages={n: specs[n] for n in order}, edges=edges)
