"""Helpers of the deploy tests: render the Helm chart with Helm's own Go code (helm-python-sdk)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "crucible"
RELEASE = "crucible"
NAMESPACE = "crucible-system"

# Every value override the tests render with, beyond the defaults: monitoring on, images pinned,
# resources and namespaces changed. One table so lint, render, schema and Kubernetes validation
# all see the same cases.
MONITORING_ON: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "trainerMetrics": {"podMonitor": {"enabled": True, "namespaces": ["ml-team-a", "ml-team-b"]}},
    "prometheusRule": {
        "enabled": True,
        "runbookBaseURL": "https://runbooks.example.com/crucible",
        "additionalAlertLabels": {"team": "ml-platform"},
    },
}
VALUE_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring-on": MONITORING_ON,
    "monitoring-off": {"grafanaDashboard": {"enabled": False}, "metrics": {"service": {"enabled": False}}},
    "overrides": {
        "fullnameOverride": "ml-operator",
        "image": {
            "repository": "registry.example.com/ml/crucible-operator",
            "tag": "1.2.3",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "trainerImage": {"repository": "registry.example.com/ml/crucible-trainer", "tag": "1.2.3-cu128"},
        "resources": {"requests": {"cpu": "250m", "memory": "384Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "operator": {
            "watchNamespaces": ["ml-team-a", "ml-team-b"],
            "storageRoot": "s3://ml-artifacts/crucible",
            "storageSecret": "crucible-s3",
            "logLevel": "debug",
            "extraEnv": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"}],
        },
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/crucible"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "crds": {"keep": False},
        **MONITORING_ON,
    },
    "no-peering-no-crds": {"operator": {"peering": {"enabled": False}}, "crds": {"install": False}},
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads floats the way Kubernetes (YAML 1.2) does: `1e-08` is a number."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=Yaml12Loader) if doc]


@functools.cache
def _render_cached(values_yaml: str) -> dict[str, str]:
    import helm_python as helm

    values = yaml.safe_load(values_yaml) or {}
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Rendered templates by path (NOTES.txt included), after values.schema.json accepted the values."""
    return dict(_render_cached(yaml.safe_dump(values or {}, sort_keys=True)))


def render_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with these values."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".yaml"):
            objects.extend(load_all(text))
    return objects


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The PrometheusRule's groups as a Prometheus rule file (what promtool and Prometheus read)."""
    rule = one(render_objects(merge({"prometheusRule": {"enabled": True}}, values or {})), "PrometheusRule")
    return rule["spec"]["groups"]
