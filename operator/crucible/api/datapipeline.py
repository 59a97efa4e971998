"""DataPipeline: raw text to clean, deduplicated, tokenized shards with a receipt."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from crucible.api.common import PlacementMixin, Resource
from crucible.api.pretrainrun import MODEL_KINDS
from crucible.trainer.config.data import DataPipelineConfig


class DataPipelineSpec(DataPipelineConfig, PlacementMixin):
    """Spec of a DataPipeline: the trainer's DataPipelineConfig plus placement."""


class DataPipeline(Resource):
    """Raw text to clean, deduplicated, tokenized shards with a receipt."""

    KIND: ClassVar[str] = "DataPipeline"
    PLURAL: ClassVar[str] = "datapipelines"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("dp",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer.source": ("DataPipeline", *MODEL_KINDS)}
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("sources", "tokenizer")
    EXTRA_CEL: ClassVar[list] = []

    spec: DataPipelineSpec = Field(description="What to process and how.")
