"""FinetuneRun: supervised fine-tuning (full, LoRA or QLoRA) with prompt tokens masked."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from crucible.api.common import NODE_LOCAL_CHECKPOINT_CEL, PlacementMixin, Resource, cel
from crucible.api.pretrainrun import MODEL_KINDS, TRAINING_COLUMNS
from crucible.api.registry import Kind, one_role
from crucible.api.revisions import FinetuneRevisions
from crucible.trainer.config.stages import FinetuneConfig


class FinetuneRunSpec(FinetuneConfig, PlacementMixin):
    """Spec of a FinetuneRun: the trainer's FinetuneConfig plus placement and revisions."""

    revisions: FinetuneRevisions | None = Field(
        default=None,
        description="Refresh the model as its inputs change, every update logged in status.revisions: continue "
                    "from the previous revision on the new records of the dataset (follow: dataset), or fine-tune "
                    "each new revision of model.fromRun (follow: model); empty: a changed input starts the run over.",
    )

    @model_validator(mode="after")
    def _revisions_have_what_they_follow(self) -> FinetuneRunSpec:
        if self.revisions is None:
            return self
        if self.revisions.follow == "model" and self.model.from_run is None:
            raise ValueError("revisions.follow: model follows the revisions of the run in model.fromRun; set "
                             "model.fromRun (not model.uri), or use follow: dataset")
        if self.revisions.follow == "dataset" and self.method != "full" and not self.merge_adapter:
            raise ValueError("revisions.follow: dataset continues each revision from the previous revision's model, "
                             "and mergeAdapter: false writes an adapter, not a model; set mergeAdapter: true "
                             "(or method: full), or use follow: model")
        return self

    @model_validator(mode="after")
    def _qlora_gpu(self) -> FinetuneRunSpec:
        if self.method == "qlora" and self.resources.gpus_per_node == 0:
            raise ValueError("method: qlora needs CUDA (bitsandbytes 4-bit); set resources.gpusPerNode >= 1 or use method lora")
        return self


class FinetuneRun(Resource):
    """Supervised fine-tuning (full, LoRA or QLoRA) with prompt tokens masked from the loss."""

    KIND: ClassVar[str] = "FinetuneRun"
    PLURAL: ClassVar[str] = "finetuneruns"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ftr",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"model": MODEL_KINDS}
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("model", "dataset", "method")
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = [
        cel(
            "self.method != 'qlora' || (has(self.resources) && has(self.resources.gpusPerNode) && self.resources.gpusPerNode >= 1)",
            "method qlora needs CUDA: set resources.gpusPerNode >= 1 or use method lora",
            ".method",
        ),
        NODE_LOCAL_CHECKPOINT_CEL,
        cel("!has(self.revisions) || !has(self.revisions.follow) || self.revisions.follow != 'model' || "
            "has(self.model.fromRun)",
            "revisions.follow: model follows the revisions of the run in model.fromRun; set model.fromRun",
            ".revisions.follow"),
        cel("!has(self.revisions) || (has(self.revisions.follow) && self.revisions.follow == 'model') || "
            "self.method == 'full' || !has(self.mergeAdapter) || self.mergeAdapter",
            "revisions.follow: dataset continues from the previous revision's model; an adapter output "
            "(mergeAdapter: false) is not one: set mergeAdapter: true",
            ".revisions"),
    ]

    spec: FinetuneRunSpec = Field(description="What to fine-tune and where.")


_roles, _role_names = one_role("trainer")
KIND = Kind(
    FinetuneRun,
    entry=("-m", "crucible.trainer", "finetune"),
    roles=_roles,
    role_names=_role_names,
    checkpoints=True,
    produces_model=True,
    printer_columns=TRAINING_COLUMNS,
    results=(("evalLoss", "held-out loss {:.3f}"), ("finalLoss", "loss {:.3f}")),
)
