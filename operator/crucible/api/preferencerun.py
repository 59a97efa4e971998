"""PreferenceRun: DPO (sigmoid, IPO, hinge) against a frozen reference, or a reward model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from crucible.api.common import PlacementMixin, Resource
from crucible.api.pretrainrun import MODEL_KINDS
from crucible.trainer.config.stages import PreferenceConfig


class PreferenceRunSpec(PreferenceConfig, PlacementMixin):
    """Spec of a PreferenceRun: the trainer's PreferenceConfig plus placement."""


class PreferenceRun(Resource):
    """Preference optimization (DPO, IPO, hinge) against a frozen reference, or a reward model."""

    KIND: ClassVar[str] = "PreferenceRun"
    PLURAL: ClassVar[str] = "preferenceruns"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("prr",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"model": MODEL_KINDS, "reference": MODEL_KINDS}
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("model", "reference", "dataset", "method")
    EXTRA_CEL: ClassVar[list] = []

    spec: PreferenceRunSpec = Field(description="What to align and where.")
