"""Status: derive a run's next status from a decision and observations (pure, both backends).

    next_status(current, decision, *, now, generation=None, output_uri=None,
                results=None, progress=None, last_checkpoint=None, goodput=None) -> RunStatus
    status_patch(old, new) -> dict | None      # the camelCase status, None when unchanged
    progress_from_metrics(metrics, *, previous, total_steps, now) -> Progress
    parse_prometheus(text) -> dict[str, float]  # unlabelled samples of a /metrics page
    goodput(kept_seconds, wall_seconds) -> float | None
    set_condition(conditions, type, status, reason, message, now, force=False) -> list[Condition]
    restarting_since(status) -> float | None

Conditions (types are constants here): ``InputsReady``, ``Running``, ``Restarting``,
``Suspended``, ``Complete``, ``Failed``. A condition's lastTransitionTime changes only when its
status changes, except ``Restarting``, which is re-stamped at every restart because the
restart backoff is measured from it.

``progress.updatedAt`` is the time the step last *advanced* (not the time of the last
scrape), reset when an attempt starts and when its pods first run: it is the hang clock, and
it keeps status writes to one per real change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from crucible.api.common import CheckpointRef, Condition, Progress, RunStatus

if TYPE_CHECKING:
    from crucible.core.decide import Decision

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


def next_status(
    current: RunStatus,
    decision: Decision,
    *,
    now: float,
    generation: int | None = None,
    output_uri: str | None = None,
    results: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    last_checkpoint: CheckpointRef | None = None,
    goodput: float | None = None,
) -> RunStatus:
    """The status after acting on ``decision``. ``current`` is not modified."""
    s = current.model_copy(deep=True)
    if generation is not None:
        s.observed_generation = generation
    if progress is not None:
        s.progress = progress
    if last_checkpoint is not None:
        s.last_checkpoint = last_checkpoint
    if goodput is not None:
        s.goodput = goodput
    if output_uri and not s.output_uri:
        s.output_uri = output_uri
    conds = s.conditions
    a, reason, msg = decision.action, decision.reason, decision.message

    def cond(type_: str, status_: str, force: bool = False) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, status_, reason, msg, now, generation=generation, force=force)

    if a == "wait" and reason == "WaitingForInput":
        s.phase = "Waiting"
        s.message = msg
        cond(INPUTS_READY, "False")
    elif a == "wait" and reason == "Suspended":
        s.phase = "Suspended"
        cond(SUSPENDED, "True")
        cond(RUNNING, "False")
    elif a == "wait" and reason == "AttemptRunning":
        if s.phase != "Running":
            s.phase = "Running"
            s.message = msg
            s.progress.updated_at = rfc3339(now)  # the hang clock starts when the pods run
        cond(RUNNING, "True")
        if find_condition(conds, RESTARTING) is not None:
            cond(RESTARTING, "False")
        if s.start_time is None:
            s.start_time = rfc3339(now)
    elif a == "start":
        if s.phase in ("Pending", "Waiting", "Suspended"):
            s.phase = "Pending"
        s.attempt = decision.attempt
        s.message = msg
        s.progress.updated_at = rfc3339(now)  # a new attempt restarts the hang clock
        cond(INPUTS_READY, "True")
        if find_condition(conds, SUSPENDED) is not None:
            cond(SUSPENDED, "False")
        if s.start_time is None:
            s.start_time = rfc3339(now)
    elif a == "restart":
        s.phase = "Restarting"
        s.restarts += 1
        s.attempt = decision.attempt
        s.failed_nodes = list(decision.excluded_nodes)
        s.message = f"{reason}: {msg}"
        cond(RESTARTING, "True", force=True)
        cond(RUNNING, "False")
    elif a == "suspend":
        s.phase = "Suspended"
        s.message = msg
        cond(SUSPENDED, "True")
        cond(RUNNING, "False")
    elif a == "succeed":
        s.phase = "Succeeded"
        s.completion_time = s.completion_time or rfc3339(now)
        s.message = "succeeded"
        if results:
            s.results = dict(results)
        if s.progress.total_steps and s.progress.step is not None:
            s.progress.percent = round(100.0 * s.progress.step / s.progress.total_steps, 1)
        cond(COMPLETE, "True")
        cond(RUNNING, "False")
    elif a == "fail":
        s.phase = "Failed"
        s.completion_time = s.completion_time or rfc3339(now)
        s.message = f"{reason}: {msg.splitlines()[0] if msg else ''}"
        cond(FAILED, "True")
        if find_condition(conds, RUNNING) is not None:
            cond(RUNNING, "False")
    s.conditions = conds
    return s


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


def progress_from_metrics(
    metrics: Mapping[str, float], *, previous: Progress, total_steps: int | None, now: float
) -> Progress:
    """status.progress from a scrape; ``updatedAt`` moves only when the step advanced."""
    step_f = _num(metrics, M_STEP)
    step = int(step_f) if step_f is not None else previous.step
    advanced = step is not None and step != previous.step
    tokens_f = _num(metrics, M_TOKENS)
    loss = _num(metrics, M_LOSS)
    tps = _num(metrics, M_TPS)
    mfu = _num(metrics, M_MFU)
    return Progress(
        step=step,
        total_steps=total_steps,
        percent=round(100.0 * step / total_steps, 1) if step is not None and total_steps else None,
        loss=round(loss, 4) if loss is not None else previous.loss,
        tokens=int(tokens_f) if tokens_f is not None else previous.tokens,
        tokens_per_second=round(tps, 1) if tps is not None else previous.tokens_per_second,
        mfu=round(mfu, 4) if mfu is not None else previous.mfu,
        stage=previous.stage,
        updated_at=rfc3339(now) if advanced or previous.updated_at is None else previous.updated_at,
    )


def goodput(kept_seconds: float, wall_seconds: float) -> float | None:
    """Time spent on steps that were kept ÷ wall time since the first attempt, in [0, 1]."""
    if wall_seconds <= 0:
        return None
    return round(max(0.0, min(1.0, kept_seconds / wall_seconds)), 4)
