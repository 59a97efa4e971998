"""Plan: turn one resource into what must run for one attempt (pure, shared by both backends).

    plan(resource, *, storage_root, attempt=0, restarts=0, excluded_nodes=(), inputs={},
         run_started=None, spec_path=SPEC_PATH) -> LaunchPlan

``inputs`` maps the dotted spec path of every ``fromRun`` (``"data"``, ``"model"``,
``"model.source"``, ``"tokenizer.source"``, ``"evaluation.data"`` — see
:func:`required_inputs`) to the ``status.outputURI`` of the referenced run, which must have
Succeeded; the backend resolves them (:class:`MissingInputError` names any it forgot).

The :class:`LaunchPlan` says, backend-neutrally:

* ``roles``: what runs, in order, as the kind declares them (``Kind.roles`` in the kind's
  module, :mod:`crucible.api.registry`). A training stage has one role ``trainer`` with
  ``nodes`` replicas and ``procs_per_node`` processes each; a DataPipeline with N workers three
  roles ``filter``, ``dedup``, ``tokenize`` run one after the other, each with N workers that
  get ``--shard I --num-shards N`` (the Kubernetes backend substitutes
  ``$(JOB_COMPLETION_INDEX)`` for I: see :data:`SHARD_PLACEHOLDER`).
* ``command``: the per-process argv (``python`` + the kind's entry, ``-m crucible.trainer STAGE``,
  + ``--spec FILE ...``).
  Backends launch ``procs_per_node`` of them per replica — torchrun on Kubernetes, the local
  supervisor in embedded mode — and set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/... themselves.
* ``env``: the CRUCIBLE_* contract variables and the user's ``resources.env``.
* ``spec``: the JSON the trainer reads, with every ``fromRun`` replaced by ``uri`` and
  ``output.uri`` (and ``checkpoint.uri`` for training stages) filled in.
* ``output_uri`` / ``checkpoint_uri``: ``spec.output.uri`` if the user set one, else
  ``<storage_root>/<namespace>/<kind-lower>/<name>/output`` (and ``.../checkpoints``).

Nothing here imports kopf, Kubernetes clients or torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crucible.api.common import Resource
from crucible.api.registry import SHARD_PLACEHOLDER, Kind, Role, kind_of, kinds
from crucible.trainer.config.common import RunRef

__all__ = ["SHARD_PLACEHOLDER", "SPEC_PATH", "LaunchPlan", "MissingInputError", "PlanError", "Role", "plan",
           "role_names"]

SPEC_PATH = "/etc/crucible/spec.json"
"""Where the spec JSON is mounted in pods (the Kubernetes backend's ConfigMap)."""

DEFAULT_NAMESPACE = "default"

# The contract environment (DESIGN.md, "Env set by both backends").
ENV_RUN = "CRUCIBLE_RUN"
ENV_KIND = "CRUCIBLE_KIND"
ENV_ATTEMPT = "CRUCIBLE_ATTEMPT"
ENV_RESTARTS = "CRUCIBLE_RESTARTS"
ENV_RUN_STARTED = "CRUCIBLE_RUN_STARTED"
ENV_METRICS_PORT = "CRUCIBLE_METRICS_PORT"


class PlanError(ValueError):
    """The resource cannot be planned; the message names the field and the fix."""


class MissingInputError(PlanError):
    """A ``fromRun`` input has no resolved URI."""

    def __init__(self, kind: str, name: str, path: str, ref: RunRef) -> None:
        self.path = path
        self.ref = ref
        super().__init__(
            f"{kind} {name}: spec.{path}.fromRun ({ref.kind} {ref.name}) has no output yet; "
            f"wait until {ref.kind} {ref.name} has Succeeded, or set spec.{path}.uri instead"
        )


@dataclass(frozen=True)
class LaunchPlan:
    kind: str
    name: str
    namespace: str
    stage: str
    attempt: int
    roles: tuple[Role, ...]
    env: Mapping[str, str]
    spec: Mapping[str, Any]
    output_uri: str
    checkpoint_uri: str | None
    excluded_nodes: tuple[str, ...] = ()
    metrics_port: int = 0
    hang_timeout_seconds: int | None = None
    credentials_secret: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Environment variable -> (Secret name, key): rendered as secretKeyRef, never as a value."""

    @property
    def nodes(self) -> int:
        return max(r.replicas for r in self.roles)


def storage_prefix(storage_root: str, namespace: str, kind: str, name: str) -> str:
    """``<root>/<namespace>/<kind-lower>/<name>`` for a local path or an ``s3://`` root."""
    if not storage_root:
        raise PlanError("the storage root is empty; pass --storage-root (or CRUCIBLE_STORAGE_ROOT)")
    return f"{storage_root.rstrip('/')}/{namespace}/{kind.lower()}/{name}"


def default_output_uri(storage_root: str, namespace: str, kind: str, name: str) -> str:
    return f"{storage_prefix(storage_root, namespace, kind, name)}/output"


def default_checkpoint_uri(storage_root: str, namespace: str, kind: str, name: str) -> str:
    return f"{storage_prefix(storage_root, namespace, kind, name)}/checkpoints"


def required_inputs(resource: Resource) -> dict[str, RunRef]:
    """The ``fromRun`` references of a resource by dotted spec path (camelCase)."""
    return resource.input_refs()


def resolve_spec(resource: Resource, inputs: Mapping[str, str]) -> dict[str, Any]:
    """The spec's wire JSON with every ``fromRun`` replaced by ``{"uri": inputs[path]}``."""
    spec = resource.spec.to_wire()  # a fresh dict: the resource is never modified
    for path, ref in required_inputs(resource).items():
        uri = inputs.get(path)
        if not uri:
            raise MissingInputError(resource.kind, resource.name, path, ref)
        parent: Any = spec
        *head, last = path.split(".")
        for part in head:
            parent = parent[part]
        # keep the node's other fields (a dataset's promptField, validationFraction, ...)
        parent[last] = {**{k: v for k, v in parent[last].items() if k != "fromRun"}, "uri": uri}
    return spec


def plan(
    resource: Resource,
    *,
    storage_root: str,
    attempt: int = 0,
    restarts: int = 0,
    excluded_nodes: Iterable[str] = (),
    inputs: Mapping[str, str] | None = None,
    run_started: float | None = None,
    spec_path: str = SPEC_PATH,
    python: str = "python",
) -> LaunchPlan:
    """What attempt ``attempt`` of ``resource`` runs. Pure; raises :class:`PlanError`."""
    kind = resource.kind
    spec_of_kind = _kind(kind)
    stage = spec_of_kind.stage
    name = resource.name
    namespace = resource.metadata.namespace or DEFAULT_NAMESPACE
    spec_model = resource.spec
    spec = resolve_spec(resource, inputs or {})

    output_uri = spec_model.output.uri or default_output_uri(storage_root, namespace, kind, name)
    spec.setdefault("output", {})["uri"] = output_uri
    checkpoint_uri: str | None = None
    if spec_of_kind.checkpoints:
        checkpoint_uri = spec_model.checkpoint.uri or default_checkpoint_uri(storage_root, namespace, kind, name)
        spec.setdefault("checkpoint", {})["uri"] = checkpoint_uri

    res = spec_model.resources
    base = (python, *spec_of_kind.entry, "--spec", spec_path)
    roles = spec_of_kind.roles(resource, base)

    metrics = getattr(spec_model, "metrics", None)
    metrics_port = metrics.port if metrics is not None else 0
    policy = getattr(spec_model, "failure_policy", None)
    storage = getattr(spec_model, "storage", None)
    s3 = storage.s3 if storage is not None else None
    env = {
        **res.env,
        ENV_RUN: name,
        ENV_KIND: kind,
        ENV_ATTEMPT: str(attempt),
        ENV_RESTARTS: str(restarts),
    }
    if run_started is not None:
        env[ENV_RUN_STARTED] = str(int(run_started))
    if metrics is not None:
        env[ENV_METRICS_PORT] = str(metrics_port)
    if s3 is not None and s3.endpoint_url:
        env["AWS_ENDPOINT_URL"] = s3.endpoint_url
    if s3 is not None and s3.region:
        env["AWS_DEFAULT_REGION"] = s3.region

    return LaunchPlan(
        kind=kind,
        name=name,
        namespace=namespace,
        stage=stage,
        attempt=attempt,
        roles=roles,
        env=env,
        spec=spec,
        output_uri=output_uri,
        checkpoint_uri=checkpoint_uri,
        excluded_nodes=tuple(sorted(set(excluded_nodes))),
        metrics_port=metrics_port,
        hang_timeout_seconds=policy.hang_timeout_seconds if policy is not None else None,
        credentials_secret=s3.credentials_secret if s3 is not None else None,
        inputs=dict(inputs or {}),
        secret_env={k: (ref.secret, ref.key) for k, ref in sorted(res.secret_env.items())},
    )


def role_names(resource: Resource) -> tuple[str, ...]:
    """The names of the roles :func:`plan` returns, in order, without planning (cheap)."""
    return _kind(resource.kind).role_names(resource)


def _kind(name: str) -> Kind:
    try:
        return kind_of(name)
    except KeyError:
        known = ", ".join(k.name for k in kinds())
        raise PlanError(f"kind {name!r} is not a registered Crucible kind; expected one of {known}") from None
