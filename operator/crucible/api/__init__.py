"""The Crucible resources as typed models (group crucible.dev, version v1alpha1), one module
per kind, each registering its :class:`~crucible.api.registry.Kind`; kinds from elsewhere are
loaded from ``$CRUCIBLE_KINDS`` and the ``crucible.kinds`` entry points (see registry)."""

from crucible.api import datapipeline, finetunerun, preferencerun, pretrainrun, quantizejob
from crucible.api.common import API_VERSION, GROUP, PHASES, VERSION, Resource, RunStatus
from crucible.api.datapipeline import DataPipeline
from crucible.api.finetunerun import FinetuneRun
from crucible.api.preferencerun import PreferenceRun
from crucible.api.pretrainrun import PretrainRun
from crucible.api.quantizejob import QuantizeJob
from crucible.api.registry import MODELS, Kind, kind_of, kinds, load_plugins, register

for _module in (datapipeline, pretrainrun, finetunerun, preferencerun, quantizejob):
    register(_module.KIND)

KIND_MODELS: dict[str, type[Resource]] = MODELS
"""KIND -> model of every registered kind (the registry's own dict: plug-in kinds appear in it)."""

load_plugins()

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND_MODELS",
    "PHASES",
    "VERSION",
    "DataPipeline",
    "FinetuneRun",
    "Kind",
    "PreferenceRun",
    "PretrainRun",
    "QuantizeJob",
    "Resource",
    "RunStatus",
    "kind_of",
    "kinds",
]
