"""Placement, scheduling, status and the resource envelope shared by the five kinds.

A resource's spec is the trainer's stage config (``crucible.trainer.config``) plus the
fields here that only the operator reads (where pods run, how they are gang-scheduled,
suspend). Cross-field rules exist twice on purpose: as pydantic validators (messages name the
dotted field, used by ``crucible validate`` and the embedded runner) and as CEL
``x-kubernetes-validations`` in the generated CRDs (enforced by the API server). Tests check
both on the same good and bad objects.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from crucible.api.revisions import RevisionRecord
from crucible.trainer.config.common import RunRef, StrictModel

GROUP = "crucible.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""metadata.name: a DNS-1035 label, because it names the attempt's headless Service."""
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

IMAGE_PATTERN = (
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
"""An OCI image reference: [registry[:port]/]path[:tag][@sha256:digest]."""
LABEL_KEY = re.compile(r"^(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_WORDS = frozenset({"SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "CREDENTIALS", "APIKEY"})
_SECRET_PAIRS = ("API_KEY", "ACCESS_KEY", "PRIVATE_KEY", "AUTH_KEY")


def is_credential_name(name: str) -> bool:
    """True for environment names that hold credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, ...)."""
    upper = name.upper().replace("-", "_").replace(".", "_")
    return bool(_SECRET_WORDS & set(upper.split("_"))) or any(pair in upper for pair in _SECRET_PAIRS)


def world_batch_problem(spec: Any) -> str | None:
    """Why the batch does not split over the run's ranks (the trainer refuses it at start), or None."""
    training = getattr(spec, "training", None)
    if training is None or getattr(training, "parallelism", None) is not None:
        return None  # tensor/pipeline layouts split the ranks otherwise; the layout check covers them
    res = spec.resources
    world = res.nodes * res.procs_per_node
    per_step = training.micro_batch_size * training.seq_len * world
    if training.global_batch_tokens % per_step == 0:
        return None
    fits = max(1, round(training.global_batch_tokens / per_step)) * per_step
    return (f"{training.global_batch_tokens} is not a multiple of microBatchSize × seqLen × ranks = "
            f"{training.micro_batch_size} × {training.seq_len} × {world} = {per_step} (ranks = resources.nodes × "
            f"processes per node); the trainer will refuse to start. Use {fits}")


def check_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if not LABEL_KEY.match(key) or len(prefix) > 253 or len(name) > 63:
        raise ValueError(f"{key!r} is not a valid label key ([prefix/]name: name up to 63 of letters, "
                         "digits, '-', '_', '.', starting and ending alphanumeric; prefix a DNS subdomain)")


Phase = Literal["Pending", "Waiting", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = ("Pending", "Waiting", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class Toleration(StrictModel):
    """A Kubernetes toleration (core/v1)."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Equal", "Exists"] = Field(default="Equal", description="Equal or Exists.")
    value: str | None = Field(default=None, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty: all."
    )
    toleration_seconds: int | None = Field(default=None, ge=0, description="NoExecute grace period.")


class RdmaConfig(StrictModel):
    """RDMA / InfiniBand devices requested as an extended resource."""

    resource_name: str = Field(
        default="rdma/ib",
        min_length=1,
        description="Extended resource of the RDMA device plugin, e.g. rdma/ib or nvidia.com/hostdev.",
    )
    count: int = Field(default=1, ge=1, le=64, description="Devices per pod.")


class SecretKeyRef(StrictModel):
    """One key of a Secret in the resource's namespace."""

    secret: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                        description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


class TopologyConfig(StrictModel):
    """Keep all pods of a job inside one fast-interconnect block."""

    key: str = Field(
        default="topology.kubernetes.io/zone",
        min_length=1,
        description="Node label naming the block (NVLink domain, IB leaf), e.g. nvidia.com/gpu.clique.",
    )
    mode: Literal["preferred", "required"] = Field(default="preferred", description="Soft or hard affinity.")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        check_label_key(value)
        return value


class Resources(StrictModel):
    """Where and on what the pods run."""

    nodes: int = Field(default=1, ge=1, le=4096, description="Nodes (one pod per node).")
    gpus_per_node: int = Field(default=0, ge=0, le=16, description="GPUs per node (nvidia.com/gpu); also processes per node.")
    processes_per_node: int | None = Field(
        default=None, ge=1, le=256, description="Processes per node when there are no GPUs; default 1."
    )
    node_pool: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="Value of the node-pool label the pods are pinned to (required with GPUs).",
    )
    node_pool_label: str = Field(
        default="crucible.dev/node-pool", min_length=1, description="Node label key naming the pool."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node labels to require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the pods.")
    rdma: RdmaConfig | None = Field(default=None, description="RDMA / InfiniBand devices per pod.")
    topology: TopologyConfig | None = Field(default=None, description="Same-block placement.")
    image: str | None = Field(
        default=None, min_length=1, max_length=512, pattern=IMAGE_PATTERN,
        description="Trainer image reference ([registry/]path[:tag][@sha256:digest]); empty: the operator's default.",
    )
    cpu: str = Field(default="4", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request per pod.")
    memory: str = Field(default="32Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$", description="Memory request per pod.")
    shm_size: str = Field(default="16Gi", pattern=r"^[0-9]+([KMGTPE]i?)?$", description="Size of /dev/shm (memory-backed).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables (e.g. NCCL_* tuning). Never credentials: use secretEnv.",
    )
    secret_env: dict[str, SecretKeyRef] = Field(
        default_factory=dict,
        description=(
            "Environment variables taken from Secrets, e.g. HF_TOKEN: {secret: hf, key: token}. In embedded mode "
            "(crucible run) each is taken from the same variable of the environment crucible run is started in."
        ),
    )

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            check_label_key(key)
            if not LABEL_VALUE.match(label):
                raise ValueError(f"the value {label!r} of {key!r} is not a valid label value "
                                 "(up to 63 letters, digits, '-', '_', '.', starting and ending alphanumeric)")
        return value

    @field_validator("node_pool_label")
    @classmethod
    def _pool_label(cls, value: str) -> str:
        check_label_key(value)
        return value

    @field_validator("node_pool")
    @classmethod
    def _pool(cls, value: str | None) -> str | None:
        if value is not None and not LABEL_VALUE.match(value):
            raise ValueError(f"{value!r} is not a valid label value (letters, digits, '-', '_', '.')")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name (letters, digits, "
                                 "'_', '-', '.', not starting with a digit; no '=')")
            if is_credential_name(name):
                raise ValueError(
                    f"{name} looks like a credential and would be stored in plain text in the resource, "
                    f"the pod spec and the spec file; put it in a Secret and write secretEnv: "
                    f"{{{name}: {{secret: SECRET-NAME, key: KEY}}}} instead"
                )
        return value

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, value: dict[str, SecretKeyRef]) -> dict[str, SecretKeyRef]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.processes_per_node or 1

    @model_validator(mode="after")
    def _gpu_pool(self) -> Resources:
        if self.gpus_per_node > 0 and not self.node_pool and not self.node_selector:
            raise ValueError(
                "nodePool: required when gpusPerNode > 0 so the pods land on GPU nodes; set it to "
                "the name of your GPU node pool (or set nodeSelector)"
            )
        if self.gpus_per_node > 0 and self.processes_per_node not in (None, self.gpus_per_node):
            raise ValueError("processesPerNode: must equal gpusPerNode (one process per GPU) or be empty")
        return self


NODE_LOCAL_CHECKPOINT_CEL = cel(
    "!has(self.resources) || !has(self.resources.nodes) || self.resources.nodes == 1 || "
    "!has(self.checkpoint) || !has(self.checkpoint.uri) || !self.checkpoint.uri.startsWith('/tmp')",
    "a multi-node run cannot keep checkpoints in /tmp of one pod; use a PVC path or s3://",
    ".checkpoint.uri",
)
"""Mirrors PlacementMixin's node-local checkpoint check, on every training kind."""
ENV_CEL = [
    cel("!has(self.env) || self.env.all(k, k.matches('^[-._a-zA-Z][-._a-zA-Z0-9]*$'))",
        "env names must be valid environment variable names", ".env"),
    cel("!has(self.secretEnv) || self.secretEnv.all(k, k.matches('^[-._a-zA-Z][-._a-zA-Z0-9]*$'))",
        "secretEnv names must be valid environment variable names", ".secretEnv"),
]
NAME_CEL = cel(
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63",
    "metadata.name must be a DNS-1035 label (start with a letter): it names the attempt's Service",
    ".metadata.name",
)


RESOURCES_CEL = [
    *ENV_CEL,
    cel(
        "self.gpusPerNode == 0 || has(self.nodePool) || (has(self.nodeSelector) && size(self.nodeSelector) > 0)",
        "gpusPerNode > 0 needs nodePool (or nodeSelector) so the pods land on GPU nodes",
        ".nodePool",
    ),
]


class Scheduling(StrictModel):
    """Gang scheduling: all pods of an attempt start together or not at all."""

    gang: Literal["none", "kueue", "volcano", "coscheduling"] = Field(
        default="none", description="Gang scheduler: none, Kueue, Volcano or the coscheduling plugin."
    )
    queue: str | None = Field(default=None, min_length=1, description="Kueue LocalQueue or Volcano queue.")
    priority_class_name: str | None = Field(default=None, min_length=1, description="PriorityClass of the pods.")
    schedule_timeout_seconds: int = Field(
        default=600, ge=1, le=604800, description="Coscheduling only: give up gang placement after this long."
    )

    @model_validator(mode="after")
    def _queue(self) -> Scheduling:
        if self.gang == "kueue" and not self.queue:
            raise ValueError("queue: required with gang kueue; set it to the name of a Kueue LocalQueue")
        if self.queue and self.gang in ("none", "coscheduling"):
            raise ValueError(
                f"queue: only Kueue and Volcano have queues, and gang is {self.gang}; remove queue or set gang to "
                "kueue or volcano"
            )
        if self.schedule_timeout_seconds != 600 and self.gang != "coscheduling":
            raise ValueError(
                f"scheduleTimeoutSeconds: only the coscheduling plugin's PodGroup has a schedule timeout, and gang "
                f"is {self.gang}; remove it (Volcano and Kueue keep a gang queued until it fits)"
            )
        return self


SCHEDULING_CEL = [
    cel("self.gang != 'kueue' || has(self.queue)", "gang kueue needs queue: the name of a Kueue LocalQueue", ".queue"),
    cel("!has(self.queue) || self.gang == 'kueue' || self.gang == 'volcano'",
        "queue is only for gang kueue or volcano", ".queue"),
]


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")

    type: str = Field(description="Condition type, e.g. Ready, InputReady, Progressing.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last change.")
    observed_generation: int | None = Field(default=None, description="Generation this condition is about.")


class Progress(BaseModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")

    step: int | None = Field(default=None, description="Last completed optimizer step.")
    total_steps: int | None = Field(default=None, description="Steps planned.")
    percent: float | None = Field(default=None, description="step / totalSteps × 100.")
    loss: float | None = Field(default=None, description="Last training loss.")
    tokens: int | None = Field(default=None, description="Tokens consumed.")
    tokens_per_second: float | None = Field(default=None, description="Recent throughput of the whole job.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilization, 0-1.")
    stage: str | None = Field(default=None, description="Current stage of a multi-stage job.")
    updated_at: str | None = Field(default=None, description="When the metrics were last read.")


class CheckpointRef(BaseModel):
    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")

    step: int = Field(description="Step of the checkpoint.")
    uri: str = Field(description="Location of the checkpoint directory.")
    time: str | None = Field(default=None, description="When it was written.")


class RunStatus(BaseModel):
    """Status shared by every kind. Written by the operator (or the embedded runner) only."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")

    phase: Phase = Field(default="Pending", description="Pending, Waiting, Running, Restarting, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    observed_generation: int | None = Field(default=None, description="metadata.generation last acted on.")
    attempt: int = Field(default=0, description="Current attempt number (0-based).")
    progress: Progress = Field(default_factory=Progress, description="Training progress.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Latest valid checkpoint.")
    restarts: int = Field(default=0, description="Restarts after infrastructure failures.")
    consecutive_restarts: int = Field(
        default=0,
        description="Restarts since the last attempt that ran healthily (failurePolicy.maxBackoffSeconds or "
                    "longer): the exponent of the restart backoff, so it resets after a healthy period.",
    )
    failed_nodes: list[str] = Field(default_factory=list, description="Nodes excluded after failures.")
    output_uri: str | None = Field(default=None, alias="outputURI", description="Where the result is.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the run finished.")
    goodput: float | None = Field(default=None, description="Time on kept steps ÷ wall time since start.")
    loss_spikes: int = Field(default=0, description="Loss spikes detected.")
    message: str | None = Field(default=None, description="Short human-readable state.")
    results: dict[str, Any] = Field(default_factory=dict, description="Stage results (perplexity, sizes, accuracy, receipts).")
    revision: int | None = Field(default=None, description="With spec.revisions: the revision running or last run.")
    revisions: list[RevisionRecord] = Field(default_factory=list, description="With spec.revisions: each one finished.")


class RunMeta(BaseModel):
    """The part of metadata Crucible reads; everything else is carried through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN, description="Resource name (DNS label).")
    namespace: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=NAMESPACE_PATTERN, description="Namespace (DNS label)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


def check_single_pod(res: Resources, kind: str, why: str) -> None:
    """A kind that runs as one process per pod without GPUs of its own placement (DataPipeline, QuantizeJob)."""
    if res.processes_per_node not in (None, 1):
        raise ValueError(f"resources.processesPerNode: a {kind} runs one process per pod ({why}); remove it")
    if res.rdma is not None:
        raise ValueError(f"resources.rdma: a {kind} does not use RDMA ({why}); remove it")


class PlacementMixin(StrictModel):
    """Operator-only fields shared by every kind."""

    resources: Resources = Field(default_factory=Resources, description="Nodes, GPUs, pool and image.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Gang scheduling.")
    suspend: bool = Field(default=False, description="Stop the pods; set back to false to resume from checkpoint.")

    @model_validator(mode="after")
    def _node_local_checkpoints(self) -> PlacementMixin:
        """A multi-node run's checkpoints must be on storage every node sees."""
        res = self.resources
        checkpoint = getattr(self, "checkpoint", None)
        uri = getattr(checkpoint, "uri", None)
        if res.nodes > 1 and uri and uri.startswith("/tmp"):
            raise ValueError(
                f"checkpoint.uri: {uri} is inside /tmp of one pod; a {res.nodes}-node run needs storage every "
                "node sees: a PVC path or s3://"
            )
        return self


class Resource(BaseModel):
    """Envelope of every kind: apiVersion, kind, metadata, spec, status."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    # fromRun fields (dotted, camelCase, relative to spec) -> kinds they may reference
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {}

    api_version: str = Field(alias="apiVersion", description="crucible.dev/v1alpha1")
    kind: str = Field(description="Kind of the resource.")
    metadata: RunMeta = Field(description="Standard object metadata.")
    spec: Any
    status: RunStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _envelope(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("apiVersion") != API_VERSION:
                raise ValueError(f"apiVersion must be {API_VERSION}, got {data.get('apiVersion')!r}")
            if data.get("kind") != cls.KIND:
                raise ValueError(f"kind must be {cls.KIND}, got {data.get('kind')!r}")
        return data

    @model_validator(mode="after")
    def _input_kinds(self) -> Resource:
        for path, ref in self.input_refs().items():
            allowed = self.INPUTS[path]
            if ref.kind not in allowed:
                raise ValueError(
                    f"spec.{path}.fromRun.kind: a {self.KIND} cannot read the output of a {ref.kind}; "
                    f"use one of {', '.join(allowed)}"
                )
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    def input_refs(self) -> dict[str, RunRef]:
        """fromRun references of this resource, by dotted spec path."""
        refs: dict[str, RunRef] = {}
        wire = self.spec.to_wire()
        for path in self.INPUTS:
            node: Any = wire
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and "fromRun" in node:
                refs[path] = RunRef.model_validate(node["fromRun"])
        return refs
