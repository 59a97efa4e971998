"""A simulated cluster for operator tests: KMock's KubernetesEmulator + a tiny Job controller,
scheduler, kubelet, garbage collector and fake trainers serving rank-0 metrics on loopback.

Everything goes through the emulator's HTTP API (so Kopf's watch streams see it), using the
operator's own small client. Faults are injected by the test: ``kill_node``, ``fail_rank``,
``hang``. The fake trainer advances ``steps_per_second`` (wall clock) while all its pods run on Ready
nodes, checkpoints every
``checkpoint_every`` steps, resumes a new attempt from the last checkpoint, and on the last
step exits 0 with the ``_SUCCESS`` JSON as its termination message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import yaml
from aiohttp import web
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, Server, action
from simkubelet import RealKubelet

from crucible.api import GROUP, KIND_MODELS, VERSION
from crucible.operator import kube as k
from crucible.operator.handlers import build_registry
from crucible.operator.metrics import OperatorMetrics
from crucible.operator.reconcile import OperatorConfig
from crucible.operator.render import JOB_INDEX_LABEL, KUEUE_QUEUE_LABEL, LABEL_ATTEMPT, LABEL_RUN
from waits import scaled

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "ml"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class Trainer:
    """The simulated state of one run's training, shared by its attempts."""

    total_steps: int
    port: int
    steps_per_second: float = 10.0
    checkpoint_every: int = 4
    last_tick: float | None = None
    step: int = 0
    checkpoint: int = 0
    tokens_per_step: int = 512
    hung: bool = False
    spikes: int = 0
    exit_at: tuple[int, int, str] | None = None  # (step, exit code, termination message)
    exits_left: int = 1  # how many attempts end through exit_at
    resumed_from: list[int] = field(default_factory=list)
    attempts_seen: list[int] = field(default_factory=list)
    results: Callable[[int], dict[str, Any]] | None = None  # more results of a successful attempt, by attempt


class RealisticEmulator(KubernetesEmulator):
    """KubernetesEmulator plus what an API server does that Kopf relies on: every write bumps
    metadata.resourceVersion (Kopf waits for its own patches to come back by version), and
    creation sets uid and creationTimestamp. The emulator also keeps every request and scans
    that log on each new one (quadratic over a test): here only requests in flight stay."""

    _versions = itertools.count(2)
    verbs_used: set[tuple[str, str, str, str]]  # (user agent, verb, group, resource[/sub])

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.resource.plural:
            self._record(request)
        try:
            if request.resource is not None and request.action in (action.CREATE, action.UPDATE):
                version = str(next(self._versions))
                if isinstance(request.data, dict):
                    meta = request.data.setdefault("metadata", {})
                    if request.action == action.UPDATE and meta.get("resourceVersion"):
                        self._check_precondition(request, meta["resourceVersion"])
                    meta["resourceVersion"] = version
                    if request.action == action.CREATE:
                        meta.setdefault("uid", str(uuid.uuid4()))
                        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                elif isinstance(request.data, list):
                    self._check_json_patch_tests(request)
                    request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            return await super()._handle(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)


    _indexed_len = -1
    _index: dict[tuple[Any, ...], Any]

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        """Objects by name or by kind+namespace from an index (the emulator scans every object
        of every kind on every request)."""
        res = request.resource
        if res is None or res.plural is None:
            return KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)  # type: ignore[attr-defined]
        objects = self._objects._objects
        if len(objects) != self._indexed_len:
            self._index = {}
            self._kinds: dict[tuple[Any, ...], list[Any]] = {}
            for (r, ns, name), obj in objects.items():
                self._index[(r.group, r.version, r.plural, ns, name)] = obj
                self._kinds.setdefault((r.group, r.version, r.plural), []).append((ns, obj))
            self._indexed_len = len(objects)
        if request.name is not None and (strict or request.namespace is not None):
            obj = self._index.get((res.group, res.version, res.plural, request.namespace, request.name))
            return [obj] if obj is not None else []
        if request.name is None:
            return [obj for ns, obj in self._kinds.get((res.group, res.version, res.plural), [])
                    if (ns == request.namespace if strict else request.namespace is None or ns == request.namespace)]
        return KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)  # type: ignore[attr-defined]

    def _check_precondition(self, request: Any, expected: str) -> None:
        """A write that names a resourceVersion applies only to that version (409 otherwise)."""
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            current = self._objects[key].get("metadata", {}).get("resourceVersion")
            if current != expected:
                raise KubernetesError(status=409, reason="Conflict",
                                      message=f"the object has been modified (resourceVersion {expected} != {current})")

    def _check_json_patch_tests(self, request: Any) -> None:
        """A failed JSON-patch ``test`` is 422 on a real API server (Kopf retries it next cycle)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return
        current = self._objects[key].get("metadata", {}).get("resourceVersion")
        for op in request.data:
            if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != current:
                raise KubernetesError(status=422, reason="Invalid",
                                      message=f"the test of resourceVersion {op.get('value')} failed: now {current}")

    def _record(self, request: Any) -> None:
        if not hasattr(self, "verbs_used"):
            self.verbs_used = set()
            self.writers: set[tuple[str, str, str]] = set()  # (user agent, verb, resource)
        method = str(request.method).rsplit(".", 1)[-1].upper()
        if method == "GET":
            verb = "watch" if request.params.get("watch") == "true" else "get" if request.name else "list"
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method)
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        user_agent = request.headers.get("User-Agent", "")
        agent = user_agent.split("/")[0].split(" ")[0]
        self.verbs_used.add((agent, verb, request.resource.group or "", resource))
        if verb in ("create", "patch", "delete"):
            self.writers.add((user_agent, verb, resource))


class SimCluster:
    def __init__(self, *, nodes: int = 4, interval: float = 0.2, tick: float = 0.05,
                 real: RealKubelet | None = None, storage_root: str = "s3://bucket/runs") -> None:
        """``real``: pods run the rendered command as local processes (simkubelet.py) instead of
        the stand-in trainers; ``storage_root`` is the operator's ``--storage-root``."""
        self.node_names = [f"node-{i}" for i in range(1, nodes + 1)]
        self.interval = interval
        self.tick = tick
        self.real = real
        self.storage_root = storage_root
        self.trainers: dict[str, Trainer] = {}
        self.kueue_admits: set[str] = set()  # queues whose workloads the simulated Kueue admits
        self.metrics_servers: dict[int, web.AppRunner] = {}
        self.operator_metrics = OperatorMetrics()
        self._tasks: list[asyncio.Task[Any]] = []
        self._operator: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self.kube: k.Kube
        self.emulator: RealisticEmulator

    # -- lifecycle ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, *, operator: bool = True) -> AsyncIterator[SimCluster]:
        self.emulator = RealisticEmulator()
        self._register_resources()
        async with self.emulator, Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self.kube = k.Kube(k.load_connection(self.url), user_agent="simcluster")
            await self._seed()
            self._tasks.append(asyncio.create_task(self._controllers()))
            if operator:
                await self.start_operator()
            try:
                yield self
            finally:
                await self.stop_operator()
                for t in self._tasks:
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                for runner in self.metrics_servers.values():
                    await runner.cleanup()
                if self.real is not None:
                    await asyncio.to_thread(self.real.close)
                await self.kube.close()

    def _register_resources(self) -> None:
        self.emulator.resources.load_bundled()
        verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
        for model in KIND_MODELS.values():
            self.emulator.resources[f"{GROUP}/{VERSION}/{model.PLURAL}"] = ResourceInfo(
                kind=model.KIND, namespaced=True, verbs=verbs, subresources={"status"},
                singular=model.KIND.lower(), categories={"crucible"})
        self.emulator.resources["kopf.dev/v1/clusterkopfpeerings"] = ResourceInfo(
            kind="ClusterKopfPeering", namespaced=False, verbs=verbs)
        for group_version in ("scheduling.volcano.sh/v1beta1", "scheduling.x-k8s.io/v1alpha1"):
            self.emulator.resources[f"{group_version}/podgroups"] = ResourceInfo(
                kind="PodGroup", namespaced=True, verbs=verbs)

    async def _seed(self) -> None:
        crds = k.Res("apiextensions.k8s.io", "v1", "customresourcedefinitions", namespaced=False)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            await self.kube.request("POST", crds.path(), body=crd)
        # Cluster-scoped core objects go in directly: the emulator's URL parser takes
        # /api/v1/namespaces for a namespace path. Nothing watches them, the operator GETs nodes.
        self.emulator.objects["v1/namespaces", None, NAMESPACE] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        for name in self.node_names:
            self.emulator.objects["v1/nodes", None, name] = _node(name)
        self.emulator.objects["kopf.dev/v1/clusterkopfpeerings", None, "crucible"] = {
            "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "crucible"},
            "status": {}}

    async def start_operator(self, *, replica: str = "", peering: str | None = None, priority: int = 0
                             ) -> tuple[threading.Thread, threading.Event]:
        """The real operator, in its own thread and event loop (as in a pod of its own): Kopf
        cancels every task created in its loop after it started when it stops."""
        config = OperatorConfig(storage_root=self.storage_root, interval=self.interval, resync=30.0,
                                scrape_timeout=1.0, user_agent=f"crucible-operator/{replica}")
        registry = build_registry(config, server=self.url, metrics=self.operator_metrics)
        stop = threading.Event()

        def main() -> None:
            asyncio.run(kopf.operator(registry=registry, standalone=peering is None, peering_name=peering,
                                      priority=priority, clusterwide=True, stop_flag=stop))

        thread = threading.Thread(target=main, name=f"operator{replica}", daemon=True)
        thread.start()
        if not replica:
            self._stop, self._operator = stop, thread
        return thread, stop

    async def stop_operator(self) -> None:
        if self._operator is None or self._stop is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._operator.join, scaled(15))
        self._operator = None

    # -- the test's API ---------------------------------------------------------------------

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        meta = obj["metadata"]
        meta.setdefault("namespace", NAMESPACE)
        meta.setdefault("generation", 1)
        await self.kube.create(obj)
        return obj

    async def get(self, kind: str, name: str) -> dict[str, Any]:
        obj = await self.kube.get(k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL), NAMESPACE, name)
        assert obj is not None, f"{kind} {name} is gone"
        return obj

    async def patch_spec(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        res = k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL)
        obj = await self.get(kind, name)
        gen = int(obj["metadata"].get("generation", 1)) + 1
        await self.kube.request("PATCH", res.path(NAMESPACE, name), body={"spec": spec, "metadata": {"generation": gen}},
                                content_type="application/merge-patch+json")

    async def delete(self, kind: str, name: str) -> None:
        await self.kube.delete(k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL), NAMESPACE, name)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        """Poll ``predicate`` until it returns something true; ``timeout`` is scaled (tests/waits.py)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await predicate()
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last: {last!r}")

    async def wait_phase(self, kind: str, name: str, phase: str, timeout: float = 20.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            obj = await self.kube.get(k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL), NAMESPACE, name)
            now = (obj or {}).get("status", {}).get("phase") if obj else None
            if now in ("Succeeded", "Failed") and now != phase:  # final: waiting longer changes nothing
                raise AssertionError(f"{kind} {name} is {now}, never {phase}: {json.dumps(obj.get('status'), indent=1)}")
            return obj if now == phase else None
        try:
            return await self.wait_for(check, timeout, f"{kind} {name} phase {phase}")
        except AssertionError:
            obj = await self.kube.get(k.Res(GROUP, VERSION, KIND_MODELS[kind].PLURAL), NAMESPACE, name)
            raise AssertionError(f"{kind} {name} never reached {phase}; status: "
                                 f"{json.dumps((obj or {}).get('status'), indent=1)}") from None

    async def jobs(self, run: str | None = None) -> list[dict[str, Any]]:
        jobs = await self.kube.list(k.JOBS, NAMESPACE)
        return [j for j in jobs if run is None or j["metadata"]["labels"].get(LABEL_RUN) == run]

    async def pods(self, run: str | None = None) -> list[dict[str, Any]]:
        pods = await self.kube.list(k.PODS, NAMESPACE)
        return [p for p in pods if run is None or p["metadata"]["labels"].get(LABEL_RUN) == run]

    async def events(self, name: str) -> list[dict[str, Any]]:
        evs = await self.kube.list(k.EVENTS, NAMESPACE)
        return [e for e in evs if e["involvedObject"]["name"] == name]

    def trainer(self, run: str, *, total_steps: int = 20, port: int, **kw: Any) -> Trainer:
        self.trainers[run] = Trainer(total_steps=total_steps, port=port, **kw)
        return self.trainers[run]

    async def kill_node(self, name: str) -> None:
        """The node goes NotReady: its pods stop making progress (their status goes stale); with
        real pods their process groups are SIGKILLed."""
        if self.real is not None:
            self.real.kill_node(name)
        self.emulator.objects["v1/nodes", None, name].patch({"status": {"conditions": [
            {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}})

    # -- simulated controllers ----------------------------------------------------------------

    async def _controllers(self) -> None:
        loop = 0
        while True:
            loop += 1
            try:
                jobs = await self.kube.list(k.JOBS, NAMESPACE)
                pods = await self.kube.list(k.PODS, NAMESPACE)
                nodes = {n["metadata"]["name"]: n for n in await self.kube.list(k.NODES, None)}
                await self._job_controller(jobs, pods, nodes)
                if self.real is not None:
                    await self.real.sync(self.kube, pods, {n for n, node in nodes.items() if _ready(node)})
                else:
                    await self._kubelet(pods, nodes)
                if loop % 4 == 0:
                    await self._garbage_collector(jobs, pods, nodes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep simulating; a test will time out with a message
                print(f"simcluster: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.tick)

    async def _job_controller(self, jobs: list[dict[str, Any]], pods: list[dict[str, Any]],
                              nodes: dict[str, dict[str, Any]]) -> None:
        # one pod per node, across all Jobs of this pass (pods placed now are not in ``pods``)
        busy = {p["spec"].get("nodeName") for p in pods if p["status"].get("phase") in ("Pending", "Running")}
        for job in jobs:
            jname = job["metadata"]["name"]
            spec = job["spec"]
            mine = [p for p in pods if p["metadata"]["labels"].get(JOB_NAME_LABEL) == jname]
            conds = job.get("status", {}).get("conditions") or []
            if spec.get("suspend") and job["metadata"]["labels"].get(KUEUE_QUEUE_LABEL) in self.kueue_admits:
                await self._patch(k.JOBS, jname, {"spec": {"suspend": False}})  # Kueue admitted the workload
                continue
            if any(c["type"] in ("Complete", "Failed") for c in conds) or spec.get("suspend"):
                continue
            if not mine:
                for index in range(spec["completions"]):
                    await self.kube.create(self._pod(job, index))
                await self._patch(k.JOBS, jname, {"status": {"active": spec["completions"]}})
                continue
            phases = [p["status"].get("phase") for p in mine]
            if any(ph == "Failed" for ph in phases):
                for p in mine:
                    if p["status"].get("phase") in ("Pending", "Running"):
                        await self._delete_pod(p, nodes)
                await self._patch(k.JOBS, jname, {"status": {"active": 0, "failed": phases.count("Failed"), "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
            elif phases.count("Succeeded") == spec["completions"]:
                await self._patch(k.JOBS, jname, {"status": {"active": 0, "succeeded": spec["completions"], "conditions": [
                    {"type": "Complete", "status": "True"}]}})
            ready = phases.count("Running")
            if ready != job.get("status", {}).get("ready", 0) and not any(ph == "Failed" for ph in phases):
                await self._patch(k.JOBS, jname, {"status": {"ready": ready}})
            # schedule pending pods: one per node, honour excluded nodes, only Ready nodes
            for p in mine:
                if p["spec"].get("nodeName") or p["status"].get("phase") != "Pending":
                    continue
                excluded = _excluded(p)
                free = [n for n in self.node_names if n not in busy and n not in excluded and _ready(nodes.get(n))]
                if free:
                    busy.add(free[0])
                    await self._patch(k.PODS, p["metadata"]["name"], {"spec": {"nodeName": free[0]}})

    def _pod(self, job: dict[str, Any], index: int) -> dict[str, Any]:
        tmpl = job["spec"]["template"]
        labels = {**tmpl["metadata"]["labels"], JOB_NAME_LABEL: job["metadata"]["name"], JOB_INDEX_LABEL: str(index)}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}", "namespace": NAMESPACE,
                         "labels": labels, "annotations": {JOB_INDEX_LABEL: str(index)},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                              "uid": job["metadata"].get("uid", ""), "controller": True}]},
            "spec": _with_index_env(tmpl["spec"]),
            "status": {"phase": "Pending"},
        }

    async def _kubelet(self, pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]]) -> None:
        by_run: dict[str, list[dict[str, Any]]] = {}
        for p in pods:
            by_run.setdefault(p["metadata"]["labels"][LABEL_RUN], []).append(p)
        for run, run_pods in by_run.items():
            trainer = self.trainers.get(run)
            live = [p for p in run_pods if p["status"].get("phase") in ("Pending", "Running")
                    and not p["metadata"].get("deletionTimestamp")]  # not a Terminating pod of a lost node
            for p in live:
                node = p["spec"].get("nodeName")
                if p["status"]["phase"] == "Pending" and node and _ready(nodes.get(node)):
                    await self._patch(k.PODS, p["metadata"]["name"], {"status": {
                        "phase": "Running", "podIP": "127.0.0.1",
                        "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}})
            running = [p for p in live if p["status"]["phase"] == "Running"]
            if trainer is None or not running:
                continue
            attempt = int(running[0]["metadata"]["labels"][LABEL_ATTEMPT])
            if attempt not in trainer.attempts_seen:
                trainer.attempts_seen.append(attempt)
                trainer.step = trainer.checkpoint  # resume from the last checkpoint
                trainer.resumed_from.append(trainer.checkpoint)
                trainer.last_tick = None
            await self._serve_metrics(run, trainer)
            all_running = len(running) == len(live) and all(_ready(nodes.get(p["spec"]["nodeName"])) for p in running)
            now = time.monotonic()
            elapsed = now - (trainer.last_tick or now)
            trainer.last_tick = now
            if not all_running or trainer.hung:
                continue  # a lost peer stalls collective ops: no progress
            trainer.step = min(trainer.step + max(1, round(elapsed * trainer.steps_per_second)), trainer.total_steps)
            trainer.checkpoint = trainer.step - trainer.step % trainer.checkpoint_every
            if trainer.exit_at and trainer.step >= trainer.exit_at[0]:
                _, code, message = trainer.exit_at
                trainer.exits_left -= 1
                if trainer.exits_left <= 0:
                    trainer.exit_at = None
                rank0 = next(p for p in running if p["metadata"]["labels"][JOB_INDEX_LABEL] == "0")
                await self._terminate(rank0, code, message)
                continue
            if trainer.step >= trainer.total_steps:
                extra = trainer.results(attempt) if trainer.results is not None else {}
                success = json.dumps({"stage": "pretrain", "results": {"finalLoss": 2.5, "steps": trainer.step, **extra}})
                for p in running:
                    await self._terminate(p, 0, success if p["metadata"]["labels"][JOB_INDEX_LABEL] == "0" else "")

    async def _terminate(self, pod: dict[str, Any], code: int, message: str) -> None:
        await self._patch(k.PODS, pod["metadata"]["name"], {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message}}}]}})

    async def _garbage_collector(self, all_jobs: list[dict[str, Any]], pods: list[dict[str, Any]],
                                 nodes: dict[str, dict[str, Any]]) -> None:
        """Owner references: a Job's pods go with it, a run's objects go with the run.

        As Kubernetes' garbage collector does, an object is deleted only once a fresh read shows
        its owner gone (or replaced: another uid): the lists above may predate an owner created
        since, and deleting a new attempt's Job for that would fake an AttemptLost."""
        jobs = {j["metadata"]["name"] for j in all_jobs}
        for p in pods:
            if p["metadata"]["labels"].get(JOB_NAME_LABEL) not in jobs and not await self._owner_exists(p):
                await self._delete_pod(p, nodes)
        for res in (k.JOBS, k.SERVICES, k.CONFIGMAPS):
            for obj in await self.kube.list(res, NAMESPACE):
                if obj["metadata"].get("ownerReferences") and not await self._owner_exists(obj):
                    await self.kube.delete(res, NAMESPACE, obj["metadata"]["name"])

    async def _delete_pod(self, pod: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
        """A pod on a Ready node (or none) goes at once. One on a NotReady node only gets a
        deletionTimestamp: its kubelet cannot confirm, so it stays Terminating with its last
        status, as on a real cluster (and the operator still sees where it ran)."""
        node = pod["spec"].get("nodeName")
        if node and not _ready(nodes.get(node)):
            if not pod["metadata"].get("deletionTimestamp"):
                await self._patch(k.PODS, pod["metadata"]["name"], {"metadata": {"deletionTimestamp": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
            return
        await self.kube.delete(k.PODS, NAMESPACE, pod["metadata"]["name"])

    async def _owner_exists(self, obj: dict[str, Any]) -> bool:
        for owner in obj["metadata"].get("ownerReferences") or []:
            if owner["kind"] == "Job":
                res = k.JOBS
            elif owner["kind"] in KIND_MODELS:
                res = k.Res(GROUP, VERSION, KIND_MODELS[owner["kind"]].PLURAL)
            else:
                return True  # not ours to judge
            found = await self.kube.get(res, NAMESPACE, owner["name"])
            if found is not None and (not owner.get("uid") or found["metadata"].get("uid") in (owner["uid"], None)):
                return True
        return False

    async def _serve_metrics(self, run: str, trainer: Trainer) -> None:
        if trainer.port in self.metrics_servers:
            return

        async def metrics(_: web.Request) -> web.Response:
            t = trainer
            text = "\n".join([
                "# TYPE crucible_train_step gauge",
                f"crucible_train_step {t.step}",
                f"crucible_train_loss {3.0 - t.step * 0.01:.4f}",
                f"crucible_train_tokens_total {t.step * t.tokens_per_step}",
                f"crucible_train_tokens_per_second {t.tokens_per_step * t.steps_per_second:.1f}",
                "crucible_train_mfu_ratio 0.42",
                f"crucible_train_loss_spikes_total {t.spikes}",
                f"crucible_checkpoint_last_step {t.checkpoint}",
                "",
            ])
            return web.Response(text=text)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", trainer.port).start()
        self.metrics_servers[trainer.port] = runner

    async def _patch(self, res: k.Res, name: str, body: dict[str, Any]) -> None:
        try:
            await self.kube.request("PATCH", res.path(NAMESPACE if res.namespaced else None, name), body=body,
                                    content_type="application/merge-patch+json")
        except k.ApiError as exc:
            if exc.status != 404:
                raise


def _with_index_env(template_spec: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of an Indexed Job's pod: each container gets JOB_COMPLETION_INDEX from the
    pod's annotation, as the Job controller adds it."""
    spec = json.loads(json.dumps(template_spec))
    for container in spec.get("containers", []):
        container.setdefault("env", []).insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {
            "fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX_LABEL}']"}}})
    return spec


def _node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def _ready(node: dict[str, Any] | None) -> bool:
    if node is None:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


def _excluded(pod: dict[str, Any]) -> set[str]:
    terms = (pod["spec"].get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    out: set[str] = set()
    for term in terms:
        for f in term.get("matchFields", []):
            if f["key"] == "metadata.name" and f["operator"] == "NotIn":
                out |= set(f["values"])
    return out
