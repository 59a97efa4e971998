"""DataPipeline: raw text to clean, deduplicated, tokenized shards with a receipt."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from crucible.api.common import PlacementMixin, Resource, cel, check_single_pod
from crucible.api.pretrainrun import MODEL_KINDS
from crucible.api.registry import SHARD_PLACEHOLDER, Kind, Role
from crucible.api.revisions import DataRevisions
from crucible.trainer.config.data import DataPipelineConfig


class DataPipelineSpec(DataPipelineConfig, PlacementMixin):
    """Spec of a DataPipeline: the trainer's DataPipelineConfig plus placement and revisions."""

    revisions: DataRevisions | None = Field(
        default=None,
        description="Keep every run as a new revision of the output, deduplicated against the earlier ones "
                    "(status.revisions logs them); empty: a rerun replaces the output.",
    )

    @model_validator(mode="after")
    def _placement(self) -> DataPipelineSpec:
        res = self.resources
        if res.nodes != 1:
            raise ValueError(
                f"resources.nodes: a DataPipeline spreads over spec.workers pods (one per worker), not nodes; "
                f"set workers: {res.nodes} instead of resources.nodes"
            )
        if res.gpus_per_node:
            raise ValueError("resources.gpusPerNode: the data pipeline runs on CPUs only; remove it")
        check_single_pod(res, "DataPipeline", "use spec.workers for parallelism")
        return self


class DataPipeline(Resource):
    """Raw text to clean, deduplicated, tokenized shards with a receipt."""

    KIND: ClassVar[str] = "DataPipeline"
    PLURAL: ClassVar[str] = "datapipelines"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("dp",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer.source": ("DataPipeline", *MODEL_KINDS)}
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("sources", "tokenizer")
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = [
        cel("!has(self.resources) || !has(self.resources.nodes) || self.resources.nodes == 1",
            "a DataPipeline spreads over spec.workers, not resources.nodes", ".resources.nodes"),
        cel("!has(self.resources) || !has(self.resources.gpusPerNode) || self.resources.gpusPerNode == 0",
            "the data pipeline runs on CPUs only: resources.gpusPerNode must be 0", ".resources.gpusPerNode"),
        cel("!has(self.resources) || !has(self.resources.rdma)", "a DataPipeline does not use RDMA",
            ".resources.rdma"),
    ]

    spec: DataPipelineSpec = Field(description="What to process and how.")


DATA_STAGES = ("filter", "dedup", "tokenize")
"""With ``workers: N > 1`` these run one after the other, each as N shards."""


def _roles(resource: Resource, base: tuple[str, ...]) -> tuple[Role, ...]:
    workers = resource.spec.workers
    if workers == 1:
        return (Role("data", 1, 1, 0, (*base, "--stage", "all"), distributed=False),)
    return tuple(
        Role(stage, workers, 1, 0,
             (*base, "--stage", stage, "--shard", SHARD_PLACEHOLDER, "--num-shards", str(workers)),
             distributed=False, sharded=True)
        for stage in DATA_STAGES
    )


def _role_names(resource: Resource) -> tuple[str, ...]:
    return DATA_STAGES if resource.spec.workers > 1 else ("data",)


KIND = Kind(
    DataPipeline,
    entry=("-m", "crucible.trainer", "data"),
    roles=_roles,
    role_names=_role_names,
    printer_columns=(
        {"name": "Stage", "type": "string", "jsonPath": ".status.progress.stage"},
        {"name": "Docs-Out", "type": "integer", "jsonPath": ".status.results.documentsOut"},
    ),
    results=(("documentsOut", "docs kept {:,}"), ("tokensTrain", "{:,} train tokens")),
    report_section="crucible.local.report:funnel_section",
    base_model_field="tokenizer.source",
)
