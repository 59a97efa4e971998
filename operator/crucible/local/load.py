"""Load resources for the embedded runner through the one shared loader (``crucible.api.validate``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crucible.api.common import Resource
from crucible.api.validate import load_resources as api_load_resources


class LoadError(ValueError):
    """One or more resources could not be loaded; the message lists every problem, one per line."""


@dataclass(frozen=True)
class LoadedResource:
    resource: Resource
    source: Path
    """The YAML file the resource came from."""
    line: int = 1
    """Line of the document in that file."""

    @property
    def namespace(self) -> str:
        return self.resource.metadata.namespace or "default"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.resource.kind, self.resource.name)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_resources(paths: Iterable[str | Path]) -> list[LoadedResource]:
    """Every Crucible resource under ``paths``, validated; :class:`LoadError` lists all problems.

    References to runs that are not among the files are left to :func:`crucible.local.dag.build_dag`,
    which rejects them: with no cluster there is nowhere else they could come from.
    """
    paths = list(paths)
    result = api_load_resources(paths)
    if result.problems:
        raise LoadError("\n".join(str(p) for p in result.problems))
    if not result.resources:
        raise LoadError(f"no Crucible resources (apiVersion crucible.dev/v1alpha1) in {', '.join(map(str, paths))}")
    return [LoadedResource(item.resource, Path(item.file), item.line) for item in result.resources]
