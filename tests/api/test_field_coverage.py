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

Every field of every kind's spec model — the trainer's (``training``, ``model``, ``lossSpike``...,
the models of ``crucible/trainer/config/``) as much as the operator's (``crucible/api/``) — is
also proven read by code outside the models, by a static scan (:func:`unread_fields`):

* The consumers are every module of ``crucible`` except the model definitions themselves
  (``trainer/config/`` and ``api/``), whose validators read fields only to accept or refuse them.
* A field is read when a consumer loads the attribute (``cfg.max_rollbacks``), or uses its wire
  name or Python name as a key (``spec["maxSteps"]``, ``.get("maxSteps")``, ``getattr(x, "seed")``,
  ``"seed" in d``) — not in messages. A field read only by a property or method of its model (not
  a validator) is read when a consumer reads that property or method (``hang_timeout`` through
  ``hang_timeout_seconds``), transitively.
* What the scan cannot see is listed in :data:`METADATA` with the reason (fields that take effect
  in validation, like the data policy, or that only describe the resource).

A field added to any spec model and read by nothing outside the models fails
:func:`test_every_spec_field_is_read_outside_its_model` (and the placement test above, for the
placement roots); :func:`test_the_scan_flags_a_field_nothing_reads` proves that it can fail.
"""

from __future__ import annotations

import ast
import copy
import functools
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


# ------------------------------------------------------------------ every spec field (static scan)
REPO = Path(__file__).resolve().parents[2]
SOURCES = (REPO / "trainer" / "crucible", REPO / "operator" / "crucible")
DEFINITIONS = (REPO / "trainer" / "crucible" / "trainer" / "config", REPO / "operator" / "crucible" / "api")
"""Where the spec models live: reads there are validation, not use."""

METADATA: dict[str, str] = {
    "DataPolicy.require_license": "takes effect in validation: DataPipelineConfig._policy refuses a source "
                                  "without a licence (tests/data/test_source_receipts.py)",
    "DataPolicy.allowed_licenses": "takes effect in validation: DataPipelineConfig._policy refuses a source "
                                   "whose licence is not listed",
    "DataPolicy.require_consent": "takes effect in validation: DataPipelineConfig._policy refuses a source "
                                  "without a consent basis",
}
"""``Model.field`` that no consumer reads, and why that is right."""

_KEY_CALLS = frozenset({"get", "pop", "getattr", "hasattr", "setdefault"})


def spec_models() -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from a kind's ``spec``, by qualified name."""
    found: dict[str, type[BaseModel]] = {}

    def walk(model: type[BaseModel]) -> None:
        if found.get(model.__qualname__) is model:
            return
        found[model.__qualname__] = model
        for info in model.model_fields.values():
            for nested in models_in(info.annotation):
                walk(nested)

    for kind_model in KIND_MODELS.values():
        for nested in models_in(kind_model.model_fields["spec"].annotation):
            walk(nested)
    return found


def models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def _python_files(roots: Iterable[Path]) -> list[Path]:
    return sorted(f for root in roots for f in root.rglob("*.py"))


def _is_definition(path: Path) -> bool:
    return any(path.is_relative_to(d) for d in DEFINITIONS)


@functools.cache
def consumer_reads() -> frozenset[str]:
    """Attribute names loaded, and string keys used, by the consumer modules."""
    names: set[str] = set()
    for path in _python_files(SOURCES):
        if _is_definition(path):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                names.add(str(node.slice.value))
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called in _KEY_CALLS:
                    names.update(str(a.value) for a in node.args if isinstance(a, ast.Constant))
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and any(
                    isinstance(op, ast.In | ast.NotIn) for op in node.ops):
                names.add(str(node.left.value))
    return frozenset(names)


@functools.cache
def model_methods() -> dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]]:
    """class -> method/property -> (``self.`` attributes it reads, string keys it uses); validators left out."""
    out: dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]] = {}
    for path in _python_files(DEFINITIONS):
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(cls, ast.ClassDef):
                continue
            methods = out.setdefault(cls.name, {})
            for fn in cls.body:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or any(
                        "validator" in ast.unparse(d) for d in fn.decorator_list):
                    continue
                attrs = frozenset(n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                                  and isinstance(n.value, ast.Name) and n.value.id == "self")
                keys = frozenset(str(n.slice.value) for n in ast.walk(fn)
                                 if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)) | frozenset(
                    str(n.left.value) for n in ast.walk(fn) if isinstance(n, ast.Compare)
                    and isinstance(n.left, ast.Constant))
                methods[fn.name] = (attrs, keys)
    return out


def _read_through_methods(model: type[BaseModel], name: str, wire: str, reads: frozenset[str]) -> bool:
    """Whether a method/property of the model (or a base) that reads ``self.name``, or a method of any
    model class that reads the wire key (``Resource.input_refs`` and ``fromRun``), is itself read by a
    consumer — directly or through other methods of the model."""
    own: dict[str, frozenset[str]] = {}
    for base in reversed(model.__mro__):
        own.update({m: attrs for m, (attrs, _) in model_methods().get(base.__name__, {}).items()})
    wanted = {m for m, attrs in own.items() if name in attrs}
    wanted |= {m for methods in model_methods().values() for m, (_, keys) in methods.items() if wire in keys}
    seen: set[str] = set()
    while wanted:
        method = wanted.pop()
        if method in reads:
            return True
        seen.add(method)
        wanted |= {m for m, attrs in own.items() if method in attrs and m not in seen}
    return False


def unread_fields(models: dict[str, type[BaseModel]] | None = None,
                  reads: frozenset[str] | None = None) -> list[str]:
    """``Model.field (wireName)`` of every spec field no consumer reads and :data:`METADATA` does not explain."""
    models = spec_models() if models is None else models
    reads = consumer_reads() if reads is None else reads
    out = []
    for qualname, model in sorted(models.items()):
        for name, info in model.model_fields.items():
            wire = info.alias or name
            if f"{qualname}.{name}" in METADATA or name in reads or wire in reads:
                continue
            if _read_through_methods(model, name, wire, reads):
                continue
            out.append(f"{qualname}.{name} ({wire})")
    return out


def test_every_spec_field_is_read_outside_its_model() -> None:
    models = spec_models()
    assert {"TrainingConfig", "LossSpikeConfig", "LoraConfig", "Resources", "FailurePolicy"} <= set(models)
    assert sum(len(m.model_fields) for m in models.values()) > 300
    unread = unread_fields(models)
    assert not unread, ("spec fields nothing outside the models reads (make them take effect where the stage or "
                        "operator runs, refuse them, or list them in METADATA with why):\n" + "\n".join(unread))
    stale = [k for k in METADATA if k.split(".")[0] not in models or k.split(".")[1] not in
             models[k.split(".")[0]].model_fields]
    assert not stale, f"METADATA names fields that do not exist: {stale}"


def test_the_scan_flags_a_field_nothing_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added to a trainer model (here lossSpike) and read by nothing is reported; one that only a
    validator reads is reported too; one a consumer reads, or reads through a property, is not."""
    from crucible.trainer.config.common import FailurePolicy
    from crucible.trainer.config.training import LossSpikeConfig

    assert unread_fields({"LossSpikeConfig": LossSpikeConfig}) == []
    from pydantic.fields import FieldInfo

    fresh = FieldInfo(annotation=int, default=0, alias="dummyUnreadKnob", description="a knob nobody reads")
    monkeypatch.setitem(LossSpikeConfig.model_fields, "dummy_unread_knob", fresh)
    assert unread_fields({"LossSpikeConfig": LossSpikeConfig}) == ["LossSpikeConfig.dummy_unread_knob (dummyUnreadKnob)"]
    # the whole walk flags it too (the test above would fail)
    assert "LossSpikeConfig.dummy_unread_knob (dummyUnreadKnob)" in unread_fields()
    # an existing field whose only consumer read is taken away is flagged (the engine reads max_rollbacks)
    assert "LossSpikeConfig.max_rollbacks (maxRollbacks)" in unread_fields(
        {"LossSpikeConfig": LossSpikeConfig}, consumer_reads() - {"max_rollbacks", "maxRollbacks"})
    # read only by a validator of the model: still unread (validation is not use)
    assert "_hang_timeout" in ast.unparse(ast.parse((DEFINITIONS[0] / "common.py").read_text()))
    without_property = consumer_reads() - {"hang_timeout_seconds", "hang_timeout", "hangTimeout"}
    assert "FailurePolicy.hang_timeout (hangTimeout)" in unread_fields({"FailurePolicy": FailurePolicy},
                                                                      without_property)
    # read through a property a consumer reads (hang_timeout_seconds): covered
    assert "hang_timeout_seconds" in consumer_reads()
    assert "FailurePolicy.hang_timeout (hangTimeout)" not in unread_fields(
        {"FailurePolicy": FailurePolicy}, consumer_reads() - {"hang_timeout", "hangTimeout"})
