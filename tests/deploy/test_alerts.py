"""The PrometheusRule's alerts, run through the real Prometheus tools (Debian's `prometheus` package).

`promtool check rules` on the rule file the chart renders, and `promtool test rules` with
synthetic series: each alert fires when it should and stays silent when it should not. Cases are
a table; `promtool` evaluates the shipped expressions (thresholds from values.yaml), so these
tests are about the chart's real rules, not a copy of them.
"""

from __future__ import annotations

import copy
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import rule_groups

from waits import scaled

ALERTS = [
    "CrucibleLossSpike",
    "CrucibleTrainingStalled",
    "CrucibleThroughputCollapse",
    "CrucibleRestartStorm",
    "CrucibleRunFailed",
]
# What the PodMonitor's relabelling gives every trainer series.
RUN = {
    "namespace": "ml-research",
    "run": "llama-1b",
    "kind": "PretrainRun",
    "attempt": "0",
    "pod": "llama-1b-0-0-abcde",
    "node": "gpu-node-7",
    "job": "crucible-trainers",
    "instance": "10.2.0.17:9400",
}
OTHER_RUN = {**RUN, "run": "llama-8b", "pod": "llama-8b-0-0-fghij", "instance": "10.2.0.18:9400"}


def series(name: str, values: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    return {"series": f"{name}{{{selector}}}", "values": values}


@dataclass
class Case:
    """Synthetic series (1m apart) and, at each evaluation time, the alerts expected firing."""

    id: str
    alert: str
    input: list[dict[str, str]]
    # eval time -> label sets of the alerts firing then (empty: silent, pending included)
    expect: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def firing(severity: str, labels: dict[str, str]) -> list[dict[str, str]]:
    return [{"severity": severity, **labels}]


CASES = [
    # --- loss spike: ratio to the run's own 30m average, NaN, or the trainer's detector
    Case("loss-jumps-5x", "CrucibleLossSpike",
         [series("crucible_train_loss", "2x30 9x5", RUN)],
         {"25m": [], "31m": firing("warning", RUN), "33m": firing("warning", RUN)}),
    Case("loss-recovers-after-rollback", "CrucibleLossSpike",
         [series("crucible_train_loss", "2x30 9 2x10", RUN)],
         {"31m": firing("warning", RUN), "35m": []}),
    Case("loss-descending-normally-is-silent", "CrucibleLossSpike",
         [series("crucible_train_loss", "11-0.1x90", RUN)],
         {"30m": [], "60m": [], "90m": []}),
    Case("noisy-loss-is-silent", "CrucibleLossSpike",
         [series("crucible_train_loss", "2.0 2.4 1.8 2.6 2.1 1.9 2.8 2.0 2.3 1.7 " * 6, RUN)],
         {"20m": [], "40m": [], "59m": []}),
    Case("loss-becomes-nan", "CrucibleLossSpike",
         [series("crucible_train_loss", "2x10 NaN NaN NaN", RUN)],
         {"9m": [], "11m": firing("warning", RUN)}),
    Case("trainer-detector-counted-a-spike", "CrucibleLossSpike",
         [series("crucible_train_loss", "2x70", RUN),
          series("crucible_train_loss_spikes_total", "0x20 1x50", RUN)],
         {"15m": [], "25m": firing("warning", RUN), "55m": []}),
    Case("only-the-spiking-run-alerts", "CrucibleLossSpike",
         [series("crucible_train_loss", "2x30 9x5", RUN),
          series("crucible_train_loss", "3x35", OTHER_RUN)],
         {"32m": firing("warning", RUN)}),
    # --- stalled: no step progress for 20m while the series is up (for: 5m)
    Case("step-stops-moving", "CrucibleTrainingStalled",
         [series("crucible_train_step", "0+10x30 300x60", RUN)],
         {"45m": [], "52m": [], "56m": firing("critical", RUN), "80m": firing("critical", RUN)}),
    Case("steady-progress-is-silent", "CrucibleTrainingStalled",
         [series("crucible_train_step", "0+1x120", RUN)],
         {"60m": [], "119m": []}),
    Case("slow-steps-still-progress", "CrucibleTrainingStalled",
         [series("crucible_train_step", "0x15 1x15 2x15 3x15 4x15", RUN)],
         {"40m": [], "70m": []}),
    Case("new-attempt-not-stepping-yet-is-silent", "CrucibleTrainingStalled",
         [series("crucible_train_step", "_x60 0x20", RUN)],
         {"75m": [], "79m": []}),
    Case("finished-run-goes-stale-and-is-silent", "CrucibleTrainingStalled",
         [series("crucible_train_step", "0+10x30 _x60", RUN)],
         {"60m": [], "90m": []}),
    # --- throughput: below half the run's median over 1h, for 10m
    Case("throughput-collapses", "CrucibleThroughputCollapse",
         [series("crucible_train_tokens_per_second", "100000x60 30000x30", RUN)],
         {"65m": [], "72m": firing("warning", RUN), "80m": firing("warning", RUN)}),
    Case("short-dip-is-silent", "CrucibleThroughputCollapse",
         [series("crucible_train_tokens_per_second", "100000x60 30000x5 100000x30", RUN)],
         {"64m": [], "70m": [], "90m": []}),
    Case("warmup-ramp-is-silent", "CrucibleThroughputCollapse",
         [series("crucible_train_tokens_per_second", "0 1000 20000 60000 100000x80", RUN)],
         {"10m": [], "30m": [], "80m": []}),
    Case("gradual-20-percent-drift-is-silent", "CrucibleThroughputCollapse",
         [series("crucible_train_tokens_per_second", "100000-300x70", RUN)],
         {"40m": [], "70m": []}),
    # --- restart storm: >= 3 infrastructure restarts of a kind within 30m
    Case("three-restarts-in-fifteen-minutes", "CrucibleRestartStorm",
         # restarts at 4m, 8m and 12m ("0x3" is four samples: 0m..3m)
         [series("crucible_operator_restarts_total", "0x3 1x3 2x3 3x40", {"kind": "PretrainRun", "reason": "NodeLost"}),
          series("crucible_operator_restarts_total", "0x6 1x40", {"kind": "FinetuneRun", "reason": "NodeLost"})],
         {"10m": [], "16m": firing("critical", {"kind": "PretrainRun"}), "30m": firing("critical", {"kind": "PretrainRun"}),
          "44m": []}),
    Case("restarts-of-several-reasons-add-up", "CrucibleRestartStorm",
         [series("crucible_operator_restarts_total", "0x5 1x5 2x30", {"kind": "PretrainRun", "reason": "Evicted"}),
          series("crucible_operator_restarts_total", "0x12 1x28", {"kind": "PretrainRun", "reason": "Hang"})],
         {"9m": [], "14m": firing("critical", {"kind": "PretrainRun"})}),
    Case("first-restarts-of-a-new-reason-count-from-one", "CrucibleRestartStorm",
         # the series appears at 5m with its first restart already counted (no zero sample before
         # it); the third restart comes at 9m. increase() alone would see only two.
         [series("crucible_operator_restarts_total", "_x5 1 1 2 2 3x30", {"kind": "PretrainRun", "reason": "NCCLTimeout"})],
         {"8m": [], "9m": firing("critical", {"kind": "PretrainRun"}), "20m": firing("critical", {"kind": "PretrainRun"})}),
    Case("a-new-reasons-single-restart-is-no-storm", "CrucibleRestartStorm",
         [series("crucible_operator_restarts_total", "_x5 1x40", {"kind": "PretrainRun", "reason": "Evicted"})],
         {"10m": [], "30m": [], "44m": []}),
    Case("two-restarts-are-no-storm", "CrucibleRestartStorm",
         [series("crucible_operator_restarts_total", "0x5 1x10 2x30", {"kind": "PretrainRun", "reason": "NodeLost"})],
         {"20m": [], "40m": []}),
    Case("restarts-spread-over-hours-are-no-storm", "CrucibleRestartStorm",
         [series("crucible_operator_restarts_total", "0x40 1x40 2x40 3x40 4x40", {"kind": "PretrainRun", "reason": "NodeLost"})],
         {"100m": [], "190m": []}),
    Case("operator-restart-resets-the-counter-without-a-storm", "CrucibleRestartStorm",
         [series("crucible_operator_restarts_total", "5x20 0x20", {"kind": "PretrainRun", "reason": "NodeLost"})],
         {"25m": [], "39m": []}),
    # --- run failed: any run of a kind in phase Failed
    Case("a-run-fails", "CrucibleRunFailed",
         [series("crucible_operator_runs", "0x10 1x10", {"kind": "PretrainRun", "phase": "Failed"}),
          series("crucible_operator_runs", "2x20", {"kind": "PretrainRun", "phase": "Running"})],
         {"5m": [], "12m": firing("warning", {"kind": "PretrainRun"})}),
    Case("failed-run-deleted-clears", "CrucibleRunFailed",
         [series("crucible_operator_runs", "1x10 0x10", {"kind": "QuantizeJob", "phase": "Failed"})],
         {"5m": firing("warning", {"kind": "QuantizeJob"}), "15m": []}),
    Case("healthy-runs-are-silent", "CrucibleRunFailed",
         [series("crucible_operator_runs", "3x20", {"kind": "PretrainRun", "phase": "Running"}),
          series("crucible_operator_runs", "5x20", {"kind": "PretrainRun", "phase": "Succeeded"})],
         {"10m": []}),
]


def _promtool_test(case: Case) -> dict[str, Any]:
    return {
        "name": case.id,
        "interval": "1m",
        "input_series": case.input,
        "alert_rule_test": [
            {
                "eval_time": at,
                "alertname": case.alert,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }
            for at, expected in case.expect.items()
        ],
    }


def _without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """promtool compares annotations exactly; these cases are about when alerts fire."""
    groups = copy.deepcopy(groups)
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return groups


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=scaled(120), check=False)


def test_chart_ships_the_five_alerts_each_with_a_runbook() -> None:
    rules = [r for g in rule_groups() for r in g["rules"]]
    assert [r["alert"] for r in rules] == ALERTS
    for rule in rules:
        notes = rule["annotations"]
        assert notes["summary"] and "\n" not in notes["summary"], rule["alert"]
        description = notes["description"]
        assert "Check:" in description and "Act:" in description, f"{rule['alert']}: runbook sections"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
    with_links = [r for g in rule_groups({"prometheusRule": {"runbookBaseURL": "https://r.example/x"}}) for r in g["rules"]]
    assert [r["annotations"]["runbook_url"] for r in with_links] == [f"https://r.example/x#{a.lower()}" for a in ALERTS]


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    for alert in ALERTS:
        cases = [c for c in CASES if c.alert == alert]
        assert any(any(v for v in c.expect.values()) for c in cases), f"{alert}: no firing case"
        assert any(not any(v for v in c.expect.values()) for c in cases), f"{alert}: no all-silent case"


@pytest.mark.parametrize(
    "values",
    [{}, {"prometheusRule": {"additionalAlertLabels": {"team": "ml"}, "runbookBaseURL": "https://r.example/x",
                             "alerts": {"runFailed": {"enabled": False}, "lossSpike": {"for": "2m", "window": "1h"}}}}],
    ids=["defaults", "overrides"],
)
def test_promtool_check_rules_accepts_the_rendered_rules(promtool: str, tmp_path: Path, values: dict[str, Any]) -> None:
    groups = rule_groups(values)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = _run([promtool, "check", "rules", "rules.yaml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in groups)
    assert f"SUCCESS: {count} rules found" in result.stdout
    if values:
        alerts = {r["alert"]: r for g in groups for r in g["rules"]}
        assert "CrucibleRunFailed" not in alerts
        assert alerts["CrucibleLossSpike"]["for"] == "2m" and "[1h]" in alerts["CrucibleLossSpike"]["expr"]
        assert all(r["labels"]["team"] == "ml" for r in alerts.values())


def test_promtool_unit_tests_each_alert_fires_when_it_should_and_not_otherwise(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _without_annotations(rule_groups())}, sort_keys=False))
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [_promtool_test(c) for c in CASES],
    }
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = _run([promtool, "test", "rules", "alerts.test.yaml"], tmp_path)
    output = result.stdout + result.stderr
    failed = sorted(set(re.findall(r"name:\s*(\S+)", output)))
    assert result.returncode == 0, f"promtool test rules failed for {failed}:\n{output}"
    assert "SUCCESS" in output


def test_promtool_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The harness itself can fail: an alert with a threshold that never triggers breaks the cases."""
    groups = _without_annotations(rule_groups())
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] == "CrucibleLossSpike":
                rule["expr"] = "crucible_train_loss > 1e9"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    spike_cases = [c for c in CASES if c.id == "loss-jumps-5x"]
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [_promtool_test(c) for c in spike_cases]}
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = _run([promtool, "test", "rules", "alerts.test.yaml"], tmp_path)
    assert result.returncode != 0 and "loss-jumps-5x" in result.stdout + result.stderr
