"""Generate the CustomResourceDefinitions from the pydantic models (``crucible crds``).

Pydantic emits JSON Schema 2020-12 with ``$ref``s; Kubernetes wants a *structural* OpenAPI v3
schema: every node typed, no ``$ref``, no ``anyOf`` that changes the type, no
``additionalProperties: false``. This module converts one into the other and attaches the CEL
``x-kubernetes-validations`` that mirror the models' cross-field validators, the fromRun
kind restrictions and the fields that are immutable once a run exists.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from crucible.api import KIND_MODELS, Resource
from crucible.api.common import GROUP, NAME_CEL, RESOURCES_CEL, SCHEDULING_CEL, VERSION, RunStatus, cel
from crucible.api.registry import kind_of

# CEL rules attached wherever a model of this name appears in a schema.
MODEL_CEL: dict[str, list[dict[str, str]]] = {
    "InputRef": [cel("has(self.fromRun) != has(self.uri)", "set exactly one of fromRun or uri")],
    "Resources": RESOURCES_CEL,
    "Scheduling": SCHEDULING_CEL,
    "TrainingConfig": [
        cel("has(self.maxSteps) || has(self.maxTokens)", "set maxSteps or maxTokens"),
        cel(
            "!has(self.globalBatchTokens) || !has(self.seqLen) || self.globalBatchTokens >= self.seqLen",
            "globalBatchTokens must hold at least one sequence of seqLen",
            ".globalBatchTokens",
        ),
        cel(
            "!has(self.globalBatchTokens) || !has(self.seqLen) || !has(self.microBatchSize) || "
            "self.globalBatchTokens % (self.microBatchSize * self.seqLen) == 0",
            "globalBatchTokens must be a multiple of microBatchSize × seqLen",
            ".globalBatchTokens",
        ),
    ],
    "FailurePolicy": [
        cel(
            "!has(self.maxBackoffSeconds) || !has(self.backoffSeconds) || self.maxBackoffSeconds >= self.backoffSeconds",
            "maxBackoffSeconds must be at least backoffSeconds",
            ".maxBackoffSeconds",
        ),
    ],
    "ModelConfig": [
        cel(
            "!has(self.hiddenSize) || !has(self.numHeads) || self.hiddenSize % self.numHeads == 0",
            "hiddenSize must be divisible by numHeads",
            ".hiddenSize",
        ),
        cel(
            "!has(self.numKvHeads) || !has(self.numHeads) || self.numHeads % self.numKvHeads == 0",
            "numHeads must be divisible by numKvHeads",
            ".numKvHeads",
        ),
    ],
    "CheckpointConfig": [
        cel(
            "!has(self.interval) || (type(self.interval) == int ? self.interval >= 1 : self.interval == 'auto')",
            "interval must be a positive number of steps or auto",
            ".interval",
        ),
    ],
}

_DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator"}


def _deref(node: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s, keeping the model name in ``x-crucible-model`` for CEL attachment."""
    if isinstance(node, list):
        return [_deref(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = _deref(copy.deepcopy(defs[name]), defs)
        target["x-crucible-model"] = name
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(_deref(extra, defs))
        return target
    return {k: _deref(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turn one (dereferenced) JSON Schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        nullable = len(non_null) < len(any_of)
        types = {s.get("type") for s in non_null}
        if len(non_null) == 1:
            merged = {**non_null[0], **{k: v for k, v in node.items() if k != "default" or v is not None}}
            node = merged
            if nullable and node.get("default", "x") is None:
                node.pop("default")
        elif types == {"integer", "string"}:
            ints = next(s for s in non_null if s.get("type") == "integer")
            node = {k: v for k, v in node.items() if k in ("description", "default")}
            node["x-kubernetes-int-or-string"] = True
            for key in ("minimum", "maximum"):
                if key in ints:
                    node[key] = ints[key]
        else:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        if node.get("default") is None:
            node.pop("default", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        values = node["enum"]
        node["type"] = "integer" if all(isinstance(v, int) for v in values) else "string"
    for bound, strict in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[strict] = node.pop(bound)
            node[bound] = True
    model = node.pop("x-crucible-model", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key.startswith("x-crucible"):
            continue
        if key == "properties":
            out["properties"] = {k: _structural(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        elif key == "default" and isinstance(value, dict | list):
            continue  # object defaults live in the models; Kubernetes would freeze them into objects
        else:
            out[key] = value
    add = node.get("additionalProperties")
    if isinstance(add, dict):
        out["type"] = "object"
        if add:
            out["additionalProperties"] = _structural(add)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "object" and "properties" not in node and add is not False:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        if out.get("x-kubernetes-preserve-unknown-fields"):
            out["type"] = "object"
        else:
            raise ValueError(f"schema node has no type: {node}")
    if model and model in MODEL_CEL:
        out.setdefault("x-kubernetes-validations", []).extend(copy.deepcopy(MODEL_CEL[model]))
    return out


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def spec_schema(model: type[Resource]) -> dict[str, Any]:
    """The structural schema of ``spec`` with every CEL rule attached."""
    spec_model = model.model_fields["spec"].annotation
    assert isinstance(spec_model, type)
    raw = spec_model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    schema = _structural(_deref(raw, defs))
    rules = schema.setdefault("x-kubernetes-validations", [])
    for path, kinds in model.INPUTS.items():
        target = _at(schema, path)
        kind_list = ", ".join(f"'{k}'" for k in kinds)
        target.setdefault("x-kubernetes-validations", []).append(
            cel(
                f"!has(self.fromRun) || self.fromRun.kind in [{kind_list}]",
                f"{path}.fromRun.kind must be one of {', '.join(kinds)}",
                ".fromRun.kind",
            )
        )
    for path in getattr(model, "IMMUTABLE", ()):
        target = _at(schema, path)
        target.setdefault("x-kubernetes-validations", []).append(
            cel("self == oldSelf", f"{path} is immutable: create a new resource to change it")
        )
    rules.extend(copy.deepcopy(getattr(model, "EXTRA_CEL", [])))
    if not rules:
        schema.pop("x-kubernetes-validations")
    return schema


def status_schema() -> dict[str, Any]:
    raw = RunStatus.model_json_schema(by_alias=True, mode="serialization")
    defs = raw.pop("$defs", {})
    return _structural(_deref(raw, defs))


def printer_columns(kind: str) -> list[dict[str, Any]]:
    """Phase, the kind's own columns (``Kind.printer_columns``), Restarts, Age."""
    cols: list[dict[str, Any]] = [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]
    cols += [dict(c) for c in kind_of(kind).printer_columns]
    cols += [
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return cols


def build_crd(model: type[Resource]) -> dict[str, Any]:
    plural = model.PLURAL
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "crucible", "app.kubernetes.io/part-of": "crucible"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": model.KIND,
                "listKind": f"{model.KIND}List",
                "plural": plural,
                "singular": model.KIND.lower(),
                "shortNames": list(model.SHORT_NAMES),
                "categories": ["crucible", "all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(model.KIND),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-validations": [copy.deepcopy(NAME_CEL)],
                            "description": (model.__doc__ or model.KIND).strip().splitlines()[0],
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(model),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    out = {}
    for model in KIND_MODELS.values():
        text = yaml.safe_dump(build_crd(model), sort_keys=False, width=120)
        out[f"{GROUP}_{model.PLURAL}.yaml"] = "# Generated by `crucible crds` from crucible.api; do not edit.\n" + text
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="crds", help="directory to write one YAML file per kind (default: crds)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files in --out differ from the models")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    files = render_all()
    if args.check:
        stale = [n for n, text in files.items() if not (out / n).exists() or (out / n).read_text() != text]
        extra = sorted(p.name for p in out.glob("*.yaml") if p.name not in files) if out.exists() else []
        for name in stale:
            print(f"{out / name}: stale; run `crucible crds --out {out}`")
        for name in extra:
            print(f"{out / name}: not generated from any model; delete it")
        return 1 if stale or extra else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0
