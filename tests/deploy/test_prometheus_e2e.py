"""End to end: a real Prometheus server on loopback scrapes a real trainer and the loss-spike alert fires.

The trainer is `python -m crucible.trainer pretrain` on a tiny Llama (CPU) whose training data
hides a corrupted region: documents of random tokens among highly regular ones. Once the model
has learned the regular text, a batch drawn from the corrupted region makes the loss jump; the
trainer's detector (lossSpike.action: alert) counts it in crucible_train_loss_spikes_total and
Prometheus evaluates the chart's own rendered rules (default thresholds) against what it scrapes.
Scrape and evaluation intervals are short; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from deploylib import CHART, REPO, one, render_objects, rule_groups

from waits import scaled

T = TypeVar("T")
RUN_LABELS = {"namespace": "ml-research", "run": "tiny-llama", "kind": "PretrainRun", "attempt": "0",
              "pod": "tiny-llama-0-0-xyz12", "node": "cpu-node-1"}
VOCAB = 64
SPIKE_WINDOW = 150  # the detector judges nothing before this many steps: Prometheus sees a calm start


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=scaled(5)) as response:
        return json.loads(response.read())


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, procs: list[subprocess.Popen[bytes]]) -> T:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")[-3000:] if proc.stdout else ""
                program = proc.args[0] if isinstance(proc.args, list) else proc.args
                pytest.fail(f"{what}: {program!s} exited with {proc.returncode} first:\n{out}")
        try:
            value = probe()
        except OSError:
            value = None
        if value is not None and value is not False:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _write_training_data(root: Path) -> None:
    from crucible.trainer.data.shards import ShardWriter

    rng = random.Random(0)
    for split, docs in (("train", 3000), ("validation", 50)):
        writer = ShardWriter(root / split, vocab_size=VOCAB, eos_id=0)
        for i in range(docs):
            if split == "train" and i % 40 == 39:  # the corrupted region: 2.5% random-token documents
                writer.add_document([rng.randrange(1, VOCAB) for _ in range(31)])
            else:
                writer.add_document([1 + (i % 7 + j) % 20 for j in range(31)])
        writer.close()


def _pretrain_spec(tmp: Path) -> dict[str, Any]:
    return {
        "data": {"uri": str(tmp / "data")},
        "model": {"hiddenSize": 32, "numLayers": 2, "numHeads": 2, "maxPositionEmbeddings": 64},
        "training": {"seqLen": 32, "globalBatchTokens": 128, "microBatchSize": 4, "maxSteps": 3000,
                     "evalEvery": 0, "precision": "fp32"},
        "optimizer": {"lr": 0.01, "warmupSteps": 10, "schedule": "constant"},
        "checkpoint": {"uri": str(tmp / "checkpoints"), "interval": 100000},
        "lossSpike": {"action": "alert", "window": SPIKE_WINDOW, "zThreshold": 6},
        "metrics": {"port": 0, "logEvery": 100},
        "output": {"uri": str(tmp / "model")},
    }


def _start_prometheus(binary: str, tmp: Path, job: str, port: int, labels: dict[str, str],
                      processes: list[subprocess.Popen[bytes]], honor_labels: bool = False) -> Prometheus:
    """A Prometheus on loopback with the chart's rules (default values), scraping one target twice a second."""
    config = {
        "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms", "evaluation_interval": "500ms"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{"job_name": job, "honor_labels": honor_labels,
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}],
    }
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    listen = _free_port()
    processes.append(subprocess.Popen(
        [binary, "--config.file=prometheus.yml", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{listen}", "--log.level=warn"],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ))
    prom = Prometheus(f"http://127.0.0.1:{listen}")
    _wait_for("Prometheus ready", lambda: urllib.request.urlopen(f"{prom.api}/-/ready", timeout=scaled(2)).status == 200,
              30, processes)
    loaded = _get_json(f"{prom.api}/api/v1/rules")["data"]["groups"]
    assert {r["name"] for g in loaded for r in g["rules"]} >= {"CrucibleLossSpike", "CrucibleRunFailed"}
    return prom


class Prometheus:
    def __init__(self, api: str) -> None:
        self.api = api

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return list(_get_json(url)["data"]["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in _get_json(f"{self.api}/api/v1/alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def firing(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.alerts(name) if a["state"] == "firing"), None)


def _dashboard_queries(metric_prefix: str, namespace: str, run: str) -> dict[str, str]:
    """The dashboard's queries on `metric_prefix` series, with Grafana's variables filled in."""
    dashboard = json.loads((CHART / "files" / "dashboards" / "crucible-training.json").read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if metric_prefix in expr and "histogram_quantile" not in expr:
                queries[f"{panel['title']} / {target['refId']}"] = (
                    expr.replace("$__rate_interval", "5s").replace("$__range", "5m")
                    .replace("$namespace", namespace).replace("$run", run)
                )
    return queries


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=scaled(15))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=scaled(5))


@pytest.mark.slow
def test_prometheus_fires_loss_spike_alert_on_a_live_trainer(
    prometheus_bin: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    _write_training_data(tmp_path / "data")
    (tmp_path / "spec.json").write_text(json.dumps(_pretrain_spec(tmp_path)))
    trainer_port = _free_port()
    # The labels are what the chart's PodMonitor relabelling produces for rank 0 of a training job.
    prom = _start_prometheus(prometheus_bin, tmp_path, "crucible-trainers", trainer_port, RUN_LABELS, processes)

    env = {**os.environ, "CRUCIBLE_METRICS_PORT": str(trainer_port), "OMP_NUM_THREADS": "1",
           "CRUCIBLE_RUN": RUN_LABELS["run"], "CRUCIBLE_KIND": RUN_LABELS["kind"], "CRUCIBLE_ATTEMPT": "0"}
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "crucible.trainer", "pretrain", "--spec", str(tmp_path / "spec.json")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ))

    # A calm start: Prometheus has scraped the trainer at step > 0 with no spike counted, and the
    # alert is silent.
    _wait_for("a scrape of the training trainer with no spike yet",
              lambda: prom.query("crucible_train_step > 0 and on() crucible_train_loss_spikes_total == 0"), 120,
              processes)
    assert prom.alerts("CrucibleLossSpike") == []

    alert = _wait_for("CrucibleLossSpike firing", lambda: prom.firing("CrucibleLossSpike"), 120, processes)
    labels = alert["labels"]
    assert {k: labels[k] for k in RUN_LABELS} == RUN_LABELS
    assert labels["severity"] == "warning"
    # The gauge branch (loss well above its own average) can fire before the detector's window is
    # full; the detector must count the corrupted batches too.
    _wait_for("the trainer's detector to count a spike", lambda: prom.query("crucible_train_loss_spikes_total >= 1"),
              120, processes)
    description = alert["annotations"]["description"]
    assert "ml-research/tiny-llama" in description and "{{" not in description
    # Every trainer panel that applies to a dense pretrain shows this run (label names and PromQL on
    # real series). The mixture-of-experts and RL rows show only MoE and RL runs (their series are
    # exported by those runs alone; tests/deploy/test_dashboard.py checks their names against the
    # trainer's gauges, and tests/posttrain/test_rl.py the RL gauges' exported values).
    queries = _dashboard_queries("crucible_", RUN_LABELS["namespace"], RUN_LABELS["run"])
    queries = {k: v for k, v in queries.items()
               if not any(other in v for other in ("crucible_operator_", "crucible_moe_", "crucible_rl_"))}
    assert len(queries) >= 11
    empty = [title for title, expr in queries.items() if not _retry_query(prom, expr)]
    assert not empty, f"dashboard panels with no data for a live run: {empty}"
    assert alert["annotations"]["summary"] == "Loss spike in PretrainRun ml-research/tiny-llama"


def test_prometheus_fires_run_failed_and_restart_storm_from_the_operators_exporter(
    prometheus_bin: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The real OperatorMetrics exporter: its label names are the ones the alerts aggregate by."""
    module = pytest.importorskip("crucible.operator.metrics", reason="the operator's metrics module has not landed")
    from prometheus_client import CollectorRegistry

    port = _free_port()
    metrics = module.OperatorMetrics(CollectorRegistry())
    metrics.serve(port)
    runs = [("PretrainRun", "ml-research", f"llama-{i}") for i in range(3)]
    for run in runs:
        metrics.set_phase(run, "Running")
    operator_labels = {"namespace": "crucible-system", "pod": "crucible-5d9c7-xk2lp"}
    # As the chart's ServiceMonitor scrapes it: honorLabels keeps goodput's own namespace label.
    monitor = one(render_objects({"metrics": {"serviceMonitor": {"enabled": True}}}), "ServiceMonitor")
    honor = bool(monitor["spec"]["endpoints"][0].get("honorLabels", False))
    prom = _start_prometheus(prometheus_bin, tmp_path, "crucible-operator", port, operator_labels, processes,
                             honor_labels=honor)

    _wait_for("a scrape of three Running runs",
              lambda: prom.query('sum(crucible_operator_runs{phase="Running"}) == 3'), 60, processes)
    assert prom.alerts("CrucibleRunFailed") == [] and prom.alerts("CrucibleRestartStorm") == []

    # Node failures: three restarts of one run, the first of a reason the exporter never saw.
    for _ in range(3):
        metrics.restarts.labels("PretrainRun", "NodeLost").inc()
        time.sleep(0.6)
    metrics.set_phase(runs[0], "Failed")

    storm = _wait_for("CrucibleRestartStorm firing", lambda: prom.firing("CrucibleRestartStorm"), 60, processes)
    assert storm["labels"]["kind"] == "PretrainRun" and storm["labels"]["severity"] == "critical"
    failed = _wait_for("CrucibleRunFailed firing", lambda: prom.firing("CrucibleRunFailed"), 60, processes)
    assert failed["labels"]["kind"] == "PretrainRun"
    assert failed["annotations"]["summary"] == "1 PretrainRun run(s) Failed"
    assert "{{" not in storm["annotations"]["description"]

    # The operator panels of the dashboard show these series.
    metrics.goodput.labels("PretrainRun", "ml-research", "llama-1").set(0.93)
    queries = _dashboard_queries("crucible_operator_", "ml-research", "llama-1")
    assert len(queries) >= 6
    empty = [title for title, expr in queries.items() if not _retry_query(prom, expr)]
    assert not empty, f"dashboard panels with no data: {empty}"

    metrics.forget(runs[0])  # the failed run is deleted: the alert clears
    _wait_for("CrucibleRunFailed resolved", lambda: not prom.alerts("CrucibleRunFailed"), 60, processes)


def _retry_query(prom: Prometheus, expr: str, timeout: float = 10) -> list[dict[str, Any]]:
    """A query's result once Prometheus has scraped what it needs (bounded)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = prom.query(expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.3)
