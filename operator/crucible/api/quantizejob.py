"""QuantizeJob: weight-only INT8/INT4 (GPTQ/AWQ on CUDA), evaluated before and after."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from crucible.api.common import PlacementMixin, Resource, cel, check_single_pod
from crucible.api.pretrainrun import MODEL_KINDS
from crucible.api.registry import Kind, one_role
from crucible.trainer.config.stages import QuantizeConfig


class QuantizeJobSpec(QuantizeConfig, PlacementMixin):
    """Spec of a QuantizeJob: the trainer's QuantizeConfig plus placement (one pod)."""

    @model_validator(mode="after")
    def _gpu_methods(self) -> QuantizeJobSpec:
        if self.method in ("gptq", "awq") and self.resources.gpus_per_node == 0:
            raise ValueError(f"method: {self.method} needs CUDA; set resources.gpusPerNode >= 1 or use int8/int4")
        if self.resources.nodes != 1:
            raise ValueError("resources.nodes: must be 1, a QuantizeJob runs as one pod")
        check_single_pod(self.resources, "QuantizeJob", "it quantizes on one device")
        if self.resources.topology is not None:
            raise ValueError("resources.topology: a QuantizeJob is one pod, there is nothing to place together; "
                             "remove it")
        return self


class QuantizeJob(Resource):
    """Weight-only INT8/INT4 quantization (GPTQ/AWQ on CUDA), evaluated before and after."""

    KIND: ClassVar[str] = "QuantizeJob"
    PLURAL: ClassVar[str] = "quantizejobs"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("qj",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": MODEL_KINDS,
        "evaluation.data": ("DataPipeline",),
    }
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("model", "method")
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = [
        cel(
            "!(self.method in ['gptq', 'awq']) || (has(self.resources) && has(self.resources.gpusPerNode) && self.resources.gpusPerNode >= 1)",
            "methods gptq and awq need CUDA: set resources.gpusPerNode >= 1 or use int8/int4",
            ".method",
        ),
        cel(
            "!has(self.resources) || !has(self.resources.nodes) || self.resources.nodes == 1",
            "a QuantizeJob runs as one pod: resources.nodes must be 1",
            ".resources.nodes",
        ),
    ]

    spec: QuantizeJobSpec = Field(description="What to quantize and how.")


_roles, _role_names = one_role("quantize", distributed=False)
KIND = Kind(
    QuantizeJob,
    entry=("-m", "crucible.trainer", "quantize"),
    roles=_roles,
    role_names=_role_names,
    produces_model=True,
    printer_columns=(
        {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
        {"name": "PPL-After", "type": "number", "jsonPath": ".status.results.perplexityAfter"},
    ),
    results=(("sizeBytesAfter", "size {}"), ("perplexityIncrease", "ppl {:+.2%}")),
    report_section="crucible.local.report:quantize_section",
)
