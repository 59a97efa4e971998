"""Loss-spike detection: z-score of a step's loss against a moving window of recent losses.

A step is a spike when ``loss > mean + zThreshold·std`` and ``loss − mean ≥ minDelta`` over the
last ``window`` accepted losses (spikes never enter the window, so one spike does not mask the
next). Non-finite losses are always spikes. Nothing is judged until the window is full, so the
steep early descent never alarms. The state is part of the checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from crucible.trainer.config.training import LossSpikeConfig


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    mean: float
    std: float
    z: float

    def describe(self) -> str:
        if not math.isfinite(self.loss):
            return f"non-finite loss ({self.loss}) at step {self.step}"
        return f"loss {self.loss:.4f} at step {self.step} is {self.z:.1f} std above the window mean {self.mean:.4f}"


class LossSpikeDetector:
    def __init__(self, cfg: LossSpikeConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.spikes = 0
        self.rollbacks = 0

    def observe(self, step: int, loss: float) -> Spike | None:
        """Record a step's loss; a Spike when it is one (then it is not added to the window)."""
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            self.spikes += 1
            return Spike(step, loss, math.nan, math.nan, math.inf)
        if len(self.window) == self.window.maxlen:
            n = len(self.window)
            mean = sum(self.window) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / max(n - 1, 1))
            z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
            if z > self.cfg.z_threshold and loss - mean >= self.cfg.min_delta:
                self.spikes += 1
                return Spike(step, loss, mean, std, z)
        self.window.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "spikes": self.spikes, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque(state.get("window", []), maxlen=self.cfg.window)
        self.spikes = int(state.get("spikes", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
