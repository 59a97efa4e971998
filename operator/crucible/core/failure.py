"""Failure: classify how an attempt ended (pure, shared by both backends).

    classify(ends: Sequence[ProcessEnd], *, hung=False, hang_message="") -> Failure | None

Each backend describes every pod / local process of the attempt as a :class:`ProcessEnd`
(exit code or signal, container reason, eviction, node health, last log lines) and calls
:func:`classify`. It returns None when nothing failed, else a :class:`Failure`:

* ``infrastructure`` — restart from the last checkpoint: eviction / ``DisruptionTarget``
  (:data:`EVICTED`, :data:`PREEMPTED`), the node NotReady or gone (:data:`NODE_LOST`), a
  process killed by a signal (:data:`KILLED_BY_SIGNAL`), the trainer's retriable exit code 75
  (:data:`RETRIABLE_EXIT`), no step progress for ``hangTimeout`` (:data:`HANG`).
* ``application`` — never restarted: OOM (:data:`OOM_KILLED`), a bad spec or input (exit 2,
  :data:`BAD_INPUT`), any other non-zero exit (:data:`APPLICATION_ERROR`).

When ranks disagree the infrastructure cause wins: a node that dies makes its peers fail
with NCCL errors, and those must not turn a restartable fault into a permanent one.

``Failure.nodes`` are the nodes to exclude from the next attempt: nodes that were lost or
whose pods were evicted (not preempted), killed by a signal, or exited 75 while their peers
did not. When every rank reports the same retriable fault the culprit is unknown and no node
is blamed. Use :func:`is_hung` for the hang clock.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from crucible.trainer.config.common import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE

FailureClass = Literal["infrastructure", "application"]
INFRASTRUCTURE: Final = "infrastructure"
APPLICATION: Final = "application"

# Reasons (CamelCase; they appear in conditions, events and the restarts metric).
EVICTED = "Evicted"
PREEMPTED = "Preempted"
NODE_LOST = "NodeLost"
KILLED_BY_SIGNAL = "KilledBySignal"
RETRIABLE_EXIT = "RetriableExit"
HANG = "Hang"
OOM_KILLED = "OOMKilled"
BAD_INPUT = "BadInput"
APPLICATION_ERROR = "ApplicationError"

INFRASTRUCTURE_REASONS = (EVICTED, PREEMPTED, NODE_LOST, KILLED_BY_SIGNAL, RETRIABLE_EXIT, HANG)
APPLICATION_REASONS = (OOM_KILLED, BAD_INPUT, APPLICATION_ERROR)

# Order in which a cause is reported when several ranks fail differently.
_PRIORITY = (NODE_LOST, EVICTED, PREEMPTED, KILLED_BY_SIGNAL, RETRIABLE_EXIT, HANG, OOM_KILLED, BAD_INPUT, APPLICATION_ERROR)

# Kubernetes DisruptionTarget reasons that are not the node's fault.
_PREEMPTION_REASONS = frozenset({"PreemptionByScheduler", "PreemptionByKubeScheduler", "PreemptionByKueue"})

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ProcessEnd:
    """What is known about one pod (Kubernetes) or process (embedded) of an attempt.

    ``exit_code`` None means still running or unknown. A process killed by a signal has
    ``signal`` set (embedded: a negative returncode; Kubernetes: exit code 128+N with no
    container reason other than Error). ``disruption`` is the pod's DisruptionTarget reason
    (or "Evicted" for a pod with status.reason Evicted).
    """

    name: str
    node: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    disruption: str | None = None
    node_lost: bool = False
    log_tail: str = ""


@dataclass(frozen=True)
class Failure:
    failure_class: FailureClass
    reason: str
    message: str
    nodes: tuple[str, ...] = ()
    log_tail: str = ""

    @property
    def retriable(self) -> bool:
        return self.failure_class == INFRASTRUCTURE


def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _cause(end: ProcessEnd) -> str | None:
    if end.node_lost:
        return NODE_LOST
    if end.disruption:
        return PREEMPTED if end.disruption in _PREEMPTION_REASONS else EVICTED
    if end.reason == "OOMKilled":
        return OOM_KILLED
    if end.signal is not None:
        return KILLED_BY_SIGNAL
    if end.exit_code is None or end.exit_code == EXIT_OK:
        return None
    if end.exit_code == EXIT_RETRIABLE:
        return RETRIABLE_EXIT
    if end.exit_code == EXIT_BAD_INPUT:
        return BAD_INPUT
    # A container killed by a signal exits 128+N; Kubernetes reports reason Error for it.
    if end.exit_code > 128 and end.exit_code - 128 in (_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT,
                                                       _signal.SIGHUP, _signal.SIGABRT, _signal.SIGSEGV,
                                                       _signal.SIGBUS):
        return KILLED_BY_SIGNAL
    return APPLICATION_ERROR


def _describe(end: ProcessEnd, cause: str) -> str:
    where = f"{end.name}" + (f" on node {end.node}" if end.node else "")
    if cause == NODE_LOST:
        return f"node {end.node or '?'} became NotReady or disappeared under {end.name}"
    if cause in (EVICTED, PREEMPTED):
        return f"{where} was {'preempted' if cause == PREEMPTED else 'evicted'} ({end.disruption})"
    if cause == OOM_KILLED:
        return f"{where} ran out of memory (OOMKilled); lower training.microBatchSize or raise resources.memory"
    if cause == KILLED_BY_SIGNAL:
        number = end.signal if end.signal is not None else (end.exit_code or 128) - 128
        return f"{where} was killed by {signal_name(number)}"
    if cause == RETRIABLE_EXIT:
        return f"{where} exited {EXIT_RETRIABLE} (the trainer detected a communication, device or storage fault)"
    if cause == BAD_INPUT:
        return f"{where} exited {EXIT_BAD_INPUT}: the spec or an input is wrong"
    return f"{where} exited {end.exit_code}"


def classify(ends: Sequence[ProcessEnd], *, hung: bool = False, hang_message: str = "") -> Failure | None:
    """The failure of an attempt, or None if no process failed (running or succeeded)."""
    causes = [(c, e) for e in ends if (c := _cause(e)) is not None]
    if not causes and not hung:
        return None
    if not causes:
        return Failure(INFRASTRUCTURE, HANG, hang_message or "no step progress within hangTimeout")
    causes.sort(key=lambda ce: _PRIORITY.index(ce[0]))
    top, end = causes[0]
    failure_class: FailureClass = INFRASTRUCTURE if top in INFRASTRUCTURE_REASONS else APPLICATION
    nodes = _blamed_nodes(causes, len(ends)) if failure_class == INFRASTRUCTURE else ()
    message = _describe(end, top)
    if len(causes) > 1:
        message += f" ({len(causes) - 1} more process(es) failed)"
    log_tail = _tail(end.log_tail) if end.log_tail else next((_tail(e.log_tail) for _, e in causes if e.log_tail), "")
    return Failure(failure_class, top, message, nodes, log_tail)


def _blamed_nodes(causes: list[tuple[str, ProcessEnd]], total: int) -> tuple[str, ...]:
    direct = {e.node for c, e in causes if c in (NODE_LOST, EVICTED) and e.node}
    partial = {c for c, _ in causes if c in (KILLED_BY_SIGNAL, RETRIABLE_EXIT)}
    for cause in partial:
        hit = {e.node for c, e in causes if c == cause and e.node}
        if len([1 for c, _ in causes if c == cause]) < total:
            direct |= hit
    return tuple(sorted(direct))


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def is_hung(*, last_progress: float | None, now: float, hang_timeout_seconds: int | None) -> bool:
    """No step progress for ``hang_timeout_seconds`` since ``last_progress`` (unix time)."""
    if hang_timeout_seconds is None or last_progress is None:
        return False
    return now - last_progress >= hang_timeout_seconds
