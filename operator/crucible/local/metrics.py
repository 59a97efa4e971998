"""Read what a stage leaves behind: ``metrics.jsonl`` step records and the ``_SUCCESS`` receipt."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.core.status import MetricsSample


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (a torn last line from a killed writer is skipped)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_success(output_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((output_dir / "_SUCCESS").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class MetricsTail:
    """Follows ``<checkpoint.uri>/metrics.jsonl`` as a run appends to it."""

    path: Path
    offset: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_advance: float | None = None
    kept: dict[int, float] = field(default_factory=dict)
    """``stepSeconds`` of every step, the last record of a step winning (a step redone after a
    restart counts once): the time the final model's steps took, for goodput."""
    _partial: bytes = b""

    def poll(self, now: float) -> bool:
        """Read new lines; True when the step advanced."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return False
        if not chunk:
            return False
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        advanced = False
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if "event" in record:
                self.events.append(record)
            elif "step" in record:
                if record.get("step") != self.last.get("step"):
                    advanced = True
                self.last = record
                seconds = record.get("stepSeconds")
                if isinstance(record.get("step"), int) and isinstance(seconds, int | float):
                    self.kept[record["step"]] = float(seconds)
        if advanced:
            self.last_advance = now
        return advanced

    def sample(self, checkpoint_step: int | None = None) -> MetricsSample | None:
        """The last step record as the core's :class:`MetricsSample` (None before the first)."""
        rec = self.last
        if not rec:
            return None
        step, tokens = rec.get("step"), rec.get("tokens")
        return MetricsSample(
            step=int(step) if isinstance(step, int | float) else None,
            loss=_finite(rec.get("loss")),
            tokens=int(tokens) if isinstance(tokens, int | float) else None,
            tokens_per_second=_finite(rec.get("tokensPerSecond")),
            mfu=_finite(rec.get("mfu")),
            checkpoint_step=checkpoint_step,
            kept_seconds=sum(self.kept.values()) if self.kept else None,
        )


def latest_checkpoint(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """Highest ``step-NNNNNNNNN`` with a manifest (the trainer writes it last)."""
    best: tuple[int, Path] | None = None
    if not checkpoint_dir.is_dir():
        return None
    for child in checkpoint_dir.glob("step-*"):
        try:
            step = int(child.name.removeprefix("step-"))
        except ValueError:
            continue
        if any(child.glob("manifest*.json")) and (best is None or step > best[0]):
            best = (step, child)
    return best
