"""The operator's own Prometheus metrics (prometheus-client), served on ``--metrics-port``.

=============================================  =========  ==========================================
name                                           type       labels / meaning
=============================================  =========  ==========================================
crucible_operator_runs                         gauge      kind, phase: runs in each phase
crucible_operator_restarts_total               counter    kind, reason: restarts after infra faults
crucible_operator_reconcile_duration_seconds   histogram  kind: one reconcile pass
crucible_operator_time_to_running_seconds      histogram  kind: creation -> first Running
crucible_operator_goodput_ratio                gauge      kind, namespace, name: kept step time / wall
=============================================  =========  ==========================================

Each operator gets its own ``CollectorRegistry`` so several can run in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RunKey = tuple[str, str, str]  # kind, namespace, name


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs = Gauge("crucible_operator_runs", "Crucible runs by kind and phase.", ["kind", "phase"],
                          registry=self.registry)
        self.restarts = Counter("crucible_operator_restarts_total",
                                "Restarts after infrastructure failures, by kind and reason.",
                                ["kind", "reason"], registry=self.registry)
        self.reconcile = Histogram("crucible_operator_reconcile_duration_seconds",
                                   "Duration of one reconcile pass.", ["kind"], registry=self.registry,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.time_to_running = Histogram("crucible_operator_time_to_running_seconds",
                                         "Time from a run's creation until its pods first ran.", ["kind"],
                                         registry=self.registry,
                                         buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200))
        self.goodput = Gauge("crucible_operator_goodput_ratio",
                             "Time on kept steps divided by wall time since the run started.",
                             ["kind", "namespace", "name"], registry=self.registry)
        self._phases: dict[RunKey, str] = {}

    def set_phase(self, key: RunKey, phase: str) -> None:
        old = self._phases.get(key)
        if old == phase:
            return
        if old is not None:
            self.runs.labels(key[0], old).dec()
        self.runs.labels(key[0], phase).inc()
        self._phases[key] = phase

    def forget(self, key: RunKey) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            self.runs.labels(key[0], old).dec()
        try:
            self.goodput.remove(*key)
        except KeyError:
            pass

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
