"""The generated CRDs: in sync with the models, valid Kubernetes objects, structural, and their CEL
rules agree with the models on good and bad objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from crucible.api import KIND_MODELS
from crucible.api.crdgen import render_all
from crucible.api.validate import load_resources
from crucible.cli import main


def crds(repo: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((repo / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def spec_schema(repo: Path, kind: str) -> dict[str, Any]:
    return crds(repo)[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_crds_directory_is_up_to_date(repo: Path) -> None:
    assert main(["crds", "--out", str(repo / "crds"), "--check"]) == 0, "crds/ is stale: run `make crds`"
    assert set(render_all()) == {p.name for p in (repo / "crds").glob("*.yaml")}


def test_one_crd_per_kind_with_names_category_and_status(repo: Path) -> None:
    found = crds(repo)
    assert set(found) == set(KIND_MODELS)
    for kind, crd in found.items():
        names = crd["spec"]["names"]
        assert "crucible" in names["categories"], kind
        assert names["shortNames"], kind
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        columns = {c["name"] for c in version["additionalPrinterColumns"]}
        assert {"Phase", "Restarts", "Age"} <= columns, kind
        if kind in ("PretrainRun", "FinetuneRun", "PreferenceRun"):
            assert {"Step", "Loss"} <= columns


@pytest.mark.parametrize("kind", sorted(KIND_MODELS))
def test_crd_validates_against_apiextensions_schema(repo: Path, kind: str) -> None:
    kubernetes_validate.validate(crds(repo)[kind], "1.31", strict=True)


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("kind", sorted(KIND_MODELS))
def test_schema_is_structural(repo: Path, kind: str) -> None:
    root = crds(repo)[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{kind}{path} has no type"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") not in ("object", "array") and not path.endswith(("[]", "{}")):
            assert "description" in node or path.startswith((".apiVersion", ".kind", ".metadata")), f"{kind}{path}"


def test_examples_match_the_crd_schemas(repo: Path, cel_failures: Any) -> None:
    result = load_resources([repo / "examples"])
    assert not result.problems
    for item in result.resources:
        doc = yaml.safe_load_all(Path(item.file).read_text())
        raw = next(d for d in doc if d and d.get("metadata", {}).get("name") == item.resource.name)
        schema = crds(repo)[item.resource.kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        jsonschema.Draft4Validator(schema).validate(raw)
        assert cel_failures(schema["properties"]["spec"], raw["spec"]) == [], item.file


GOOD_PRETRAIN = {
    "data": {"fromRun": {"kind": "DataPipeline", "name": "d"}},
    "model": {"hiddenSize": 64, "numHeads": 4, "numKvHeads": 2},
    "training": {"maxSteps": 10, "seqLen": 64, "globalBatchTokens": 16384},
    "checkpoint": {"interval": "auto"},
    "resources": {"nodes": 2, "gpusPerNode": 8, "nodePool": "h100"},
    "scheduling": {"gang": "kueue", "queue": "q"},
    "failurePolicy": {"backoffSeconds": 10, "maxBackoffSeconds": 100},
}


def mutate(base: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


_DELETE = object()

# (field to change, new value, fragment of the CEL message that must fire)
CEL_CASES = [
    ("data.uri", "s3://b/x", "exactly one of fromRun or uri"),
    ("data.fromRun", {"kind": "QuantizeJob", "name": "q"}, "data.fromRun.kind must be one of DataPipeline"),
    ("resources.nodePool", _DELETE, "gpusPerNode > 0 needs nodePool"),
    ("scheduling.queue", _DELETE, "gang kueue needs queue"),
    ("training.maxSteps", _DELETE, "set maxSteps or maxTokens"),
    ("training.globalBatchTokens", 32, "at least one sequence"),
    ("failurePolicy.maxBackoffSeconds", 5, "maxBackoffSeconds must be at least backoffSeconds"),
    ("model.numHeads", 3, "hiddenSize must be divisible by numHeads"),
    ("model.numKvHeads", 3, "numHeads must be divisible by numKvHeads"),
    ("checkpoint.interval", "sometimes", "positive number of steps or auto"),
    ("training.globalBatchTokens", 1000, "multiple of microBatchSize × seqLen"),
    ("training.seqLen", 4096, "longer than model.maxPositionEmbeddings"),
    ("checkpoint.uri", "/tmp/ckpt", "cannot keep checkpoints in /tmp"),
    ("resources.env", {"A=B": "x"}, "env names must be valid"),
    ("resources.secretEnv", {"A=B": {"secret": "s", "key": "k"}}, "secretEnv names must be valid"),
]


def test_cel_accepts_a_good_object(repo: Path, cel_failures: Any) -> None:
    assert cel_failures(spec_schema(repo, "PretrainRun"), GOOD_PRETRAIN) == []


@pytest.mark.parametrize(("dotted", "value", "fragment"), CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_cel_rejects_what_the_models_reject(repo: Path, cel_failures: Any, dotted: str, value: Any, fragment: str) -> None:
    bad = mutate(GOOD_PRETRAIN, dotted, value)
    failures = cel_failures(spec_schema(repo, "PretrainRun"), bad)
    assert any(fragment in message for _, message in failures), failures
    # the pydantic model rejects the same object
    doc = {"apiVersion": "crucible.dev/v1alpha1", "kind": "PretrainRun", "metadata": {"name": "p"}, "spec": bad}
    with pytest.raises(ValueError):
        KIND_MODELS["PretrainRun"].model_validate(doc)


def test_cel_name_rule_on_the_root(repo: Path) -> None:
    import celpy

    root = crds(repo)["PretrainRun"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (rule,) = [r for r in root["x-kubernetes-validations"] if "metadata.name" in r["rule"]]
    env = celpy.Environment()
    program = env.program(env.compile(rule["rule"]))
    for name, ok in (("llama", True), ("a-1", True), ("1a", False), ("-a", False), ("a" * 64, False)):
        assert bool(program.evaluate({"self": celpy.json_to_cel({"metadata": {"name": name}})})) is ok, name


def test_cel_immutable_fields_on_update(repo: Path, cel_failures: Any) -> None:
    schema = spec_schema(repo, "PretrainRun")
    changed = mutate(GOOD_PRETRAIN, "data.fromRun", {"kind": "DataPipeline", "name": "other"})
    failures = cel_failures(schema, changed, old=GOOD_PRETRAIN)
    assert any("data is immutable" in m for _, m in failures)
    # a mutable field (suspend) may change
    assert cel_failures(schema, mutate(GOOD_PRETRAIN, "suspend", True), old=GOOD_PRETRAIN) == []


@pytest.mark.parametrize(
    ("kind", "spec", "fragment"),
    [
        ("FinetuneRun", {"model": {"uri": "/m"}, "dataset": {"uri": "/d"}, "training": {"maxSteps": 1}, "method": "qlora"},
         "qlora needs CUDA"),
        ("FinetuneRun", {"model": {"uri": "/m"}, "dataset": {"uri": "/d"}, "training": {"maxSteps": 1},
                         "revisions": {"follow": "model"}}, "follows the revisions of the run in model.fromRun"),
        ("FinetuneRun", {"model": {"uri": "/m"}, "dataset": {"uri": "/d"}, "training": {"maxSteps": 1},
                         "method": "lora", "mergeAdapter": False, "revisions": {"follow": "dataset"}},
         "set mergeAdapter: true"),
        ("QuantizeJob", {"model": {"uri": "/m"}, "method": "awq"}, "gptq and awq need CUDA"),
        ("QuantizeJob", {"model": {"uri": "/m"}, "resources": {"nodes": 2}}, "runs as one pod"),
        ("PretrainRun", {"data": {"uri": "/d"}, "training": {"maxSteps": 1}, "resources": {"nodes": 2},
                         "checkpoint": {"uri": "/tmp/ckpt"}}, "cannot keep checkpoints in /tmp"),
    ],
)
def test_cel_kind_rules(repo: Path, cel_failures: Any, kind: str, spec: dict[str, Any], fragment: str) -> None:
    failures = cel_failures(spec_schema(repo, kind), spec)
    assert any(fragment in m for _, m in failures), failures
