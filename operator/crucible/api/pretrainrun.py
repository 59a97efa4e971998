"""PretrainRun: next-token pretraining of a causal LM, from scratch or continued, multi-node."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from crucible.api.common import NODE_LOCAL_CHECKPOINT_CEL, PlacementMixin, Resource, cel
from crucible.api.registry import Kind, one_role
from crucible.api.revisions import TrainingRevisions
from crucible.trainer.config.stages import PretrainConfig

MODEL_KINDS = ("PretrainRun", "FinetuneRun", "PreferenceRun")


class PretrainRunSpec(PretrainConfig, PlacementMixin):
    """Spec of a PretrainRun: the trainer's PretrainConfig plus placement and revisions."""

    revisions: TrainingRevisions | None = Field(
        default=None,
        description="Train each new revision of the DataPipeline in data.fromRun, continuing from the previous "
                    "revision's model (status.revisions logs them); empty: new data starts the run over.",
    )

    @model_validator(mode="after")
    def _revisions_follow_a_pipeline(self) -> PretrainRunSpec:
        if self.revisions is not None and self.data.from_run is None:
            raise ValueError("revisions: a revision is a new output of the DataPipeline in data.fromRun; set "
                             "data.fromRun (not data.uri), or remove revisions")
        return self

    @model_validator(mode="after")
    def _layout_fits_cluster(self) -> PretrainRunSpec:
        par = self.training.parallelism
        if par is None:
            return self
        per_node = self.resources.procs_per_node
        if per_node % par.tensor:
            raise ValueError(
                f"training.parallelism.tensor: {par.tensor} must divide the {per_node} processes per node "
                "(resources.gpusPerNode): a tensor-parallel group stays inside one node (NVLink)"
            )
        try:
            par.resolve(self.resources.nodes * per_node)
        except ValueError as exc:
            raise ValueError(f"training.{exc}") from None
        return self


class PretrainRun(Resource):
    """Next-token pretraining of a causal LM (from scratch or continued), multi-node."""

    KIND: ClassVar[str] = "PretrainRun"
    PLURAL: ClassVar[str] = "pretrainruns"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ptr",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("DataPipeline",),
        "model.source": MODEL_KINDS,
        "tokenizer": ("DataPipeline", *MODEL_KINDS),
    }
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("model", "data", "tokenizer")
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = [
        NODE_LOCAL_CHECKPOINT_CEL,
        cel("!has(self.revisions) || has(self.data.fromRun)",
            "revisions: a revision is a new output of the DataPipeline in data.fromRun; set data.fromRun",
            ".revisions"),
        cel(
            "(has(self.model) && has(self.model.source)) || !has(self.training.seqLen) || "
            "self.training.seqLen <= (has(self.model) && has(self.model.maxPositionEmbeddings) ? "
            "self.model.maxPositionEmbeddings : 2048)",
            "training.seqLen is longer than model.maxPositionEmbeddings",
            ".training.seqLen",
        ),
    ]

    spec: PretrainRunSpec = Field(description="What to train and where.")


TRAINING_COLUMNS = (
        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
        {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "priority": 1},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "Tok/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond", "priority": 1},
    )
"""kubectl columns of the training kinds."""

_roles, _role_names = one_role("trainer")
KIND = Kind(
    PretrainRun,
    entry=("-m", "crucible.trainer", "pretrain"),
    roles=_roles,
    role_names=_role_names,
    checkpoints=True,
    produces_model=True,
    printer_columns=TRAINING_COLUMNS,
    results=(("perplexity", "held-out ppl {:.1f}"), ("finalLoss", "loss {:.3f}")),
    base_model_field="model.source",
)
