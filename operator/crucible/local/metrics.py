"""Read what a stage leaves behind: ``metrics.jsonl`` step records and the ``_SUCCESS`` receipt."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.api.common import Progress
from crucible.core.status import rfc3339


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
        if advanced:
            self.last_advance = now
        return advanced

    def progress(self, previous: Progress, total_steps: int | None) -> Progress:
        rec = self.last
        step = rec.get("step")
        step = int(step) if isinstance(step, int | float) else previous.step
        loss = _finite(rec.get("loss"))
        tps = _finite(rec.get("tokensPerSecond"))
        mfu = _finite(rec.get("mfu"))
        tokens = rec.get("tokens")
        return Progress(
            step=step,
            total_steps=total_steps,
            percent=round(100.0 * step / total_steps, 1) if step is not None and total_steps else None,
            loss=round(loss, 4) if loss is not None else previous.loss,
            tokens=int(tokens) if isinstance(tokens, int | float) else previous.tokens,
            tokens_per_second=round(tps, 1) if tps is not None else previous.tokens_per_second,
            mfu=round(mfu, 4) if mfu is not None else previous.mfu,
            stage=previous.stage,
            updated_at=rfc3339(self.last_advance) if self.last_advance else previous.updated_at,
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
