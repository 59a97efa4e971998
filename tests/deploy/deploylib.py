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

# Every value override the tests render with, beyond the defaults: charts/crucible/ci/*-values.yaml
# (chart-testing's convention, so `ct lint` / `ct install` use the same cases). Lint, render,
# schema and Kubernetes validation all run over this table.
VALUE_CASES: dict[str, dict[str, Any]] = {"defaults": {}} | {
    path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text()) or {}
    for path in sorted((CHART / "ci").glob("*-values.yaml"))
}
MONITORING_ON: dict[str, Any] = VALUE_CASES["monitoring-on"]


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
