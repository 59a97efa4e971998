"""The registry of kinds: everything specific to a kind, declared once, in that kind's module.

    register(kind: Kind) -> Kind
    kinds() -> list[Kind]            # in registration order
    kind_of(name: str) -> Kind       # KeyError for an unknown kind
    load_plugins()                   # CRUCIBLE_KINDS and the "crucible.kinds" entry points

A :class:`Kind` holds the resource model (spec model, ``KIND``, ``PLURAL``, short names, the
``fromRun`` kinds each input accepts, immutable fields, CEL rules), the stage entry (the argv
after the interpreter, ``-m crucible.trainer STAGE``), the roles of an attempt, whether it
keeps checkpoints and produces a model, its printer columns, the results the summary shows,
its section of the report and any extra RBAC rules. Core (plan, the reconcile step), render,
crdgen, the CLI, the summary, the report, the RBAC rules and the chart's CRDs read it; no code
outside a kind's module names that kind.

How a kind is added without editing Crucible: a module that builds a :class:`Kind` and calls
:func:`register`, named in the environment variable ``CRUCIBLE_KINDS`` (comma-separated module
names) or in an installed distribution's ``crucible.kinds`` entry point group. Both are read
when :mod:`crucible.api` is imported, so every process — ``crucible validate``, ``crucible
crds``, ``crucible run``, the operator, the pods' spec parsing — sees the same kinds. The
environment variable is there because a kind under development (or in a test suite) has no
distribution to carry an entry point, and because an operator Deployment sets it with one
line of ``env``; the entry point is the packaged way, and needs no configuration at all.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crucible.api.common import Resource

KINDS_ENV = "CRUCIBLE_KINDS"
ENTRY_POINT_GROUP = "crucible.kinds"

SHARD_PLACEHOLDER = "{shard}"
"""Stands in a sharded role's argv for the worker index; backends substitute it."""


@dataclass(frozen=True)
class Role:
    """One group of identical replicas of an attempt (a Job on Kubernetes, a process group locally)."""

    name: str
    replicas: int
    procs_per_node: int
    gpus_per_node: int
    command: tuple[str, ...]
    distributed: bool
    """True when the processes form one torch.distributed world (torchrun rendezvous)."""
    sharded: bool = False
    """True when each replica is one shard of the work (``--shard``/``--num-shards``)."""

    @property
    def world_size(self) -> int:
        return self.replicas * self.procs_per_node

    def command_for(self, shard: int | str) -> tuple[str, ...]:
        """The argv with the shard index filled in (a no-op for unsharded roles)."""
        return tuple(a.replace(SHARD_PLACEHOLDER, str(shard)) for a in self.command)


RolesFn = Callable[["Resource", tuple[str, ...]], tuple[Role, ...]]
"""(resource, base argv) -> the roles of one attempt, run one after the other."""
RoleNamesFn = Callable[["Resource"], tuple[str, ...]]


def one_role(name: str, *, distributed: bool = True) -> tuple[RolesFn, RoleNamesFn]:
    """The common case: one role of ``resources.nodes`` × processes per node."""

    def roles(resource: Resource, base: tuple[str, ...]) -> tuple[Role, ...]:
        res = resource.spec.resources
        nodes = res.nodes if distributed else 1
        procs = res.procs_per_node if distributed else 1
        return (Role(name, nodes, procs, res.gpus_per_node, base, distributed=distributed and nodes * procs > 1),)

    return roles, lambda resource: (name,)


@dataclass(frozen=True)
class Kind:
    model: type[Resource]
    """The resource model: KIND, PLURAL, SHORT_NAMES, INPUTS (accepted fromRun kinds), spec."""
    entry: tuple[str, ...]
    """The argv after the interpreter that runs one process of the stage (``--spec FILE`` follows)."""
    roles: RolesFn
    role_names: RoleNamesFn
    """The names :attr:`roles` returns, without building them (cheap; the operator calls it each pass)."""
    checkpoints: bool = False
    """The spec has ``checkpoint.uri`` (a default is filled in) and the trainer reports checkpoints."""
    produces_model: bool = False
    """The output is a model directory another kind's ``model`` may read (``fromRun``)."""
    printer_columns: tuple[Mapping[str, Any], ...] = ()
    """kubectl columns between Phase and Restarts."""
    results: tuple[tuple[str, str], ...] = ()
    """(results key, format) the summary and ``crucible status`` show, most telling first."""
    report_section: str | None = None
    """``module:function`` building this kind's section of the embedded report (imported when the
    report is written, so the control plane does not import it)."""
    rbac: tuple[Mapping[str, Any], ...] = ()
    """ClusterRole rules the operator needs for this kind beyond its own resource."""
    base_model_field: str | None = None
    """Dotted spec path that ``crucible run --base-model`` fills when the spec leaves it empty."""
    description: str = ""

    @property
    def name(self) -> str:
        return self.model.KIND

    @property
    def plural(self) -> str:
        return self.model.PLURAL

    @property
    def stage(self) -> str:
        """The stage name (the last word of a ``-m crucible.trainer STAGE`` entry)."""
        return self.entry[-1]


_KINDS: dict[str, Kind] = {}
MODELS: dict[str, type[Resource]] = {}
"""KIND -> model of every registered kind (kept in step with the registry; ``KIND_MODELS``)."""
_loaded: dict[str, bool] = {}


def register(kind: Kind) -> Kind:
    """Add a kind (registering the same model again is a no-op; another model of the same KIND is an error)."""
    existing = _KINDS.get(kind.name)
    if existing is not None:
        if existing.model is kind.model:
            return existing
        raise ValueError(f"kind {kind.name} is already registered by {existing.model.__module__}")
    if not kind.model.KIND or not kind.model.PLURAL:
        raise ValueError(f"{kind.model.__name__}: set KIND and PLURAL")
    _KINDS[kind.name] = kind
    MODELS[kind.name] = kind.model
    return kind


def kinds() -> list[Kind]:
    return list(_KINDS.values())


def kind_of(name: str) -> Kind:
    return _KINDS[name]


def training_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in _KINDS.values() if k.checkpoints)


def model_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in _KINDS.values() if k.produces_model)


def load_plugins() -> None:
    """Import the modules named in ``$CRUCIBLE_KINDS`` and the ``crucible.kinds`` entry points."""
    names = [n.strip() for n in os.environ.get(KINDS_ENV, "").split(",") if n.strip()]
    for name in names:
        if _loaded.get(name):
            continue
        _loaded[name] = True
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"{KINDS_ENV}: cannot import kind module {name!r}: {exc}; fix the name or "
                              "PYTHONPATH, or unset the variable") from exc
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"ep:{ep.value}"
        if not _loaded.get(key):
            _loaded[key] = True
            ep.load()


def unregister(name: str) -> None:
    """Remove a kind (tests that register a kind for one scenario clean up with this)."""
    _KINDS.pop(name, None)
    MODELS.pop(name, None)
