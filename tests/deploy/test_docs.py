"""The install section (docs/deploy.md, and README.md's short version) matches what the chart renders."""

from __future__ import annotations

import re
import shlex
from typing import Any

import helm_python as helm
import pytest
from deploylib import CHART, REPO, find, merge, one, render_objects, rule_groups

DOCS = [REPO / "docs" / "deploy.md", REPO / "README.md"]


def _shell_commands(text: str) -> list[str]:
    """Commands of ```bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command:
                out.append(command)
    return out


def _helm_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        if doc.exists():
            found += [(doc.name, shlex.split(c)) for c in _shell_commands(doc.read_text()) if c.startswith("helm ")]
    return found


def _values_of(argv: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        if arg == "--set":
            values = merge(values, helm.parse_set_string(argv[i + 1]))
        elif arg.startswith("--set="):
            values = merge(values, helm.parse_set_string(arg.removeprefix("--set=")))
        elif arg in ("-f", "--values") or arg.startswith("--set-"):
            pytest.fail(f"document {arg} in the install test too: {argv}")
    return values


def test_docs_install_with_the_chart_in_this_repository() -> None:
    commands = _helm_commands()
    assert any(argv[1] == "install" for _, argv in commands)
    assert any(argv[1] == "upgrade" for _, argv in commands)
    for doc, argv in commands:
        assert argv[1] in ("install", "upgrade", "uninstall", "test"), f"{doc}: {argv}"
        if argv[1] in ("install", "upgrade"):
            assert argv[3] == "charts/crucible" and (REPO / argv[3] / "Chart.yaml").exists(), f"{doc}: {argv}"
            assert "-n" in argv and argv[argv.index("-n") + 1] == "crucible-system", f"{doc}: {argv}"


def test_every_documented_helm_command_passes_the_schema_and_renders() -> None:
    release: dict[str, dict[str, Any]] = {}  # values of the release each document builds up
    for doc, argv in _helm_commands():
        if argv[1] not in ("install", "upgrade"):
            continue
        values = _values_of(argv)
        if "--reuse-values" in argv:
            values = merge(release.get(doc, {}), values)
        with helm.Chart.load(str(CHART)) as chart:
            chart.validate_schema(values)
        objects = render_objects(values)
        assert find(objects, "Deployment"), f"{doc}: {argv}"
        release[doc] = values
    # The documented monitoring upgrade really turns on all three Prometheus Operator objects.
    kinds = {o["kind"] for o in render_objects(release["deploy.md"])}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds


def test_documented_object_names_are_the_rendered_ones() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    objects = render_objects({})
    deployment = one(objects, "Deployment")["metadata"]["name"]
    assert f"rollout status deployment/{deployment}" in text
    service = one(objects, "Service")["metadata"]["name"]
    assert f"service/{service}:" in text
    dashboard = one(objects, "ConfigMap")["metadata"]["name"]
    assert f"`{dashboard}`" in text
    assert "`crucible-training`" in text  # the dashboard uid


def test_every_alert_has_a_runbook_section_the_runbook_links_point_at() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    headings = {h.strip() for h in re.findall(r"^#### (.+)$", text, re.M)}
    alerts = [r["alert"] for g in rule_groups() for r in g["rules"]]
    assert set(alerts) <= headings, f"alerts without a section: {sorted(set(alerts) - headings)}"


def test_files_the_docs_point_at_exist() -> None:
    for doc in DOCS:
        if not doc.exists():
            continue
        for path in set(re.findall(r"\b((?:examples|images|charts)/[\w./-]+\.(?:yaml|Dockerfile))\b", doc.read_text())):
            assert (REPO / path).exists(), f"{doc.name} mentions {path}, which does not exist"


def test_documented_metric_names_are_exported() -> None:
    from crucible.trainer.metrics import GAUGES

    operator_metrics = pytest.importorskip("crucible.operator.metrics")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    operator_metrics.OperatorMetrics(registry)
    families = {f.name for f in registry.collect()}
    exported = set(GAUGES) | families | {f"{f}_total" for f in families}
    text = (REPO / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"`(crucible_[a-z_]+)", text))
    # `_step` style shorthands after crucible_train_loss expand to crucible_train_<name>.
    named |= {f"crucible_train{m}" for m in re.findall(r"`(_[a-z_]+)`", text)}
    assert named and named <= exported, f"documented but not exported: {sorted(named - exported)}"
