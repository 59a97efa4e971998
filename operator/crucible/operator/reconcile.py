"""The Kubernetes backend: one reconcile pass of one run is the core's pass with a KubeBackend.

    Reconciler(kube, config, metrics).reconcile(body) -> None
    KubeBackend(reconciler, body, key)     # crucible.core.reconcile.Backend

:func:`crucible.core.reconcile.run_pass` does observe -> :func:`~crucible.core.reconcile.reconcile`
(pure: progress, hang, failure, decision, plan, next status, events) -> act -> one status
write -> events. This module supplies the Kubernetes half: observe fetches the referenced runs
(``fromRun``), the current attempt's Jobs (by their deterministic names), its Pods (by labels)
and their Nodes, and rank 0's ``/metrics``, and reads them with
:func:`~crucible.operator.observe.observe_attempt`; act renders the plan
(:func:`~crucible.operator.render.render`) and creates or deletes the attempt's objects —
idempotently, so a restarted operator neither duplicates nor loses an attempt. ``self.kube``
is a small client interface (get, list, create, delete, patch_status, event), whichever HTTP
library implements it.

Stage results: when a run succeeds, ``status.results`` is the ``results`` object of the
trainer's ``_SUCCESS`` JSON, which the trainer also writes to the path in
``$CRUCIBLE_TERMINATION_LOG`` (the container's termination message, so no storage access is
needed); when the output is a local path the operator can read, ``<output>/_SUCCESS`` is read
as a fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from crucible.api import GROUP, KIND_MODELS, VERSION, Resource
from crucible.api.common import RunStatus
from crucible.api.validate import Problem, validate_document
from crucible.core import revisions as revs
from crucible.core import status as st
from crucible.core.decide import Dependency
from crucible.core.plan import LaunchPlan, role_names
from crucible.core.reconcile import (
    INVALID_SPEC,
    AttemptObservation,
    EnsureAttempt,
    Observed,
    Settings,
    Step,
    StopAttempt,
    reject,
    run_pass,
)
from crucible.core.schedule import due
from crucible.core.status import MetricsSample
from crucible.core.transitions import Decision, Event, Transition
from crucible.operator import kube as k
from crucible.operator.metrics import OperatorMetrics
from crucible.operator.observe import AttemptView, observe_attempt
from crucible.operator.render import Rendered, RenderSettings, attempt_labels, child_name, job_name, render

log = logging.getLogger("crucible.operator")
__all__ = ["INVALID_SPEC", "KubeBackend", "OperatorConfig", "Reconciler"]


@dataclass(frozen=True)
class OperatorConfig:
    storage_root: str = "s3://crucible"
    render: RenderSettings = field(default_factory=RenderSettings)
    interval: float = 5.0
    resync: float = 60.0
    scrape_timeout: float = 2.0
    default_credentials_secret: str | None = None
    user_agent: str = "crucible-operator"
    """Sent with every API request; add the replica (``crucible-operator/<pod>``) to tell replicas apart."""


def cr_res(kind: str) -> k.Res:
    return k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL)


@dataclass
class _RunMemory:
    """Per-run soft state: only caches; the truth is in the resources."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seen_running: bool = False
    scraped_attempt: int | None = None
    body: Mapping[str, Any] | None = None
    last_pass: float = 0.0
    parsed: tuple[int | None, Resource] | None = None
    ensured_attempt: int | None = None


class Reconciler:
    def __init__(self, kube: k.Kube, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self._runs: dict[tuple[str, str, str], _RunMemory] = {}
        self._gone: set[str] = set()  # uids of deleted runs
        self._http: aiohttp.ClientSession | None = None
        self.settings = Settings(storage_root=config.storage_root)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _memory(self, key: tuple[str, str, str]) -> _RunMemory:
        return self._runs.setdefault(key, _RunMemory())

    def remember(self, body: Mapping[str, Any]) -> None:
        """Keep the latest body of a run (from the watch) for the periodic passes."""
        self._memory(_key(body)).body = body

    def due(self, now: float) -> list[Mapping[str, Any]]:
        """Runs the ticker should look at now (monotonic ``now``).

        Running and Restarting runs every tick (pods, nodes, metrics, hang, backoff); every other
        run only once per ``config.resync`` seconds: their Jobs' watch events (:meth:`poke`)
        and their inputs finishing (:meth:`dependents`) wake them, this is the safety net.
        """
        out = []
        for m in list(self._runs.values()):
            if m.body is None or m.lock.locked():
                continue
            phase = (m.body.get("status") or {}).get("phase")
            if (phase in ("Running", "Restarting") or now - m.last_pass >= self.config.resync
                    or self._schedule_fired(m)):
                out.append(m.body)
        return out

    @staticmethod
    def _schedule_fired(m: _RunMemory) -> bool:
        """A finished run whose spec.revisions.schedule fired since its last revision (the cron of revisions)."""
        if m.parsed is None:
            return False
        schedule = getattr(getattr(m.parsed[1].spec, "revisions", None), "schedule", None)
        status = m.body.get("status") or {} if m.body is not None else {}
        if not schedule or status.get("phase") not in ("Succeeded", "Failed") or not status.get("revisions"):
            return False
        return due(schedule, st.parse_time(status["revisions"][-1].get("finishedAt")), time.time())

    def dependents(self, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Known runs waiting on this one (``fromRun``), to reconcile when it finishes."""
        kind, namespace, name = _key(body)
        out = []
        for (_, ns, _), m in list(self._runs.items()):
            if ns != namespace or m.body is None or m.parsed is None:
                continue
            phase = (m.body.get("status") or {}).get("phase")
            if phase not in (None, "Pending", "Waiting") and not (phase == "Succeeded" and revs.enabled(m.parsed[1])):
                continue  # a finished run with spec.revisions looks for a new revision of its input
            if any((ref.kind, ref.name) == (kind, name) for ref in m.parsed[1].input_refs().values()):
                out.append(m.body)
        return out

    def poke(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        """A child of this run changed: the body to reconcile now, if the run is known."""
        memory = self._runs.get((kind, namespace, name))
        return memory.body if memory is not None else None

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        kind = body["kind"]
        key = _key(body)
        if body["metadata"].get("uid") in self._gone:
            return  # deleted while this pass was queued
        started = time.perf_counter()
        memory = self._memory(key)
        async with memory.lock:
            if memory.body is not None and _version(memory.body) > _version(body):
                body = memory.body  # a newer one arrived while this pass waited
            try:
                memory.last_pass = time.monotonic()
                await self._pass(body, key)
            finally:
                self.metrics.reconcile.labels(kind).observe(time.perf_counter() - started)

    async def forget(self, body: Mapping[str, Any]) -> None:
        """The run is being deleted: remove its current attempt now (owner references do the rest)."""
        key = _key(body)
        uid = body["metadata"].get("uid")
        if uid:
            self._gone.add(uid)
        status = _status_of(body)
        resource = _parse(body)
        if resource is not None:
            await self._delete_attempt(resource, status.attempt)
        self.metrics.forget(key)
        self._runs.pop(key, None)

    # -- the pass -------------------------------------------------------------------------

    async def _pass(self, body: Mapping[str, Any], key: tuple[str, str, str]) -> None:
        """The core's pass (:func:`crucible.core.reconcile.run_pass`) with this backend."""
        now = time.time()
        status = _status_of(body)
        resource, problems = self._parse(body, key)
        backend = KubeBackend(self, body, key)
        if resource is None:
            # the CRD schema and its CEL rules catch most of this at the API server already
            message = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
            step = reject(status, message, now)
            if step.status is not status:
                await backend.write(status, step.status, step)
                for event in step.events:
                    await backend.emit_event(None, event)
            return
        if status.phase in ("Succeeded", "Failed"):
            started = await self._next_revision(resource, status, backend, now) if revs.enabled(resource) else None
            if started is None:
                self.metrics.set_phase(key, status.phase)  # finished: nothing to look at
                return
            status, backend = started, KubeBackend(self, self._memory(key).body or body, key)
        step = await run_pass(backend, revs.for_revision(resource, status, self.settings.storage_root), status, now,
                              settings=self.settings)
        written = ((self._memory(key).body or {}).get("status") or {}).get("phase") == "Succeeded"
        if revs.enabled(resource) and step.decision.transition is Transition.SUCCEED and written:
            logged = revs.record(resource, step.status, _receipt_sha256(step.status.output_uri), now)
            if logged != step.status:  # the revision that just finished, in status.revisions
                await KubeBackend(self, self._memory(key).body or body, key).write(
                    step.status, logged, Step(Decision(Transition.FINISHED, attempt=logged.attempt), logged))

    async def _next_revision(self, resource: Resource, status: RunStatus, backend: KubeBackend, now: float
                             ) -> RunStatus | None:
        """spec.revisions of a finished run: log the revision that finished, and start the next one when
        it is due (a DataPipeline's schedule fired; a PretrainRun's DataPipeline has a new manifest).
        Returns the status the next revision starts from (already written), else None."""
        logged = revs.record(resource, status, _receipt_sha256(status.output_uri), now)
        go, why = revs.next_revision(resource, logged, now, await self._revision_input_changed(resource, logged))
        new = revs.start(logged) if go else logged
        if go:
            new.message = f"revision {new.revision}: {_revision_reason(resource)}"
        elif why and logged.message != why and logged.phase == "Succeeded":
            new = logged.model_copy(update={"message": why})
        if new == status:
            return None
        written = await backend.write(status, new, Step(Decision(Transition.FINISHED, attempt=status.attempt), new))
        return new if go and written else None

    async def _revision_input_changed(self, resource: Resource, status: RunStatus) -> bool:
        if resource.kind == "DataPipeline" or revs.follows_dataset(resource):
            # the sources (the dataset) are read again at each fire time
            return bool(getattr(resource.spec.revisions, "schedule", None))
        ref = resource.input_refs().get("model" if revs.follows_model(resource) else "data")
        if ref is None or not status.revisions:
            return False
        obj = await self.kube.get(cr_res(ref.kind), resource.metadata.namespace, ref.name)
        upstream = (obj or {}).get("status") or {}
        if upstream.get("phase") != "Succeeded":
            return False
        if revs.follows_model(resource):  # a base model revision it has not fine-tuned
            return bool(upstream.get("outputURI")) and upstream["outputURI"] != status.revisions[-1].model_uri
        manifest = (upstream.get("results") or {}).get("manifestSha256")
        return bool(manifest) and manifest != status.revisions[-1].data_manifest_sha256

    def _parse(self, body: Mapping[str, Any], key: tuple[str, str, str]) -> tuple[Resource | None, list[Problem]]:
        """The typed resource, validated once per generation (the spec changes only with it)."""
        memory = self._memory(key)
        generation = body["metadata"].get("generation")
        if memory.parsed is not None and generation is not None and memory.parsed[0] == generation:
            return memory.parsed[1], []
        doc = {k_: body[k_] for k_ in ("apiVersion", "kind", "metadata", "spec")}
        parsed, problems = validate_document(doc, "/".join(key), 0, 0)
        if parsed is not None:
            memory.parsed = (generation, parsed)
        return parsed, problems

    # -- fetch ----------------------------------------------------------------------------

    async def _dependencies(self, resource: Resource) -> tuple[Dependency, ...]:
        out = []
        for path, ref in resource.input_refs().items():
            obj = await self.kube.get(cr_res(ref.kind), resource.metadata.namespace, ref.name)
            if obj is None:
                out.append(Dependency(path, ref.kind, ref.name, None))
                continue
            s = obj.get("status") or {}
            out.append(Dependency(path, ref.kind, ref.name, s.get("phase") or "Pending", s.get("outputURI"),
                                  s.get("message")))
        return tuple(out)

    async def _observe(self, resource: Resource, attempt: int, roles: tuple[str, ...]) -> AttemptView:
        ns = resource.metadata.namespace
        jobs = []
        for role in roles:
            job = await self.kube.get(k.JOBS, ns, job_name(resource.name, attempt, role))
            if job is not None and job.get("metadata", {}).get("deletionTimestamp") is None:
                jobs.append(job)
        pods: list[dict[str, Any]] = []
        nodes: dict[str, dict[str, Any] | None] = {}
        # A Job whose controller reports no pods yet needs no pod listing (the common case for
        # queued work: the pass is then one GET per role).
        if any(job_has_pods(j) for j in jobs):
            pods = await self.kube.list(k.PODS, ns, attempt_labels(resource.kind, resource.name, attempt))
            for name in {p.get("spec", {}).get("nodeName") for p in pods} - {None}:
                nodes[name] = await self.kube.get(k.NODES, None, name)
        return observe_attempt(jobs, pods, nodes, roles=roles)

    async def _scrape(self, resource: Resource, view: AttemptView) -> MetricsSample | None:
        metrics_cfg = getattr(resource.spec, "metrics", None)
        if view.state != "running" or not view.rank0_ip or metrics_cfg is None or not metrics_cfg.port:
            return None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.scrape_timeout))
        try:
            async with self._http.get(f"http://{view.rank0_ip}:{metrics_cfg.port}/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return MetricsSample.from_prometheus(st.parse_prometheus(text))

    # -- act ------------------------------------------------------------------------------

    def _render(self, resource: Resource, p: LaunchPlan, body: Mapping[str, Any]) -> Rendered:
        rendered = render(resource, p, settings=self.config.render, uid=body["metadata"].get("uid"))
        secret = self.config.default_credentials_secret
        if secret and not p.credentials_secret:
            for job in rendered.jobs:
                env = job["spec"]["template"]["spec"]["containers"][0]["env"]
                env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        return rendered

    async def _delete_attempt(self, resource: Resource, attempt: int) -> None:
        ns, name = resource.metadata.namespace, resource.name
        for role in role_names(resource):
            await self.kube.delete(k.JOBS, ns, job_name(name, attempt, role))
        await self.kube.delete(k.SERVICES, ns, child_name(name, attempt))
        await self.kube.delete(k.CONFIGMAPS, ns, child_name(name, attempt, "spec"))
        gang = resource.spec.scheduling.gang
        if gang == "volcano":
            await self.kube.delete(k.VOLCANO_PODGROUPS, ns, child_name(name, attempt))
        elif gang == "coscheduling":
            await self.kube.delete(k.COSCHEDULING_PODGROUPS, ns, child_name(name, attempt))


class KubeBackend:
    """The Kubernetes side of one pass (:class:`crucible.core.reconcile.Backend`): Jobs, Pods,
    Nodes and rank 0's ``/metrics`` in; Jobs, ConfigMaps, Services, PodGroups, the status
    subresource and Events out."""

    def __init__(self, reconciler: Reconciler, body: Mapping[str, Any], key: tuple[str, str, str]) -> None:
        self.r = reconciler
        self.kube = reconciler.kube
        self.body = body
        self.key = key
        self.memory = reconciler._memory(key)

    async def observe(self, run: Resource, status: RunStatus) -> Observed:
        roles = role_names(run)
        # Inputs matter when an attempt starts (the first, a restart, a resume, a next role).
        needs_inputs = status.phase != "Running" or len(roles) > 1
        deps = await self.r._dependencies(run) if needs_inputs else ()
        if status.start_time is None and status.phase in ("Pending", "Waiting"):
            # Nothing was ever started for this run (starting records startTime), and starting
            # is idempotent: no need to look for an attempt.
            view = AttemptView("absent", next_role=roles[0])
        else:
            view = await self.r._observe(run, status.attempt, roles)
        sample = await self.r._scrape(run, view)
        if sample is not None:
            self.memory.scraped_attempt = status.attempt
        results = _results(view, status.output_uri) if view.state == "succeeded" else None
        return Observed(
            status=status,
            attempt=AttemptObservation(view.state, view.ends, view.next_role, results),
            dependencies=deps,
            metrics=sample,
            metrics_seen=self.memory.scraped_attempt == status.attempt,
            generation=meta_generation(self.body),
            children_ensured=self.memory.ensured_attempt == status.attempt,
        )

    async def start_attempt(self, run: Resource, plan: LaunchPlan) -> None:
        rendered = self.r._render(run, plan, self.body)
        # A gang scheduler must know the PodGroup before it sees pods; the rest goes in one
        # round trip. The kubelet waits for a ConfigMap volume that is not there yet, and
        # ensure_attempt completes an attempt whose creation a crash cut short.
        if rendered.pod_group is not None:
            await self.kube.create(rendered.pod_group)
        others = [o for o in (rendered.config_map, rendered.service) if o is not None]
        await asyncio.gather(*(self.kube.create(o) for o in [rendered.jobs[0], *others]))
        self.memory.ensured_attempt = plan.attempt

    async def start_role(self, run: Resource, plan: LaunchPlan, role: str) -> None:
        rendered = self.r._render(run, plan, self.body)
        job = next(j for j, r in zip(rendered.jobs, plan.roles, strict=True) if r.name == role)
        await self.kube.create(job)

    async def ensure_attempt(self, run: Resource, action: EnsureAttempt) -> None:
        """Once per attempt and operator lifetime: the attempt's ConfigMap, Service and PodGroup
        exist (creates are idempotent), in case an earlier operator died between creates."""
        if action.plan is not None:
            rendered = self.r._render(run, action.plan, self.body)
            await asyncio.gather(*(self.kube.create(o) for o in rendered.objects() if o["kind"] != "Job"))
        self.memory.ensured_attempt = action.attempt

    async def stop_attempt(self, run: Resource, action: StopAttempt) -> None:
        await self.r._delete_attempt(run, action.attempt)

    async def write_status(self, run: Resource, old: RunStatus, new: RunStatus, step: Step) -> bool:
        return await self.write(old, new, step)

    async def write(self, old: RunStatus, new: RunStatus, step: Step) -> bool:
        kind, ns, name = self.key
        patch = st.status_patch(old, new)
        if patch is not None:
            old_wire = old.model_dump(mode="json", by_alias=True, exclude_none=True)
            for removed in set(old_wire) - set(patch):
                patch[removed] = None
            version = self.body["metadata"].get("resourceVersion")
            try:
                fresh = await self.kube.patch_status(cr_res(kind), ns, name, patch, resource_version=version)
            except k.ApiError as exc:
                if exc.status != 409:
                    raise
                # Someone (a newer watch event, a user) changed the run since this pass read it:
                # drop this pass's status, take the current object, and let the next pass decide.
                current = await self.kube.get(cr_res(kind), ns, name)
                if current is not None:
                    self.memory.body = current
                log.info("%s %s/%s changed during the pass; status write skipped", kind, ns, name)
                return False
            if isinstance(fresh, dict) and fresh.get("metadata"):
                self.memory.body = fresh  # later passes start from what was just written
        # metrics (and then events) only after the status write succeeded
        metrics = self.r.metrics
        metrics.set_phase(self.key, new.phase)
        if new.goodput is not None:
            metrics.goodput.labels(*self.key).set(new.goodput)
        if old.phase != "Running" and new.phase == "Running" and not self.memory.seen_running:
            self.memory.seen_running = True
            created = self.body["metadata"].get("creationTimestamp")
            if created and old.restarts == 0 and old.phase != "Suspended":
                t0 = _parse_k8s_time(created)
                if t0 is not None:
                    metrics.time_to_running.labels(kind).observe(max(0.0, time.time() - t0))
        if step.decision.action == "restart":
            metrics.restarts.labels(kind, step.decision.reason).inc()
        return True

    async def emit_event(self, run: Resource | None, event: Event) -> None:
        await self.kube.event(self.body, event.type, event.reason, event.message, st.rfc3339(time.time()))


def _key(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return (body["kind"], meta.get("namespace") or "default", meta["name"])


def _version(body: Mapping[str, Any]) -> int:
    try:
        return int(body.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0  # resourceVersion is opaque in general; only numeric ones are compared


def job_has_pods(job: Mapping[str, Any]) -> bool:
    status = job.get("status") or {}
    return any(status.get(key) for key in ("active", "ready", "failed", "succeeded", "terminating")) \
        or bool(status.get("conditions"))


def meta_generation(body: Mapping[str, Any]) -> int | None:
    gen = body.get("metadata", {}).get("generation")
    return int(gen) if gen is not None else None


def _status_of(body: Mapping[str, Any]) -> RunStatus:
    raw = dict(body.get("status") or {})
    raw = {k_: v for k_, v in raw.items() if k_ in RunStatus.model_fields or
           k_ in {f.alias for f in RunStatus.model_fields.values() if f.alias}}
    try:
        return RunStatus.model_validate(raw)
    except ValidationError:
        log.warning("unreadable status of %s/%s; starting from an empty one",
                    body.get("kind"), body.get("metadata", {}).get("name"))
        return RunStatus()


def _parse(body: Mapping[str, Any]) -> Resource | None:
    try:
        return KIND_MODELS[body["kind"]].model_validate({k_: body[k_] for k_ in ("apiVersion", "kind", "metadata", "spec")})
    except ValidationError:
        return None


def _results(view: AttemptView, output_uri: str | None) -> dict[str, Any] | None:
    """``results`` of the ``_SUCCESS`` JSON: a line of rank 0's termination message, else the file."""
    for text in (view.termination_message, _read_local_success(output_uri)):
        candidates = [text, *text.splitlines()[::-1]] if text else []
        for candidate in candidates:
            try:
                doc = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("results"), dict):
                return doc["results"]
    return None


def _receipt_sha256(output_uri: str | None) -> str | None:
    """sha256 of a finished output's ``_SUCCESS`` when it is on a volume the operator sees (else None:
    the operator reads no bucket)."""
    text = _read_local_success(output_uri)
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _read_local_success(output_uri: str | None) -> str | None:
    if not output_uri or "://" in output_uri:
        return None
    path = Path(output_uri) / "_SUCCESS"
    try:
        return path.read_text()
    except OSError:
        return None


def _parse_k8s_time(text: str) -> float | None:
    try:
        return st.parse_time(text.replace(".000000", "").split(".")[0].rstrip("Z") + "Z")
    except ValueError:
        return None


def _revision_reason(resource: Resource) -> str:
    """Why the operator started a revision (status.message)."""
    if resource.kind == "DataPipeline" or revs.follows_dataset(resource):
        return "the schedule fired"
    return "a new base model" if revs.follows_model(resource) else "new data"
