"""One reconcile pass of one run: fetch -> pure core -> apply -> one status write -> events.

    Reconciler(kube, config, metrics).reconcile(body) -> None

Fetch: the referenced runs (``fromRun``), the current attempt's Jobs (by their deterministic
names), its Pods (by labels) and their Nodes, and rank 0's ``/metrics``. Then the pure
functions: :func:`~crucible.operator.observe.observe_attempt`,
:func:`~crucible.core.failure.classify` (hang included), :func:`~crucible.core.decide.decide`,
:func:`~crucible.core.plan.plan` + :func:`~crucible.operator.render.render` when an attempt
starts, :func:`~crucible.core.status.next_status`. Apply the decision (create or delete the
attempt's objects — idempotently, so a restarted operator neither duplicates nor loses an
attempt), write the status once if it changed, and only then post events.

Stage results: when a run succeeds, ``status.results`` is the ``results`` object of the
trainer's ``_SUCCESS`` JSON, which the trainer also writes to the path in
``$CRUCIBLE_TERMINATION_LOG`` (the container's termination message, so no storage access is
needed); when the output is a local path the operator can read, ``<output>/_SUCCESS`` is read
as a fallback.
"""

from __future__ import annotations

import asyncio
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
from crucible.api.common import CheckpointRef, Progress, RunStatus
from crucible.api.validate import Problem, validate_document
from crucible.core import status as st
from crucible.core.decide import Decision, Dependency, Situation, decide
from crucible.core.failure import classify, is_hung
from crucible.core.plan import TRAINING_KINDS, LaunchPlan, PlanError, default_checkpoint_uri, plan, role_names
from crucible.operator import kube as k
from crucible.operator.metrics import OperatorMetrics
from crucible.operator.observe import AttemptView, observe_attempt
from crucible.operator.render import Rendered, RenderSettings, attempt_labels, child_name, job_name, render
from crucible.trainer.config.common import FailurePolicy

log = logging.getLogger("crucible.operator")
INVALID_SPEC = "InvalidSpec"


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


@dataclass(frozen=True)
class Scraped:
    """What rank 0's /metrics said, as status fields (all None when not read)."""

    progress: Progress | None = None
    checkpoint: CheckpointRef | None = None
    goodput: float | None = None
    spikes: int | None = None


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
            if phase in ("Running", "Restarting") or now - m.last_pass >= self.config.resync:
                out.append(m.body)
        return out

    def dependents(self, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Known runs waiting on this one (``fromRun``), to reconcile when it finishes."""
        kind, namespace, name = _key(body)
        out = []
        for (_, ns, _), m in list(self._runs.items()):
            if ns != namespace or m.body is None or m.parsed is None:
                continue
            if (m.body.get("status") or {}).get("phase") not in (None, "Pending", "Waiting"):
                continue
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
        """fetch -> classify -> decide -> act -> one status write -> events."""
        now = time.time()
        status = _status_of(body)
        resource, problems = self._parse(body, key)
        if resource is None:
            # the CRD schema and its CEL rules catch most of this at the API server already
            message = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
            decision = Decision("fail", INVALID_SPEC, message or "the resource does not validate")
            if status.phase != "Failed":
                await self._write(body, status, st.next_status(status, decision, now=now), decision, key)
            return
        if status.phase in ("Succeeded", "Failed"):
            self.metrics.set_phase(key, status.phase)  # finished: nothing to look at
            return
        # Inputs matter when an attempt starts (the first, a restart, a resume, a data stage).
        needs_inputs = status.phase != "Running" or resource.kind == "DataPipeline"
        deps = await self._dependencies(resource) if needs_inputs else ()
        roles = role_names(resource)
        if status.start_time is None and status.phase in ("Pending", "Waiting"):
            # Nothing was ever started for this run (starting records startTime), and starting
            # is idempotent: no need to look for an attempt.
            view = AttemptView("absent", next_role=roles[0])
        else:
            view = await self._observe(resource, status.attempt, roles)
        scraped = await self._scrape(resource, status, view, now)
        decision = decide(self._situation(resource, status, view, deps, scraped.progress, key, now))
        output_uri, results, decision = await self._act(resource, status, view, deps, decision, body)
        new = st.next_status(status, decision, now=now, generation=meta_generation(body), output_uri=output_uri,
                             results=results, progress=scraped.progress, last_checkpoint=scraped.checkpoint,
                             goodput=scraped.goodput)
        if scraped.spikes is not None:
            new.loss_spikes = scraped.spikes
        await self._write(body, status, new, decision, key)
        if scraped.spikes is not None and scraped.spikes > status.loss_spikes:
            await self._event(body, "Warning", "LossSpike",
                              f"{scraped.spikes - status.loss_spikes} loss spike(s) detected; rolled back to the "
                              f"last checkpoint (total {scraped.spikes})")

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

    def _situation(self, resource: Resource, status: RunStatus, view: AttemptView, deps: tuple[Dependency, ...],
                   progress: Progress | None, key: tuple[str, str, str], now: float) -> Situation:
        spec = resource.spec
        memory = self._memory(key)
        if progress is not None:
            memory.scraped_attempt = status.attempt
        policy = getattr(spec, "failure_policy", None) or FailurePolicy()
        hang_timeout = policy.hang_timeout_seconds if getattr(spec, "failure_policy", None) and spec.metrics.port else None
        # Only a run whose metrics this operator has read in this attempt can be called hung:
        # an unreachable endpoint (a NetworkPolicy, a slow start) must not restart every run.
        hung = (view.state == "running" and status.phase == "Running" and memory.scraped_attempt == status.attempt
                and is_hung(last_progress=st.parse_time((progress or status.progress).updated_at), now=now,
                            hang_timeout_seconds=hang_timeout))
        failure = classify(view.ends, hung=hung,
                           hang_message=f"no step progress for {policy.hang_timeout} (failurePolicy.hangTimeout)")
        return Situation(status=status, now=now, attempt_state=view.state, policy=policy,
                         suspend=spec.suspend, dependencies=deps, failure=failure)

    async def _act(self, resource: Resource, status: RunStatus, view: AttemptView, deps: tuple[Dependency, ...],
                   decision: Decision, body: Mapping[str, Any]
                   ) -> tuple[str | None, dict[str, Any] | None, Decision]:
        """Apply a decision; (output URI of a started attempt, stage results, the decision as applied)."""
        output_uri = None
        results = None
        if decision.action == "start":
            try:
                output_uri = await self._start(resource, status, decision, body)
            except PlanError as exc:
                decision = Decision("fail", "PlanError", str(exc))
        elif decision.action in ("restart", "suspend"):
            await self._delete_attempt(resource, status.attempt)
        elif decision.action == "succeed":
            results = _results(view, status.output_uri)
        elif decision.action == "wait" and view.next_role is not None and view.state == "running":
            await self._start_role(resource, status, deps, body, view.next_role)
        if decision.action == "wait" and view.state in ("pending", "running"):
            await self._ensure_children(resource, status, body, deps)
        return output_uri, results, decision

    async def _write(self, body: Mapping[str, Any], old: RunStatus, new: RunStatus, decision: Decision,
                     key: tuple[str, str, str]) -> None:
        kind, ns, name = key
        patch = st.status_patch(old, new)
        if patch is not None:
            old_wire = old.model_dump(mode="json", by_alias=True, exclude_none=True)
            for removed in set(old_wire) - set(patch):
                patch[removed] = None
            version = body["metadata"].get("resourceVersion")
            try:
                fresh = await self.kube.patch_status(cr_res(kind), ns, name, patch, resource_version=version)
            except k.ApiError as exc:
                if exc.status != 409:
                    raise
                # Someone (a newer watch event, a user) changed the run since this pass read it:
                # drop this pass's status, take the current object, and let the next pass decide.
                current = await self.kube.get(cr_res(kind), ns, name)
                if current is not None:
                    self._memory(key).body = current
                log.info("%s %s/%s changed during the pass; status write skipped", kind, ns, name)
                return
            if isinstance(fresh, dict) and fresh.get("metadata"):
                self._memory(key).body = fresh  # later passes start from what was just written
        # metrics and events only after the status write succeeded
        self.metrics.set_phase(key, new.phase)
        if new.goodput is not None:
            self.metrics.goodput.labels(*key).set(new.goodput)
        if old.phase != "Running" and new.phase == "Running" and not self._memory(key).seen_running:
            self._memory(key).seen_running = True
            created = body["metadata"].get("creationTimestamp")
            if created and old.restarts == 0 and old.phase != "Suspended":
                t0 = _parse_k8s_time(created)
                if t0 is not None:
                    self.metrics.time_to_running.labels(kind).observe(max(0.0, time.time() - t0))
        if decision.action == "restart":
            self.metrics.restarts.labels(kind, decision.reason).inc()
        await self._events_for(body, old, new, decision)

    async def _events_for(self, body: Mapping[str, Any], old: RunStatus, new: RunStatus, d: Decision) -> None:
        if d.action == "start":
            await self._event(body, "Normal", "AttemptStarted",
                              f"attempt {d.attempt} started" + (f", excluding nodes {', '.join(d.excluded_nodes)}"
                                                                if d.excluded_nodes else ""))
        elif d.action == "restart":
            await self._event(body, "Warning", d.reason,
                              f"{d.message}; restart {new.restarts} as attempt {d.attempt} in {d.delay_seconds:.0f}s")
        elif d.action == "fail":
            await self._event(body, "Warning", d.reason, d.message)
        elif d.action == "succeed":
            await self._event(body, "Normal", "Succeeded", f"output at {new.output_uri}")
        elif d.action == "suspend":
            await self._event(body, "Normal", "Suspended", d.message)
        elif old.phase != new.phase and new.phase == "Running":
            await self._event(body, "Normal", "Running", d.message)

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await self.kube.event(body, type_, reason, message, st.rfc3339(time.time()))

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

    async def _scrape(self, resource: Resource, status: RunStatus, view: AttemptView, now: float) -> Scraped:
        metrics_cfg = getattr(resource.spec, "metrics", None)
        if view.state != "running" or not view.rank0_ip or metrics_cfg is None or not metrics_cfg.port:
            return Scraped()
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.scrape_timeout))
        try:
            async with self._http.get(f"http://{view.rank0_ip}:{metrics_cfg.port}/metrics") as resp:
                if resp.status != 200:
                    return Scraped()
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return Scraped()
        samples = st.parse_prometheus(text)
        training = getattr(resource.spec, "training", None)
        progress = st.progress_from_metrics(samples, previous=status.progress,
                                            total_steps=training.max_steps if training is not None else None, now=now)
        checkpoint = None
        ckpt_step = samples.get(st.M_CKPT_STEP)
        if ckpt_step is not None and ckpt_step > 0 and resource.kind in TRAINING_KINDS:
            root = resource.spec.checkpoint.uri or default_checkpoint_uri(
                self.config.storage_root, resource.metadata.namespace or "default", resource.kind, resource.name)
            step = int(ckpt_step)
            same = status.last_checkpoint is not None and status.last_checkpoint.step == step
            checkpoint = status.last_checkpoint if same else CheckpointRef(
                step=step, uri=f"{root.rstrip('/')}/step-{step:09d}", time=st.rfc3339(now))
        goodput = None
        started = st.parse_time(status.start_time)
        if progress.tokens and progress.tokens_per_second and started is not None:
            goodput = st.goodput(progress.tokens / progress.tokens_per_second, now - started)
        spikes_f = samples.get(st.M_SPIKES)
        spikes = max(int(spikes_f), status.loss_spikes) if spikes_f is not None else None
        return Scraped(progress, checkpoint, goodput, spikes)

    # -- act ------------------------------------------------------------------------------

    def _plan(self, resource: Resource, status: RunStatus, attempt: int, excluded: tuple[str, ...],
              inputs: Mapping[str, str], now: float) -> LaunchPlan:
        return plan(resource, storage_root=self.config.storage_root, attempt=attempt, restarts=status.restarts,
                    excluded_nodes=excluded, inputs=inputs, run_started=st.parse_time(status.start_time) or now)

    def _render(self, resource: Resource, p: LaunchPlan, body: Mapping[str, Any]) -> Rendered:
        rendered = render(resource, p, settings=self.config.render, uid=body["metadata"].get("uid"))
        secret = self.config.default_credentials_secret
        if secret and not p.credentials_secret:
            for job in rendered.jobs:
                env = job["spec"]["template"]["spec"]["containers"][0]["env"]
                env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        return rendered

    async def _start(self, resource: Resource, status: RunStatus, d: Decision, body: Mapping[str, Any]) -> str:
        p = self._plan(resource, status, d.attempt, d.excluded_nodes, d.inputs, time.time())
        rendered = self._render(resource, p, body)
        # A gang scheduler must know the PodGroup before it sees pods; the rest goes in one
        # round trip. The kubelet waits for a ConfigMap volume that is not there yet, and
        # _ensure_children completes an attempt whose creation a crash cut short.
        if rendered.pod_group is not None:
            await self.kube.create(rendered.pod_group)
        others = [o for o in (rendered.config_map, rendered.service) if o is not None]
        await asyncio.gather(*(self.kube.create(o) for o in [rendered.jobs[0], *others]))
        self._memory(_key(body)).ensured_attempt = d.attempt
        return p.output_uri

    async def _ensure_children(self, resource: Resource, status: RunStatus, body: Mapping[str, Any],
                               deps: tuple[Dependency, ...]) -> None:
        """Once per attempt and operator lifetime: the attempt's ConfigMap, Service and PodGroup
        exist (creates are idempotent), in case an earlier operator died between creates."""
        memory = self._memory(_key(body))
        if memory.ensured_attempt == status.attempt:
            return
        inputs = {d.path: d.output_uri for d in deps if d.output_uri}
        try:
            p = self._plan(resource, status, status.attempt, tuple(status.failed_nodes), inputs, time.time())
        except PlanError:
            # inputs are not fetched for a Running run, whose pods mounted the spec already;
            # the next attempt creates everything anew
            memory.ensured_attempt = status.attempt
            return
        rendered = self._render(resource, p, body)
        await asyncio.gather(*(self.kube.create(o) for o in rendered.objects() if o["kind"] != "Job"))
        memory.ensured_attempt = status.attempt

    async def _start_role(self, resource: Resource, status: RunStatus, deps: tuple[Dependency, ...],
                          body: Mapping[str, Any], role: str) -> None:
        inputs = {d.path: d.output_uri for d in deps if d.output_uri}
        p = self._plan(resource, status, status.attempt, tuple(status.failed_nodes), inputs, time.time())
        rendered = self._render(resource, p, body)
        job = next(j for j, r in zip(rendered.jobs, p.roles, strict=True) if r.name == role)
        await self.kube.create(job)

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
