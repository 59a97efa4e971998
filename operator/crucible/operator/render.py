"""Render: the Kubernetes objects of one attempt, from a LaunchPlan (pure).

    render(resource, plan, *, settings=RenderSettings(), uid=None) -> Rendered

Per attempt of a training run: a ConfigMap with the spec JSON, a headless Service
(``publishNotReadyAddresses``) that gives every pod a stable DNS name, an Indexed Job
(``completions = parallelism = nodes``, ``restartPolicy: Never``, ``backoffLimit: 0``: the
operator owns restarts) whose pods run torchrun with ``--node-rank=$(JOB_COMPLETION_INDEX)``
and the master at ``<job>-0.<service>``, and a PodGroup when Volcano or coscheduling gang
scheduling is asked for. A DataPipeline gets one Indexed Job per stage (applied one after the
other by the operator); a QuantizeJob one single-pod Job.

Everything carries the labels in :data:`LABEL_*` and an owner reference to the resource, so
deleting the resource deletes it all. ``crucible render FILE`` prints exactly these objects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crucible.api.common import API_VERSION, Resource
from crucible.core.plan import LaunchPlan, Role

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = "crucible.dev/run"
LABEL_KIND = "crucible.dev/kind"
LABEL_ATTEMPT = "crucible.dev/attempt"
LABEL_ROLE = "crucible.dev/role"
MANAGED_BY = "crucible"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
SPEC_MOUNT = "/etc/crucible"
SPEC_FILE = "spec.json"
TERMINATION_LOG = "/dev/termination-log"
ENV_TERMINATION_LOG = "CRUCIBLE_TERMINATION_LOG"
CONTAINER = "trainer"
HOME = "/home/crucible"
WRITABLE_DIRS = {"tmp": "/tmp", "home": HOME, "workspace": "/workspace"}
"""The root filesystem is read-only; these emptyDirs are where the trainer (and torch, Triton,
DeepSpeed, Hugging Face) write: temporary staging, caches under $HOME, the working directory."""
DEFAULT_IMAGE = "ghcr.io/crucible-ml/trainer:0.1.0"


@dataclass(frozen=True)
class RenderSettings:
    """Operator-wide choices (flags of ``crucible operator`` and ``crucible render``)."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    master_port: int = 29500
    service_account: str | None = None
    run_as_user: int = 1000
    coscheduling_scheduler: str = "scheduler-plugins-scheduler"
    volcano_scheduler: str = "volcano"
    termination_grace_seconds: int = 120
    nccl_env: Mapping[str, str] = field(
        default_factory=lambda: {
            "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "NCCL_SOCKET_IFNAME": "eth0",
        }
    )


@dataclass(frozen=True)
class Rendered:
    config_map: dict[str, Any]
    service: dict[str, Any] | None
    jobs: tuple[dict[str, Any], ...]
    """One per role, in the order they run."""
    pod_group: dict[str, Any] | None = None

    def objects(self) -> list[dict[str, Any]]:
        out = [self.config_map]
        if self.service is not None:
            out.append(self.service)
        if self.pod_group is not None:
            out.append(self.pod_group)
        return out + list(self.jobs)


def child_name(name: str, *parts: str | int, limit: int = 52) -> str:
    """``name-part-...`` kept short enough for pod hostnames (``<job>-<index>`` ≤ 63)."""
    suffix = "".join(f"-{p}" for p in parts)
    if len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    keep = max(1, limit - len(suffix) - 7)
    return f"{name[:keep].rstrip('-')}-{digest}{suffix}"


def job_name(name: str, attempt: int, role: str | None = None) -> str:
    return child_name(name, role, attempt) if role and role not in ("trainer", "quantize", "data") else child_name(name, attempt)


def attempt_labels(kind: str, name: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: name,
        LABEL_KIND: kind,
        LABEL_ATTEMPT: str(attempt),
    }


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def torchrun_command(role: Role, argv: Sequence[str], *, node_rank: str, master_addr: str,
                     master_port: int) -> list[str]:
    """``python -m crucible.trainer ...`` under torchrun for a distributed role (static rendezvous).

    Shared by the Job (``$(JOB_COMPLETION_INDEX)``, ``<job>-0.<service>``) and the torchx
    components (the replica id, the scheduler's rank-0 host).
    """
    assert list(argv[:2]) == [argv[0], "-m"] and argv[0].endswith("python"), argv
    return [
        "torchrun",
        f"--nnodes={role.replicas}",
        f"--nproc-per-node={role.procs_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        *argv[1:],
    ]


# Caches and temporary files of a pod go to its writable emptyDirs (the root filesystem is read-only).
# Only the Job's pods need these; a torchx role runs wherever its scheduler puts it, with its own HOME.
POD_FILESYSTEM_ENV: dict[str, str] = {
    "HOME": HOME, "HF_HOME": f"{HOME}/.cache/huggingface", "TRITON_CACHE_DIR": f"{HOME}/.cache/triton",
    "TORCH_EXTENSIONS_DIR": f"{HOME}/.cache/torch_extensions", "TMPDIR": "/tmp",
}


def role_environment(resource: Resource, plan: LaunchPlan, role: Role, settings: RenderSettings) -> dict[str, str]:
    """The plain environment variables of a role's processes (NCCL, the contract's CRUCIBLE_*, and
    RANK/WORLD_SIZE/... for single processes); the Job adds the pod fields and Secret references."""
    env: dict[str, str] = {}
    if role.gpus_per_node:
        env.update(settings.nccl_env)
        if resource.spec.resources.rdma is None:
            env["NCCL_IB_DISABLE"] = "1"
    env.update(plan.env)
    if not role.distributed:
        # torchrun sets these for distributed roles; single processes get the same contract.
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(settings.master_port)})
    return env


def render(resource: Resource, plan: LaunchPlan, *, settings: RenderSettings | None = None,
           uid: str | None = None) -> Rendered:
    settings = settings or RenderSettings()
    ctx = _Context(resource, plan, settings, uid or "00000000-0000-0000-0000-000000000000")
    cm = ctx.config_map()
    distributed = any(r.distributed for r in plan.roles)
    service = ctx.service() if distributed else None
    jobs = tuple(ctx.job(role) for role in plan.roles)
    return Rendered(cm, service, jobs, ctx.pod_group())


@dataclass(frozen=True)
class _Context:
    resource: Resource
    plan: LaunchPlan
    settings: RenderSettings
    uid: str

    @property
    def base(self) -> str:
        return child_name(self.plan.name, self.plan.attempt)

    def meta(self, name: str, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        p = self.plan
        return {
            "name": name,
            "namespace": p.namespace,
            "labels": {**attempt_labels(p.kind, p.name, p.attempt), **(extra_labels or {})},
            "ownerReferences": [owner_reference(p.kind, p.name, self.uid)],
        }

    def config_map(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.meta(child_name(self.plan.name, self.plan.attempt, "spec")),
            "data": {SPEC_FILE: json.dumps(self.plan.spec, indent=2, sort_keys=True)},
        }

    def service(self) -> dict[str, Any]:
        p = self.plan
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(self.base),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": attempt_labels(p.kind, p.name, p.attempt),
                "ports": [{"name": "rendezvous", "port": self.settings.master_port, "protocol": "TCP"}],
            },
        }

    @property
    def gang(self) -> str:
        return self.resource.spec.scheduling.gang

    @property
    def pod_group_name(self) -> str:
        return self.base

    def pod_group(self) -> dict[str, Any] | None:
        sched = self.resource.spec.scheduling
        members = max(r.replicas for r in self.plan.roles)
        if self.gang == "volcano":
            spec: dict[str, Any] = {"minMember": members}
            if sched.queue:
                spec["queue"] = sched.queue
            if sched.priority_class_name:
                spec["priorityClassName"] = sched.priority_class_name
            return {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
                    "metadata": self.meta(self.pod_group_name), "spec": spec}
        if self.gang == "coscheduling":
            return {"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup",
                    "metadata": self.meta(self.pod_group_name),
                    "spec": {"minMember": members, "scheduleTimeoutSeconds": sched.schedule_timeout_seconds}}
        return None

    def job(self, role: Role) -> dict[str, Any]:
        p = self.plan
        name = job_name(p.name, p.attempt, role.name)
        sched = self.resource.spec.scheduling
        job_labels = {LABEL_ROLE: role.name}
        if self.gang == "kueue":
            job_labels[KUEUE_QUEUE_LABEL] = sched.queue or ""
            if sched.priority_class_name:
                job_labels[KUEUE_PRIORITY_LABEL] = sched.priority_class_name
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self.meta(name, job_labels),
            "spec": {
                "completionMode": "Indexed",
                "completions": role.replicas,
                "parallelism": role.replicas,
                "backoffLimit": 0,
                "suspend": self.gang == "kueue",
                "template": self.pod_template(role, name),
            },
        }

    def pod_template(self, role: Role, job: str) -> dict[str, Any]:
        p = self.plan
        res = self.resource.spec.resources
        labels = {**attempt_labels(p.kind, p.name, p.attempt), LABEL_ROLE: role.name}
        annotations: dict[str, str] = {}
        if self.gang == "coscheduling":
            labels[COSCHEDULING_LABEL] = self.pod_group_name
        if self.gang == "volcano":
            annotations[VOLCANO_GROUP_ANNOTATION] = self.pod_group_name
        pod: dict[str, Any] = {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": self.settings.termination_grace_seconds,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": self.settings.run_as_user,
                "runAsGroup": self.settings.run_as_user,
                "fsGroup": self.settings.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            # The trainer never talks to the API server: no token in its pods.
            "automountServiceAccountToken": False,
            "containers": [self.container(role, job)],
            "volumes": [
                {"name": "spec", "configMap": {"name": child_name(p.name, p.attempt, "spec")}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
                *({"name": name, "emptyDir": {}} for name in WRITABLE_DIRS),
            ],
        }
        if role.distributed:
            pod["subdomain"] = self.base
        if self.settings.service_account:
            pod["serviceAccountName"] = self.settings.service_account
        selector = dict(res.node_selector)
        if res.node_pool:
            selector[res.node_pool_label] = res.node_pool
        if selector:
            pod["nodeSelector"] = selector
        tolerations = [_toleration(t) for t in res.tolerations]
        if role.gpus_per_node and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
            tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
        if tolerations:
            pod["tolerations"] = tolerations
        affinity = self.affinity(role)
        if affinity:
            pod["affinity"] = affinity
        if self.gang == "volcano":
            pod["schedulerName"] = self.settings.volcano_scheduler
        elif self.gang == "coscheduling":
            pod["schedulerName"] = self.settings.coscheduling_scheduler
        if self.resource.spec.scheduling.priority_class_name:
            pod["priorityClassName"] = self.resource.spec.scheduling.priority_class_name
        meta: dict[str, Any] = {"labels": labels}
        if annotations:
            meta["annotations"] = annotations
        return {"metadata": meta, "spec": pod}

    def affinity(self, role: Role) -> dict[str, Any]:
        p = self.plan
        res = self.resource.spec.resources
        selector = {"matchLabels": {LABEL_RUN: p.name, LABEL_KIND: p.kind, LABEL_ATTEMPT: str(p.attempt),
                                    LABEL_ROLE: role.name}}
        out: dict[str, Any] = {}
        if p.excluded_nodes:
            out["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": list(p.excluded_nodes)}]}
            ]}}
        if role.replicas > 1 and role.distributed:
            out["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"}
            ]}
        if res.topology is not None and role.replicas > 1:
            term = {"labelSelector": selector, "topologyKey": res.topology.key}
            if res.topology.mode == "required":
                out["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
            else:
                out["podAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": term}
                ]}
        return out

    def command(self, role: Role, job: str) -> list[str]:
        argv = list(role.command_for("$(JOB_COMPLETION_INDEX)") if role.sharded else role.command)
        if not role.distributed:
            return argv
        return torchrun_command(role, argv, node_rank="$(JOB_COMPLETION_INDEX)", master_addr=f"{job}-0.{self.base}",
                                master_port=self.settings.master_port)

    def env(self, role: Role) -> list[dict[str, Any]]:
        p = self.plan
        env = {**POD_FILESYSTEM_ENV, **role_environment(self.resource, p, role, self.settings)}
        env[ENV_TERMINATION_LOG] = TERMINATION_LOG
        out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(env.items())]
        out += [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ]
        if p.credentials_secret:
            out += [
                {"name": key, "valueFrom": {"secretKeyRef": {"name": p.credentials_secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            ]
        out += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for name, (secret, key) in sorted(p.secret_env.items())
        ]
        return out

    def container(self, role: Role, job: str) -> dict[str, Any]:
        res = self.resource.spec.resources
        limits: dict[str, str] = {"memory": res.memory}
        if role.gpus_per_node:
            limits["nvidia.com/gpu"] = str(role.gpus_per_node)
        if res.rdma is not None and role.gpus_per_node:
            limits[res.rdma.resource_name] = str(res.rdma.count)
        requests = {"cpu": res.cpu, "memory": res.memory, **{k: v for k, v in limits.items() if k != "memory"}}
        ports = []
        if self.plan.metrics_port:
            ports.append({"name": "metrics", "containerPort": self.plan.metrics_port, "protocol": "TCP"})
        if role.distributed:
            ports.append({"name": "rendezvous", "containerPort": self.settings.master_port, "protocol": "TCP"})
        caps: dict[str, Any] = {"drop": ["ALL"]}
        if res.rdma is not None and role.gpus_per_node:
            caps["add"] = ["IPC_LOCK"]  # RDMA registers (pins) memory
        container: dict[str, Any] = {
            "name": CONTAINER,
            "image": res.image or self.settings.image,
            "imagePullPolicy": self.settings.image_pull_policy,
            "command": self.command(role, job),
            "env": self.env(role),
            "resources": {"requests": requests, "limits": limits},
            "volumeMounts": [
                {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
                *({"name": name, "mountPath": path} for name, path in WRITABLE_DIRS.items()),
            ],
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": caps},
        }
        if ports:
            container["ports"] = ports
        return container


def _toleration(t: Any) -> dict[str, Any]:
    """A core/v1 toleration from the spec's (field by field: each one reaches the pod)."""
    fields = (("key", t.key), ("operator", t.operator), ("value", t.value), ("effect", t.effect),
              ("tolerationSeconds", t.toleration_seconds))
    return {key: value for key, value in fields if value is not None}
