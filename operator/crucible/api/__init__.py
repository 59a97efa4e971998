"""The five Crucible resources as typed models (group crucible.dev, version v1alpha1)."""

from crucible.api.common import API_VERSION, GROUP, PHASES, VERSION, Resource, RunStatus
from crucible.api.datapipeline import DataPipeline
from crucible.api.finetunerun import FinetuneRun
from crucible.api.preferencerun import PreferenceRun
from crucible.api.pretrainrun import PretrainRun
from crucible.api.quantizejob import QuantizeJob

KIND_MODELS: dict[str, type[Resource]] = {
    m.KIND: m for m in (DataPipeline, PretrainRun, FinetuneRun, PreferenceRun, QuantizeJob)
}

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND_MODELS",
    "PHASES",
    "VERSION",
    "DataPipeline",
    "FinetuneRun",
    "PreferenceRun",
    "PretrainRun",
    "QuantizeJob",
    "Resource",
    "RunStatus",
]
