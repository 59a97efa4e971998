"""Rank 0's Prometheus endpoint and the step log ``<checkpoint.uri>/metrics.jsonl``.

Metric names are the contract in DESIGN.md (no labels). All are gauges: after a resume the
totals continue from the checkpoint's values, which a Counter could not be set to.
``CRUCIBLE_METRICS_PORT`` overrides ``metrics.port``; 0 turns the server off.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from crucible.trainer import storage

GAUGES = {
    "crucible_train_loss": "Training loss of the last step (mean over the global batch).",
    "crucible_train_step": "Optimizer steps completed.",
    "crucible_train_tokens_total": "Tokens trained on so far.",
    "crucible_train_tokens_per_second": "Training throughput over the last step, all ranks.",
    "crucible_train_mfu_ratio": "Model FLOPs utilization (0-1); 0 where the device peak is unknown.",
    "crucible_train_grad_norm": "Global gradient norm before clipping.",
    "crucible_train_learning_rate": "Learning rate of the last step.",
    "crucible_train_loss_spikes_total": "Loss spikes detected.",
    "crucible_train_eval_loss": "Held-out loss of the last evaluation.",
    "crucible_rl_reward_mean": "RL: mean reward of the last batch of samples.",
    "crucible_rl_reward_std": "RL: standard deviation of that reward.",
    "crucible_rl_kl": "RL: mean per-token KL estimate to the frozen reference.",
    "crucible_rl_entropy": "RL: mean per-token entropy of the policy on its samples.",
    "crucible_rl_clip_fraction": "RL: share of tokens (sequences for RLOO) whose probability ratio was clipped.",
    "crucible_rl_response_length": "RL: mean completion length in tokens.",
    "crucible_rl_generation_share": "RL: share of the last step's wall time spent sampling.",
    "crucible_checkpoint_save_seconds": "Wall time of the last checkpoint save (blocking + background).",
    "crucible_checkpoint_last_step": "Step of the newest complete checkpoint.",
}

MOE_GAUGES = {
    "crucible_moe_expert_token_share": "Fraction of the last step's routed tokens each expert took (all MoE blocks).",
    "crucible_moe_dropped_tokens_ratio": "Fraction of the last step's token-to-expert assignments over capacity.",
    "crucible_moe_aux_loss": "Load-balancing (+ router z) auxiliary loss of the last step, per MoE block.",
    "crucible_moe_load_imbalance_ratio": "Busiest expert's load over the even load (1 = balanced), mean over blocks.",
}


class Metrics:
    """Gauges on their own registry, served on ``port`` by rank 0; no-ops on other ranks."""

    def __init__(self, port: int, enabled: bool) -> None:
        self.enabled = enabled
        self.port = 0
        self._gauges: dict[str, Any] = {}
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        for name, help_ in GAUGES.items():
            self._gauges[name] = Gauge(name, help_, registry=self.registry)
        env_port = os.environ.get("CRUCIBLE_METRICS_PORT")
        port = int(env_port) if env_port not in (None, "") else port
        if port:
            from prometheus_client import start_http_server

            self._server, _ = start_http_server(port, registry=self.registry)
            self.port = int(self._server.server_address[1])

    def set_moe(self, share: list[float], dropped: float, aux: float, imbalance: float) -> None:
        """Mixture-of-experts gauges of the last step (per-expert token share is labelled by expert)."""
        if not self.enabled:
            return
        from prometheus_client import Gauge

        if "crucible_moe_expert_token_share" not in self._gauges:
            for name, help_ in MOE_GAUGES.items():
                labels = ["expert"] if name == "crucible_moe_expert_token_share" else []
                self._gauges[name] = Gauge(name, help_, labels, registry=self.registry)
        for expert, value in enumerate(share):
            self._gauges["crucible_moe_expert_token_share"].labels(expert=str(expert)).set(value)
        self._gauges["crucible_moe_dropped_tokens_ratio"].set(dropped)
        self._gauges["crucible_moe_aux_loss"].set(aux)
        self._gauges["crucible_moe_load_imbalance_ratio"].set(imbalance)

    def set(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is not None and self.enabled:
                self._gauges[f"crucible_{key}"].set(value)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


class StepLog:
    """Appends one JSON object per line to ``<checkpoint.uri>/metrics.jsonl`` (local paths only)."""

    def __init__(self, checkpoint_uri: str | None, enabled: bool) -> None:
        self.path: Path | None = None
        if enabled and checkpoint_uri and not storage.is_s3(checkpoint_uri):
            self.path = Path(checkpoint_uri) / "metrics.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        record = {**record, "time": record.get("time", time.time())}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def event(self, event: str, **fields: Any) -> None:
        self.write({"event": event, **fields})


def read_step_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
