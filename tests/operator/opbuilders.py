"""Builders of real resource instances for table-driven tests (no Mock objects)."""

from __future__ import annotations

import copy
from typing import Any

from crucible.api import KIND_MODELS, Resource
from crucible.api.common import RunStatus

API = "crucible.dev/v1alpha1"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def manifest(kind: str, name: str, spec: dict[str, Any], namespace: str | None = "ml",
             status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}
    if namespace:
        obj["metadata"]["namespace"] = namespace
    if status is not None:
        obj["status"] = status
    return obj


def pretrain_spec(*, nodes: int = 1, gpus: int = 0, data: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data": data or {"uri": "s3://corpus/shards"},
        "training": {"seqLen": 64, "globalBatchTokens": 512, "microBatchSize": 2, "maxSteps": 20},
        "resources": {"nodes": nodes, "gpusPerNode": gpus},
        "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 1, "maxBackoffSeconds": 4, "hangTimeout": "10s"},
    }
    if gpus:
        spec["resources"]["nodePool"] = "h100"
    return _deep_merge(spec, over)


def make_pretrain_run(name: str = "pt", *, nodes: int = 1, gpus: int = 0, namespace: str | None = "ml",
                      status: dict[str, Any] | None = None, **over: Any) -> Resource:
    return build(manifest("PretrainRun", name, pretrain_spec(nodes=nodes, gpus=gpus, **over), namespace, status))


def finetune_spec(model: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    spec = {
        "model": model or {"uri": "s3://models/base"},
        "dataset": {"uri": "s3://sft/data.jsonl"},
        "training": {"seqLen": 64, "globalBatchTokens": 256, "microBatchSize": 2, "maxSteps": 5},
    }
    return _deep_merge(spec, over)


def preference_spec(model: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    spec = {
        "model": model or {"uri": "s3://models/sft"},
        "dataset": {"uri": "s3://pref/pairs.jsonl"},
        "training": {"seqLen": 64, "globalBatchTokens": 256, "microBatchSize": 2, "maxSteps": 5},
    }
    return _deep_merge(spec, over)


def quantize_spec(model: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    return _deep_merge({"model": model or {"uri": "s3://models/dpo"}, "method": "int8"}, over)


def data_spec(workers: int = 1, **over: Any) -> dict[str, Any]:
    return _deep_merge({"sources": [{"name": "web", "uri": "s3://raw/web/*.jsonl"}], "workers": workers}, over)


SPECS = {
    "DataPipeline": data_spec,
    "PretrainRun": pretrain_spec,
    "FinetuneRun": finetune_spec,
    "PreferenceRun": preference_spec,
    "QuantizeJob": quantize_spec,
}


def make(kind: str, name: str, namespace: str | None = "ml", **over: Any) -> Resource:
    return build(manifest(kind, name, SPECS[kind](**over), namespace))


def build(obj: dict[str, Any]) -> Resource:
    return KIND_MODELS[obj["kind"]].model_validate(obj)


def make_status(**fields: Any) -> RunStatus:
    return RunStatus.model_validate(fields)
