"""Decide: what to do with a run this pass (pure, shared by both backends).

    decide(situation: Situation) -> Decision

A backend observes the run (its status, ``spec.suspend``, the referenced runs, the current
attempt's pods/processes) into a :class:`Situation`, with ``failure`` from
:func:`crucible.core.failure.classify` (hang included), and acts on the :class:`Decision`:

==================  =========  ===============================================================
transition          action     the backend...
==================  =========  ===============================================================
WAIT_FOR_INPUT,     wait       does nothing; looks again after ``delay_seconds`` (if set).
ATTEMPT_PENDING,
ATTEMPT_RUNNING,
BACKOFF,
STAY_SUSPENDED
START, RESUME       start      creates attempt ``attempt`` with ``excluded_nodes`` and ``inputs``.
RESTART             restart    deletes the current attempt; ``attempt`` is the next one, started
                               by a later pass once the backoff (``delay_seconds``) has passed.
SUSPEND             suspend    deletes the current attempt (checkpoints stay).
SUCCEED             succeed    records success (the stage results).
FAIL                fail       records failure: ``reason`` is :data:`RESTART_BUDGET_EXHAUSTED`,
                               :data:`DEPENDENCY_FAILED` or the application failure's reason.
FINISHED            none       the run is finished; nothing to do.
==================  =========  ===============================================================

What each transition does to the status, and its event, is the table
:data:`crucible.core.transitions.TRANSITIONS`.
Restart timing is kept in the status itself (the ``Restarting`` condition's
lastTransitionTime plus :func:`backoff_seconds` of ``status.consecutiveRestarts``), so a
restarted operator or runner carries on where it stopped. The backoff resets after a healthy
period, as the kubelet's CrashLoopBackOff does: an attempt that ran (``Running`` condition true)
for ``failurePolicy.maxBackoffSeconds`` or longer before it failed was not crash-looping, so the
restart after it waits ``backoffSeconds`` again instead of ``backoffSeconds × 2^restarts``.
``status.restarts`` still counts every restart against ``maxRestarts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from crucible.api.common import RunStatus
from crucible.core import status as st
from crucible.core.failure import APPLICATION, INFRASTRUCTURE, Failure
from crucible.core.transitions import Action, Decision, Transition
from crucible.trainer.config.common import FailurePolicy

__all__ = ["Action", "AttemptState", "Decision", "Dependency", "Situation", "Transition", "backoff_seconds",
           "consecutive_before", "decide", "healthy_seconds"]

AttemptState = Literal["absent", "pending", "running", "succeeded", "failed"]

# Reasons of decisions (also condition reasons).
WAITING_FOR_INPUT = "WaitingForInput"
DEPENDENCY_FAILED = "DependencyFailed"
RESTART_BUDGET_EXHAUSTED = "RestartBudgetExhausted"
BACKOFF = "BackoffBeforeRestart"
ATTEMPT_PENDING = "AttemptPending"
ATTEMPT_RUNNING = "AttemptRunning"
ATTEMPT_LOST = "AttemptLost"
SUSPENDED = "Suspended"
FINISHED = "Finished"
STARTING = "Starting"
RESUMING = "Resuming"
SUCCEEDED = "Succeeded"


@dataclass(frozen=True)
class Dependency:
    """A run referenced by ``fromRun`` as the backend found it (``phase`` None: not found)."""

    path: str
    kind: str
    name: str
    phase: str | None
    output_uri: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Situation:
    status: RunStatus
    now: float
    attempt_state: AttemptState
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    suspend: bool = False
    dependencies: tuple[Dependency, ...] = ()
    failure: Failure | None = None


T = Transition


def backoff_seconds(policy: FailurePolicy, restarts_before: int) -> float:
    """Delay before the restart that follows ``restarts_before`` consecutive ones: backoff × 2^n, capped."""
    return float(min(policy.backoff_seconds * (2 ** min(restarts_before, 30)), policy.max_backoff_seconds))


def healthy_seconds(policy: FailurePolicy) -> float:
    """How long an attempt must have run for the restart after it to wait the base backoff again."""
    return float(max(policy.max_backoff_seconds, policy.backoff_seconds, 1))


def consecutive_before(s: Situation) -> int:
    """The backoff exponent of the restart decided now: 0 after an attempt that ran a healthy period."""
    running = st.find_condition(s.status.conditions, st.RUNNING)
    since = st.parse_time(running.last_transition_time) if running is not None and running.status == "True" else None
    if since is not None and s.now - since >= healthy_seconds(s.policy):
        return 0
    return s.status.consecutive_restarts


def decide(s: Situation) -> Decision:
    status = s.status
    if status.phase in ("Succeeded", "Failed"):
        return Decision(T.FINISHED, attempt=status.attempt)

    if s.attempt_state == "succeeded":
        return Decision(T.SUCCEED, message="all processes of the attempt exited 0", attempt=status.attempt)
    if s.failure is not None and s.attempt_state != "absent":
        return _after_failure(s, s.failure)

    if s.suspend:
        if s.attempt_state != "absent":
            return Decision(T.SUSPEND, SUSPENDED, "spec.suspend is true: stopping the attempt; "
                            "checkpoints are kept", attempt=status.attempt)
        return Decision(T.STAY_SUSPENDED, SUSPENDED, "spec.suspend is true", attempt=status.attempt)

    if s.attempt_state == "pending":
        return Decision(T.ATTEMPT_PENDING, message=f"attempt {status.attempt} is being scheduled", attempt=status.attempt)
    if s.attempt_state == "running":
        return Decision(T.ATTEMPT_RUNNING, message=f"attempt {status.attempt} is running", attempt=status.attempt)
    if s.attempt_state == "failed":  # failed without a classified cause: treat as lost
        return _after_failure(s, Failure(INFRASTRUCTURE, ATTEMPT_LOST, "the attempt failed without a known cause"))

    # No attempt exists.
    if status.phase == "Running":
        return _after_failure(s, Failure(INFRASTRUCTURE, ATTEMPT_LOST,
                                         f"attempt {status.attempt} disappeared while running"))
    if status.phase == "Restarting":
        since = st.restarting_since(status)
        due = (since or s.now) + backoff_seconds(s.policy, max(status.consecutive_restarts - 1, 0))
        if s.now < due:
            return Decision(T.BACKOFF, message=f"restart {status.restarts} in {due - s.now:.0f}s",
                            attempt=status.attempt, delay_seconds=due - s.now)
        return Decision(T.RESUME, message=f"starting attempt {status.attempt} from the latest checkpoint",
                        attempt=status.attempt, excluded_nodes=tuple(status.failed_nodes),
                        inputs=_inputs(s.dependencies))

    waiting = _check_dependencies(s)
    if waiting is not None:
        return waiting
    if status.phase == "Suspended":
        return Decision(T.RESUME, message="spec.suspend is false: resuming from the latest checkpoint",
                        attempt=status.attempt + 1, excluded_nodes=tuple(status.failed_nodes),
                        inputs=_inputs(s.dependencies))
    return Decision(T.START, message=f"starting attempt {status.attempt}", attempt=status.attempt,
                    excluded_nodes=tuple(status.failed_nodes), inputs=_inputs(s.dependencies))


def _check_dependencies(s: Situation) -> Decision | None:
    for dep in s.dependencies:
        if dep.phase == "Failed":
            return Decision(T.FAIL, DEPENDENCY_FAILED,
                            f"spec.{dep.path}.fromRun: {dep.kind} {dep.name} failed"
                            + (f": {dep.message}" if dep.message else ""), attempt=s.status.attempt)
    pending = [d for d in s.dependencies if d.phase != "Succeeded" or not d.output_uri]
    if pending:
        parts = [
            f"{d.kind} {d.name} ({'not found' if d.phase is None else d.phase})" for d in pending
        ]
        paths = ", ".join(f"spec.{d.path}" for d in pending)
        return Decision(T.WAIT_FOR_INPUT, message=f"waiting for {', '.join(parts)} to succeed ({paths})",
                        attempt=s.status.attempt)
    return None


def _inputs(deps: tuple[Dependency, ...]) -> dict[str, str]:
    return {d.path: d.output_uri for d in deps if d.output_uri}


def _after_failure(s: Situation, failure: Failure) -> Decision:
    status = s.status
    if failure.failure_class == APPLICATION:
        message = failure.message + (f"\n--- last log lines ---\n{failure.log_tail}" if failure.log_tail else "")
        return Decision(T.FAIL, failure.reason, message, attempt=status.attempt, failure=failure)
    if status.restarts >= s.policy.max_restarts:
        return Decision(
            T.FAIL,
            RESTART_BUDGET_EXHAUSTED,
            f"{failure.message}; no restarts left (failurePolicy.maxRestarts = {s.policy.max_restarts}, "
            f"used {status.restarts}); raise failurePolicy.maxRestarts to allow more",
            attempt=status.attempt,
            failure=failure,
        )
    excluded = set(status.failed_nodes)
    if s.policy.exclude_failed_nodes:
        excluded |= set(failure.nodes)
    streak = consecutive_before(s)
    return Decision(
        T.RESTART,
        failure.reason,
        failure.message,
        attempt=status.attempt + 1,
        delay_seconds=backoff_seconds(s.policy, streak),
        excluded_nodes=tuple(sorted(excluded)),
        failure=failure,
        consecutive_restarts=streak + 1,
    )
