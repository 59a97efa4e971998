"""Status: conditions, progress and goodput of a run (pure, both backends).

    status_patch(old, new) -> dict | None      # the camelCase status, None when unchanged
    MetricsSample.from_prometheus(samples) / MetricsSample(...)   # what rank 0 reported
    progress_from_sample(sample, *, previous, total_steps, now) -> Progress
    progress_from_metrics(metrics, *, previous, total_steps, now) -> Progress
    parse_prometheus(text) -> dict[str, float]  # unlabelled samples of a /metrics page
    goodput(kept_seconds, wall_seconds) -> float | None
    set_condition(conditions, type, status, reason, message, now, force=False) -> list[Condition]
    restarting_since(status) -> float | None

Conditions (types are constants here): ``InputsReady``, ``Running``, ``Restarting``,
``Suspended``, ``Complete``, ``Failed``. A condition's lastTransitionTime changes only when its
status changes, except ``Restarting``, which is re-stamped at every restart because the
restart backoff is measured from it. The status change of each transition is in
:mod:`crucible.core.transitions`.

``progress.updatedAt`` is the time the step last *advanced* (not the time of the last
scrape), reset when an attempt starts and when its pods first run: it is the hang clock, and
it keeps status writes to one per real change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from crucible.api.common import Condition, Progress, RunStatus

INPUTS_READY = "InputsReady"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
FAILED = "Failed"

# Trainer metric names (the contract) read into status.progress.
M_STEP = "crucible_train_step"
M_LOSS = "crucible_train_loss"
M_TOKENS = "crucible_train_tokens_total"
M_TPS = "crucible_train_tokens_per_second"
M_MFU = "crucible_train_mfu_ratio"
M_SPIKES = "crucible_train_loss_spikes_total"
M_CKPT_STEP = "crucible_checkpoint_last_step"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: float,
    *,
    generation: int | None = None,
    force: bool = False,
) -> list[Condition]:
    """A copy of ``conditions`` with one condition set (transition time kept if unchanged)."""
    old = find_condition(conditions, type_)
    keep_time = old is not None and old.status == status and not force
    new = Condition(
        type=type_,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if keep_time and old else rfc3339(now),
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [new]


def restarting_since(status: RunStatus) -> float | None:
    cond = find_condition(status.conditions, RESTARTING)
    if cond is None or cond.status != "True":
        return None
    return parse_time(cond.last_transition_time)


def status_patch(old: RunStatus | None, new: RunStatus) -> dict[str, Any] | None:
    """The status to write, or None when nothing changed (one write per pass, only on change)."""
    wire = new.model_dump(mode="json", by_alias=True, exclude_none=True)
    if old is not None and old.model_dump(mode="json", by_alias=True, exclude_none=True) == wire:
        return None
    return wire


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page, by metric name (labels kept verbatim in the key)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            key, _, rest = line.rpartition("}")
            key += "}"
        else:
            key, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        out[key] = value
    return out


def _num(metrics: Mapping[str, float], name: str) -> float | None:
    v = metrics.get(name)
    return None if v is None or math.isnan(v) else v


@dataclass(frozen=True)
class MetricsSample:
    """What a trainer reported about its progress, whichever way the backend read it (rank 0's
    ``/metrics`` on Kubernetes, ``metrics.jsonl`` and the checkpoint folder locally)."""

    step: int | None = None
    loss: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    checkpoint_step: int | None = None
    loss_spikes: int | None = None
    kept_seconds: float | None = None
    """Seconds spent on the steps the model kept, when the backend can sum them (``stepSeconds``
    of metrics.jsonl); else goodput uses tokens ÷ tokens-per-second."""

    @classmethod
    def from_prometheus(cls, metrics: Mapping[str, float]) -> MetricsSample:
        step, tokens, ckpt, spikes = (_num(metrics, n) for n in (M_STEP, M_TOKENS, M_CKPT_STEP, M_SPIKES))
        return cls(
            step=int(step) if step is not None else None,
            loss=_num(metrics, M_LOSS),
            tokens=int(tokens) if tokens is not None else None,
            tokens_per_second=_num(metrics, M_TPS),
            mfu=_num(metrics, M_MFU),
            checkpoint_step=int(ckpt) if ckpt is not None else None,
            loss_spikes=int(spikes) if spikes is not None else None,
        )

    def kept(self) -> float | None:
        """Seconds of kept training time (the numerator of goodput)."""
        if self.kept_seconds is not None:
            return self.kept_seconds
        if self.tokens and self.tokens_per_second:
            return self.tokens / self.tokens_per_second
        return None


def progress_from_sample(
    sample: MetricsSample, *, previous: Progress, total_steps: int | None, now: float
) -> Progress:
    """status.progress from a sample; ``updatedAt`` moves only when the step advanced."""
    step = sample.step if sample.step is not None else previous.step
    advanced = step is not None and step != previous.step
    loss, tps, mfu = sample.loss, sample.tokens_per_second, sample.mfu
    return Progress(
        step=step,
        total_steps=total_steps,
        percent=round(100.0 * step / total_steps, 1) if step is not None and total_steps else None,
        loss=round(loss, 4) if loss is not None else previous.loss,
        tokens=sample.tokens if sample.tokens is not None else previous.tokens,
        tokens_per_second=round(tps, 1) if tps is not None else previous.tokens_per_second,
        mfu=round(mfu, 4) if mfu is not None else previous.mfu,
        stage=previous.stage,
        updated_at=rfc3339(now) if advanced or previous.updated_at is None else previous.updated_at,
    )


def progress_from_metrics(
    metrics: Mapping[str, float], *, previous: Progress, total_steps: int | None, now: float
) -> Progress:
    """status.progress from a Prometheus scrape (see :func:`progress_from_sample`)."""
    return progress_from_sample(MetricsSample.from_prometheus(metrics), previous=previous,
                                total_steps=total_steps, now=now)


def goodput(kept_seconds: float, wall_seconds: float) -> float | None:
    """Time spent on steps that were kept ÷ wall time since the first attempt, in [0, 1]."""
    if wall_seconds <= 0:
        return None
    return round(max(0.0, min(1.0, kept_seconds / wall_seconds)), 4)
