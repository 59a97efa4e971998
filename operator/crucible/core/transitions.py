"""Transitions: the typed vocabulary of a reconcile pass, and what each one does to the status.

    Transition                                  # what decide() chose (an enum)
    Decision(transition, reason, message, ...)  # one transition with its details
    TRANSITIONS[transition] -> TransitionSpec   # action, status change, event (one table)
    next_status(current, decision, *, now, ...) -> RunStatus
    events_for(decision, old, new) -> tuple[Event, ...]

Like JobSet's ``actionFunctionMap``: :func:`crucible.core.decide.decide` returns one
:class:`Transition` and everything that follows from it — the backend action, the status
change, the event posted after the status write — is read from :data:`TRANSITIONS`, so no
code dispatches on reason strings. Module order (no cycles): ``status`` (conditions, progress)
← ``transitions`` ← ``decide`` ← ``reconcile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from crucible.api.common import CheckpointRef, Progress, RunStatus
from crucible.core import status as st
from crucible.core.failure import Failure

Action = Literal["wait", "start", "restart", "suspend", "succeed", "fail", "none"]


class Transition(StrEnum):
    """Every outcome of :func:`~crucible.core.decide.decide` (the value is the default reason)."""

    WAIT_FOR_INPUT = "WaitingForInput"
    STAY_SUSPENDED = "Suspended"
    ATTEMPT_PENDING = "AttemptPending"
    ATTEMPT_RUNNING = "AttemptRunning"
    BACKOFF = "BackoffBeforeRestart"
    START = "Starting"
    RESUME = "Resuming"
    RESTART = "Restart"
    SUSPEND = "Suspend"
    SUCCEED = "Succeeded"
    FAIL = "Failed"
    FINISHED = "Finished"


@dataclass(frozen=True)
class Decision:
    """One transition with its details. ``reason`` defaults to the transition's own name;
    restarts and failures carry the failure's reason (``NodeLost``, ``RestartBudgetExhausted``...)."""

    transition: Transition
    reason: str = ""
    message: str = ""
    attempt: int = 0
    delay_seconds: float | None = None
    excluded_nodes: tuple[str, ...] = ()
    failure: Failure | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    consecutive_restarts: int | None = None
    """RESTART: the run's ``status.consecutiveRestarts`` after it (the backoff exponent + 1)."""

    def __post_init__(self) -> None:
        if not self.reason:
            object.__setattr__(self, "reason", self.transition.value)

    @property
    def action(self) -> Action:
        return TRANSITIONS[self.transition].action


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event (the local backend prints it)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class _Change:
    """The status being built by one transition (``s`` is a private copy)."""

    s: RunStatus
    decision: Decision
    now: float
    generation: int | None

    def cond(self, type_: str, status: str, force: bool = False) -> None:
        d = self.decision
        self.s.conditions = st.set_condition(self.s.conditions, type_, status, d.reason, d.message, self.now,
                                             generation=self.generation, force=force)

    def cond_if_present(self, type_: str, status: str) -> None:
        if st.find_condition(self.s.conditions, type_) is not None:
            self.cond(type_, status)

    def start_clock(self) -> None:
        if self.s.start_time is None:
            self.s.start_time = st.rfc3339(self.now)


def _wait_for_input(c: _Change) -> None:
    c.s.phase = "Waiting"
    c.s.message = c.decision.message
    c.cond(st.INPUTS_READY, "False")


def _suspended(c: _Change) -> None:
    if c.decision.action == "suspend":
        c.s.message = c.decision.message
    c.s.phase = "Suspended"
    c.cond(st.SUSPENDED, "True")
    c.cond(st.RUNNING, "False")


def _running(c: _Change) -> None:
    if c.s.phase != "Running":
        c.s.phase = "Running"
        c.s.message = c.decision.message
        c.s.progress.updated_at = st.rfc3339(c.now)  # the hang clock starts when the pods run
    c.cond(st.RUNNING, "True")
    c.cond_if_present(st.RESTARTING, "False")
    c.start_clock()


def _start(c: _Change) -> None:
    if c.s.phase in ("Pending", "Waiting", "Suspended"):
        c.s.phase = "Pending"
    c.s.attempt = c.decision.attempt
    c.s.message = c.decision.message
    c.s.progress.updated_at = st.rfc3339(c.now)  # a new attempt restarts the hang clock
    c.cond(st.INPUTS_READY, "True")
    c.cond_if_present(st.SUSPENDED, "False")
    c.start_clock()


def _restart(c: _Change) -> None:
    d = c.decision
    c.s.phase = "Restarting"
    c.s.restarts += 1
    c.s.consecutive_restarts = (d.consecutive_restarts if d.consecutive_restarts is not None
                              else c.s.consecutive_restarts + 1)
    c.s.attempt = d.attempt
    c.s.failed_nodes = list(d.excluded_nodes)
    c.s.message = f"{d.reason}: {d.message}"
    c.cond(st.RESTARTING, "True", force=True)  # the backoff is measured from this condition
    c.cond(st.RUNNING, "False")


def _succeed(c: _Change) -> None:
    c.s.phase = "Succeeded"
    c.s.completion_time = c.s.completion_time or st.rfc3339(c.now)
    c.s.message = "succeeded"
    p = c.s.progress
    if p.total_steps and p.step is not None:
        p.percent = round(100.0 * p.step / p.total_steps, 1)
    c.cond(st.COMPLETE, "True")
    c.cond(st.RUNNING, "False")


def _fail(c: _Change) -> None:
    d = c.decision
    c.s.phase = "Failed"
    c.s.completion_time = c.s.completion_time or st.rfc3339(c.now)
    c.s.message = f"{d.reason}: {d.message.splitlines()[0] if d.message else ''}"
    c.cond(st.FAILED, "True")
    c.cond_if_present(st.RUNNING, "False")


def _unchanged(c: _Change) -> None:
    return None


EventFn = Callable[[Decision, RunStatus, RunStatus], Event | None]


def _ev_started(d: Decision, old: RunStatus, new: RunStatus) -> Event:
    nodes = f", excluding nodes {', '.join(d.excluded_nodes)}" if d.excluded_nodes else ""
    return Event("Normal", "AttemptStarted", f"attempt {d.attempt} started{nodes}")


def _ev_restart(d: Decision, old: RunStatus, new: RunStatus) -> Event:
    return Event("Warning", d.reason,
                 f"{d.message}; restart {new.restarts} as attempt {d.attempt} in {d.delay_seconds or 0:.0f}s")


def _ev_running(d: Decision, old: RunStatus, new: RunStatus) -> Event | None:
    return Event("Normal", "Running", d.message) if old.phase != "Running" and new.phase == "Running" else None


def _ev_none(d: Decision, old: RunStatus, new: RunStatus) -> None:
    return None


@dataclass(frozen=True)
class TransitionSpec:
    action: Action
    """What the backend does: start / stop the attempt, record the result, or nothing."""
    apply: Callable[[_Change], None]
    """The status change."""
    event: EventFn
    """The event posted after the status write (None: no event)."""


TRANSITIONS: dict[Transition, TransitionSpec] = {
    Transition.WAIT_FOR_INPUT: TransitionSpec("wait", _wait_for_input, _ev_none),
    Transition.STAY_SUSPENDED: TransitionSpec("wait", _suspended, _ev_none),
    Transition.ATTEMPT_PENDING: TransitionSpec("wait", _unchanged, _ev_none),
    Transition.ATTEMPT_RUNNING: TransitionSpec("wait", _running, _ev_running),
    Transition.BACKOFF: TransitionSpec("wait", _unchanged, _ev_none),
    Transition.START: TransitionSpec("start", _start, _ev_started),
    Transition.RESUME: TransitionSpec("start", _start, _ev_started),
    Transition.RESTART: TransitionSpec("restart", _restart, _ev_restart),
    Transition.SUSPEND: TransitionSpec("suspend", _suspended,
                                       lambda d, o, n: Event("Normal", "Suspended", d.message)),
    Transition.SUCCEED: TransitionSpec("succeed", _succeed,
                                       lambda d, o, n: Event("Normal", "Succeeded", f"output at {n.output_uri}")),
    Transition.FAIL: TransitionSpec("fail", _fail, lambda d, o, n: Event("Warning", d.reason, d.message)),
    Transition.FINISHED: TransitionSpec("none", _unchanged, _ev_none),
}


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
    loss_spikes: int | None = None,
) -> RunStatus:
    """The status after ``decision`` (``current`` is not modified): observations, then the
    transition's change from :data:`TRANSITIONS`."""
    s = current.model_copy(deep=True)
    if generation is not None:
        s.observed_generation = generation
    if progress is not None:
        s.progress = progress
    if last_checkpoint is not None:
        s.last_checkpoint = last_checkpoint
    if goodput is not None:
        s.goodput = goodput
    if loss_spikes is not None:
        s.loss_spikes = loss_spikes
    if output_uri and not s.output_uri:
        s.output_uri = output_uri
    if results and decision.transition is Transition.SUCCEED:
        s.results = dict(results)
    TRANSITIONS[decision.transition].apply(_Change(s, decision, now, generation))
    return s


def events_for(decision: Decision, old: RunStatus, new: RunStatus) -> tuple[Event, ...]:
    """The events of a pass, posted only after its status write succeeded."""
    events = []
    event = TRANSITIONS[decision.transition].event(decision, old, new)
    if event is not None:
        events.append(event)
    if new.loss_spikes > old.loss_spikes:
        events.append(Event("Warning", "LossSpike",
                            f"{new.loss_spikes - old.loss_spikes} loss spike(s) detected; rolled back to the "
                            f"last checkpoint (total {new.loss_spikes})"))
    return tuple(events)
