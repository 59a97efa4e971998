"""The pipeline as a DAG: runs are nodes, ``fromRun`` references are edges."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from crucible.local.load import LoadedResource

Key = tuple[str, str, str]
"""(namespace, kind, name)"""


class DagError(ValueError):
    """The resources do not form a runnable DAG (a missing reference, a duplicate, a cycle)."""


@dataclass
class Dag:
    nodes: dict[Key, LoadedResource]
    upstream: dict[Key, dict[str, Key]] = field(default_factory=dict)
    """run -> {dotted spec path of the fromRun: the run it names}"""

    def order(self) -> list[Key]:
        """A topological order; among runs ready at the same time, the one loaded first goes first."""
        rank = {key: i for i, key in enumerate(self.nodes)}
        waiting = {key: len(set(self.upstream.get(key, {}).values())) for key in self.nodes}
        downstream: dict[Key, list[Key]] = {key: [] for key in self.nodes}
        for key, deps in self.upstream.items():
            for dep in set(deps.values()):
                downstream[dep].append(key)
        ready = [(rank[k], k) for k, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        out: list[Key] = []
        while ready:
            _, key = heapq.heappop(ready)
            out.append(key)
            for nxt in downstream[key]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    heapq.heappush(ready, (rank[nxt], nxt))
        if len(out) != len(self.nodes):
            raise DagError(_describe_cycle(self, [k for k in self.nodes if k not in set(out)]))
        return out

    def with_upstream(self, wanted: Iterable[Key]) -> set[Key]:
        """``wanted`` and everything they need, transitively."""
        seen: set[Key] = set()
        stack = list(wanted)
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            stack += self.upstream.get(key, {}).values()
        return seen

    def downstream_of(self, key: Key) -> set[Key]:
        out: set[Key] = set()
        frontier = [key]
        while frontier:
            current = frontier.pop()
            for other, deps in self.upstream.items():
                if current in deps.values() and other not in out:
                    out.add(other)
                    frontier.append(other)
        return out


def build_dag(resources: list[LoadedResource]) -> Dag:
    nodes: dict[Key, LoadedResource] = {}
    problems: list[str] = []
    for item in resources:
        if item.key in nodes:
            first = nodes[item.key]
            problems.append(
                f"{item.where}: {item.resource.kind} {item.resource.name} is defined twice "
                f"(also in {first.where}); rename one of them"
            )
            continue
        nodes[item.key] = item
    dag = Dag(nodes)
    for key, item in nodes.items():
        for path, ref in item.resource.input_refs().items():
            target = (key[0], ref.kind, ref.name)
            if target not in nodes:
                same_name = [k for k in nodes if k[2] == ref.name and k[0] == key[0]]
                hint = (
                    f"; did you mean kind {same_name[0][1]}?"
                    if same_name
                    else f"; add a {ref.kind} named {ref.name} to the files you run, or use spec.{path}.uri"
                )
                problems.append(
                    f"{item.where}: {item.resource.kind} {item.resource.name}: spec.{path}.fromRun names "
                    f"{ref.kind} {ref.name}, which is not among the loaded resources{hint}"
                )
                continue
            if target == key:
                problems.append(
                    f"{item.where}: {item.resource.kind} {item.resource.name}: spec.{path}.fromRun names the run itself"
                )
                continue
            dag.upstream.setdefault(key, {})[path] = target
    if problems:
        raise DagError("\n".join(problems))
    dag.order()  # raises on a cycle
    return dag


def _describe_cycle(dag: Dag, stuck: list[Key]) -> str:
    """Name one cycle among the runs that could not be ordered, e.g. ``A -> B -> A``."""
    stuck_set = set(stuck)
    start = stuck[0]
    path = [start]
    seen = {start: 0}
    current = start
    while True:
        nxt = next(k for k in dag.upstream.get(current, {}).values() if k in stuck_set)
        if nxt in seen:
            cycle = [*path[seen[nxt]:], nxt]
            break
        seen[nxt] = len(path)
        path.append(nxt)
        current = nxt
    names = " -> ".join(f"{k[1]} {k[2]}" for k in reversed(cycle))
    first = dag.nodes[cycle[0]]
    return (
        f"{first.where}: the fromRun references form a cycle: {names} "
        "(each arrow reads 'feeds'); break it by pointing one input at a uri"
    )
