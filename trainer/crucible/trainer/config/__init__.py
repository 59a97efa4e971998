"""Typed configuration of every stage (no torch at import time)."""

from crucible.trainer.config.common import (
    KINDS,
    FailurePolicy,
    InputRef,
    MetricsConfig,
    OutputConfig,
    RunRef,
    S3Config,
    StorageConfig,
    StrictModel,
    parse_duration,
)
from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.config.stages import (
    KIND_TO_STAGE,
    STAGE_CONFIGS,
    FinetuneConfig,
    PreferenceConfig,
    PretrainConfig,
    QuantizeConfig,
    parse_stage_spec,
)
from crucible.trainer.config.training import (
    CheckpointConfig,
    LossSpikeConfig,
    ModelConfig,
    OptimizerConfig,
    TrainingConfig,
)

__all__ = [
    "KINDS",
    "KIND_TO_STAGE",
    "STAGE_CONFIGS",
    "CheckpointConfig",
    "DataPipelineConfig",
    "FailurePolicy",
    "FinetuneConfig",
    "InputRef",
    "LossSpikeConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OutputConfig",
    "PreferenceConfig",
    "PretrainConfig",
    "QuantizeConfig",
    "RunRef",
    "S3Config",
    "StorageConfig",
    "StrictModel",
    "TrainingConfig",
    "parse_duration",
    "parse_stage_spec",
]
