"""The Grafana dashboard and the alerts use only metrics the code exports, in valid PromQL.

Exported names come from the code itself: the trainer's `crucible.trainer.metrics.GAUGES` and the
operator's `crucible.operator.metrics.OperatorMetrics` registry. Every dashboard query is checked
by `promtool check rules` (as a recording rule), so a typo in PromQL fails here, not at 3 a.m.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import CHART, rule_groups

from waits import scaled

DASHBOARD = CHART / "files" / "dashboards" / "crucible-training.json"
METRIC = re.compile(r"\b(crucible_[a-z0-9_]+)\b")
# What a platform team reads per run (issue 7): panel titles of the dashboard.
REQUIRED_PANELS = [
    "Loss", "Learning rate", "Gradient norm", "Tokens per second", "MFU", "Goodput",
    "Restarts by reason", "Attempts per run", "Checkpoint age", "Checkpoint save time",
]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]


def _trainer_metric_names() -> set[str]:
    from crucible.trainer.metrics import GAUGES, MOE_GAUGES

    return set(GAUGES) | set(MOE_GAUGES)


def _operator_metric_names() -> set[str]:
    module = pytest.importorskip("crucible.operator.metrics", reason="the operator's metrics module has not landed")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    module.OperatorMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


def _used(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = _trainer_metric_names() | _operator_metric_names()
    unknown_dashboard = _used(_dashboard_exprs()) - exported
    unknown_alerts = _used(_alert_exprs()) - exported
    assert not unknown_dashboard, f"dashboard queries metrics nothing exports: {sorted(unknown_dashboard)}"
    assert not unknown_alerts, f"alerts query metrics nothing exports: {sorted(unknown_alerts)}"


def test_every_trainer_metric_is_on_the_dashboard() -> None:
    missing = _trainer_metric_names() - _used(_dashboard_exprs())
    assert not missing, f"exported but never shown: {sorted(missing)}"


def test_every_operator_metric_is_on_the_dashboard() -> None:
    shown = _used(_dashboard_exprs())
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in _operator_metric_names()}
    missing = {f for f in families if not any(s.startswith(f) for s in shown)}
    assert not missing, f"exported but never shown: {sorted(missing)}"


def test_dashboard_has_the_panels_a_platform_team_needs_per_run() -> None:
    dash = _dashboard()
    titles = [p["title"] for p in _panels()]
    assert [t for t in REQUIRED_PANELS if t not in titles] == []
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["multi"] and variables["run"]["includeAll"]
    assert "crucible_train_step" in variables["run"]["definition"]
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: no description"
        for target in panel["targets"]:
            if "crucible_train_" in target["expr"] or "crucible_checkpoint_" in target["expr"]:
                assert '$run' in target["expr"], f"{panel['title']}: trainer query not filtered per run"
    assert dash["uid"] == "crucible-training" and len(dash["uid"]) <= 40


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    def concrete(expr: str) -> str:
        return (expr.replace("$__rate_interval", "1m").replace("$__range", "6h")
                .replace("$namespace", ".*").replace("$run", ".*"))

    rules = [{"record": f"crucible:dashboard_query:{i}", "expr": concrete(e)} for i, e in enumerate(_dashboard_exprs())]
    variable_queries = [v["definition"] for v in _dashboard()["templating"]["list"] if v["type"] == "query"]
    for i, q in enumerate(variable_queries):
        inner = re.fullmatch(r"label_values\((.+), *([a-z_]+)\)", q)
        assert inner, f"unexpected variable query {q}"
        rules.append({"record": f"crucible:dashboard_variable:{i}", "expr": concrete(inner.group(1))})
    (tmp_path / "dashboard-queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "dashboard-queries.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=scaled(60), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: promtool parses the expressions, it does not just read YAML."""
    broken = {"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "max by (run (crucible_train_loss)"}]}]}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = subprocess.run([promtool, "check", "rules", "broken.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=scaled(60), check=False)
    assert result.returncode != 0
