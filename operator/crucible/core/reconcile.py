"""One reconcile step, the same for both backends (pure), and the pass that drives it.

    reconcile(run, observed, now, *, settings) -> Step         # pure
    await run_pass(backend, run, now, *, settings) -> Step     # observe -> step -> act -> write -> events
    roles_state(roles, role_states) -> (AttemptState, next_role)

A backend (:class:`Backend`: the Kopf operator's ``KubeBackend``, the embedded runner's
``LocalBackend``) observes a run into an :class:`Observed` — its status, the runs it reads
(``fromRun``), the current attempt's processes as :class:`~crucible.core.failure.ProcessEnd`\\ s,
and what the trainer last reported (:class:`~crucible.core.status.MetricsSample`). The step
computes everything else once: progress, the last checkpoint, goodput, loss spikes, the hang
clock, the failure (:func:`~crucible.core.failure.classify`), the :class:`Decision`
(:func:`~crucible.core.decide.decide`), the launch plan of a new attempt or of the next role
(:func:`~crucible.core.plan.plan`), the next status and the events
(:data:`~crucible.core.transitions.TRANSITIONS`). The backend then performs the
:data:`Action`\\ s, writes the status once if it changed, and only then emits the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crucible.api.common import CheckpointRef, Resource, RunStatus
from crucible.core import status as st
from crucible.core.decide import AttemptState, Decision, Dependency, Situation, decide
from crucible.core.failure import Failure, ProcessEnd, classify, is_hung
from crucible.core.plan import SPEC_PATH, LaunchPlan, PlanError, default_checkpoint_uri, plan
from crucible.core.transitions import Event, Transition, events_for, next_status
from crucible.trainer.config.common import FailurePolicy

INVALID_SPEC = "InvalidSpec"
PLAN_ERROR = "PlanError"


@dataclass(frozen=True)
class AttemptObservation:
    """The current attempt as a backend found it."""

    state: AttemptState
    ends: tuple[ProcessEnd, ...] = ()
    next_role: str | None = None
    """A role (a DataPipeline stage) whose turn has come and that is not started yet."""
    results: Mapping[str, Any] | None = None
    """The stage's ``_SUCCESS`` results, when the attempt succeeded and they could be read."""
    failure: Failure | None = None
    """A failure the backend found beyond the processes' ends (every process exited 0 but no
    ``_SUCCESS`` was written); else the step classifies ``ends``."""


@dataclass(frozen=True)
class Observed:
    status: RunStatus
    attempt: AttemptObservation
    dependencies: tuple[Dependency, ...] = ()
    metrics: st.MetricsSample | None = None
    """What the trainer reported this pass (None: nothing read)."""
    metrics_seen: bool = False
    """The backend has read the trainer's metrics during this attempt: only then can the run be
    called hung (an unreachable metrics endpoint must not restart every run)."""
    generation: int | None = None
    children_ensured: bool = True
    """False: the backend has not checked, since it started, that every object of the current
    attempt exists (an earlier operator may have died between creates)."""


@dataclass(frozen=True)
class Settings:
    storage_root: str
    spec_path: str = SPEC_PATH
    python: str = "python"


@dataclass(frozen=True)
class StartAttempt:
    plan: LaunchPlan


@dataclass(frozen=True)
class StartRole:
    plan: LaunchPlan
    role: str


@dataclass(frozen=True)
class EnsureAttempt:
    """Create whatever of the attempt is missing (idempotent); ``plan`` None: cannot be planned
    now (inputs are not fetched for a Running run), so there is nothing to ensure."""

    attempt: int
    plan: LaunchPlan | None


@dataclass(frozen=True)
class StopAttempt:
    attempt: int
    hang: bool = False
    """Stopped for a hang: processes are killed at once (they do not answer signals politely)."""


ActionT = StartAttempt | StartRole | EnsureAttempt | StopAttempt


@dataclass(frozen=True)
class Step:
    decision: Decision
    status: RunStatus
    actions: tuple[ActionT, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    output_uri: str | None = None


def roles_state(roles: Sequence[str], role_states: Mapping[str, AttemptState]) -> tuple[AttemptState, str | None]:
    """An attempt's state from its roles' (run one after the other), and the role due to start.

    A role absent from ``role_states`` was not started. Any failed role fails the attempt; all
    succeeded: succeeded; a finished role followed by one not started: running, that one due.
    """
    if not role_states:
        return "absent", roles[0] if roles else None
    if any(s == "failed" for s in role_states.values()):
        return "failed", None
    current = next((r for r in roles if role_states.get(r) != "succeeded"), None)
    if current is None:
        return "succeeded", None
    state = role_states.get(current)
    if state is None or state == "absent":
        return "running", current
    return state, None


def reject(status: RunStatus, message: str, now: float) -> Step:
    """A resource that does not validate fails (once) with ``InvalidSpec``."""
    decision = Decision(Transition.FAIL, INVALID_SPEC, message or "the resource does not validate")
    if status.phase == "Failed":
        return Step(decision, status)
    new = next_status(status, decision, now=now)
    return Step(decision, new, events=events_for(decision, status, new))


def policy_of(run: Resource) -> FailurePolicy:
    return getattr(run.spec, "failure_policy", None) or FailurePolicy()


def _checkpoint(run: Resource, status: RunStatus, step: int | None, settings: Settings, now: float
                ) -> CheckpointRef | None:
    checkpoint = getattr(run.spec, "checkpoint", None)
    if step is None or step <= 0 or checkpoint is None:
        return None
    if status.last_checkpoint is not None and status.last_checkpoint.step == step:
        return status.last_checkpoint
    root = checkpoint.uri or default_checkpoint_uri(settings.storage_root, run.metadata.namespace or "default",
                                                    run.kind, run.name)
    return CheckpointRef(step=step, uri=f"{root.rstrip('/')}/step-{step:09d}", time=st.rfc3339(now))


def reconcile(run: Resource, observed: Observed, now: float, *, settings: Settings) -> Step:
    """The decision, next status, actions and events of one pass (pure)."""
    status = observed.status
    if status.phase in ("Succeeded", "Failed"):
        return Step(Decision(Transition.FINISHED, attempt=status.attempt), status)
    view = observed.attempt
    policy = policy_of(run)

    # progress, checkpoint, goodput, spikes: what the trainer reported
    progress = checkpoint = goodput = spikes = None
    sample = observed.metrics
    if sample is not None:
        training = getattr(run.spec, "training", None)
        progress = st.progress_from_sample(sample, previous=status.progress,
                                           total_steps=getattr(training, "max_steps", None), now=now)
        checkpoint = _checkpoint(run, status, sample.checkpoint_step, settings, now)
        started, kept = st.parse_time(status.start_time), sample.kept()
        if kept is not None and started is not None:
            goodput = st.goodput(kept, now - started)
        if sample.loss_spikes is not None:
            spikes = max(sample.loss_spikes, status.loss_spikes)

    # the hang clock: no step progress for failurePolicy.hangTimeout, metrics read this attempt
    hang_timeout = policy.hang_timeout_seconds if getattr(run.spec, "failure_policy", None) else None
    hung = (view.state == "running" and status.phase == "Running" and observed.metrics_seen
            and is_hung(last_progress=st.parse_time((progress or status.progress).updated_at), now=now,
                        hang_timeout_seconds=hang_timeout))
    failure = view.failure or classify(
        view.ends, hung=hung, hang_message=f"no step progress for {policy.hang_timeout} (failurePolicy.hangTimeout)")

    decision = decide(Situation(status=status, now=now, attempt_state=view.state, policy=policy,
                                suspend=bool(getattr(run.spec, "suspend", False)),
                                dependencies=observed.dependencies, failure=failure))

    actions: list[ActionT] = []
    output_uri = None
    results = None
    inputs = {d.path: d.output_uri for d in observed.dependencies if d.output_uri}
    try:
        if decision.action == "start":
            p = _plan(run, status, decision.attempt, decision.excluded_nodes, decision.inputs, settings, now)
            actions.append(StartAttempt(p))
            output_uri = p.output_uri
        elif decision.action in ("restart", "suspend"):
            actions.append(StopAttempt(status.attempt, hang=bool(decision.failure and hung)))
        elif decision.action == "succeed":
            results = view.results
        elif decision.action == "wait" and view.next_role is not None and view.state == "running":
            p = _plan(run, status, status.attempt, tuple(status.failed_nodes), inputs, settings, now)
            actions.append(StartRole(p, view.next_role))
    except PlanError as exc:
        decision = Decision(Transition.FAIL, PLAN_ERROR, str(exc), attempt=status.attempt)
        actions = []
    if decision.action == "wait" and view.state in ("pending", "running") and not observed.children_ensured:
        try:
            ensured: LaunchPlan | None = _plan(run, status, status.attempt, tuple(status.failed_nodes), inputs,
                                               settings, now)
        except PlanError:
            ensured = None  # inputs are not fetched for a Running run, whose pods mounted the spec already
        actions.append(EnsureAttempt(status.attempt, ensured))

    new = next_status(status, decision, now=now, generation=observed.generation, output_uri=output_uri,
                      results=results, progress=progress, last_checkpoint=checkpoint, goodput=goodput,
                      loss_spikes=spikes)
    stage = _stage_started(run, actions)
    if stage is not None:  # status.progress.stage: the DataPipeline's Stage printer column
        new = new.model_copy(update={"progress": new.progress.model_copy(update={"stage": stage})})
    return Step(decision, new, tuple(actions), events_for(decision, status, new),
                requeue_after=decision.delay_seconds if decision.action == "wait" else None, output_uri=output_uri)


def _stage_started(run: Resource, actions: Sequence[Any]) -> str | None:
    """The DataPipeline stage (role) this pass starts, if any."""
    if run.kind != "DataPipeline":
        return None
    for action in actions:
        if isinstance(action, StartRole):
            return action.role
        if isinstance(action, StartAttempt) and action.plan.roles:
            return action.plan.roles[0].name
    return None


def _plan(run: Resource, status: RunStatus, attempt: int, excluded: Sequence[str], inputs: Mapping[str, str],
          settings: Settings, now: float) -> LaunchPlan:
    return plan(run, storage_root=settings.storage_root, attempt=attempt, restarts=status.restarts,
                excluded_nodes=excluded, inputs=inputs, run_started=st.parse_time(status.start_time) or now,
                spec_path=settings.spec_path, python=settings.python)


# ------------------------------------------------------------------------------ the pass
class Backend(Protocol):
    """What a backend does for the step. The Kubernetes backend talks to the API server
    through a small client interface (create/get/list/patch/delete), never a particular HTTP
    library; the local backend starts processes and writes ``state.json``."""

    async def observe(self, run: Resource, status: RunStatus) -> Observed:
        """The run as it is now."""
        ...

    async def start_attempt(self, run: Resource, plan: LaunchPlan) -> None:
        """Create (idempotently) the attempt's first role and everything it needs."""
        ...

    async def start_role(self, run: Resource, plan: LaunchPlan, role: str) -> None:
        """Start the next role of the current attempt (a DataPipeline stage)."""
        ...

    async def ensure_attempt(self, run: Resource, action: EnsureAttempt) -> None:
        """Create what is missing of the current attempt (idempotent; may do nothing)."""
        ...

    async def stop_attempt(self, run: Resource, action: StopAttempt) -> None:
        """Stop and remove the attempt's processes (checkpoints stay)."""
        ...

    async def write_status(self, run: Resource, old: RunStatus, new: RunStatus, step: Step) -> bool:
        """Write the status if it changed; False: it could not be written (a conflict), and
        the events are then not emitted."""
        ...

    async def emit_event(self, run: Resource, event: Event) -> None:
        ...


async def run_pass(backend: Backend, run: Resource, status: RunStatus, now: float, *, settings: Settings) -> Step:
    """observe -> reconcile -> act -> one status write -> events (only after the write)."""
    observed = await backend.observe(run, status)
    step = reconcile(run, observed, now, settings=settings)
    for action in step.actions:
        if isinstance(action, StartAttempt):
            await backend.start_attempt(run, action.plan)
        elif isinstance(action, StartRole):
            await backend.start_role(run, action.plan, action.role)
        elif isinstance(action, EnsureAttempt):
            await backend.ensure_attempt(run, action)
        else:
            await backend.stop_attempt(run, action)
    if await backend.write_status(run, status, step.status, step):
        for event in step.events:
            await backend.emit_event(run, event)
    return step


__all__ = [
    "INVALID_SPEC",
    "PLAN_ERROR",
    "AttemptObservation",
    "Backend",
    "EnsureAttempt",
    "Observed",
    "Settings",
    "StartAttempt",
    "StartRole",
    "Step",
    "StopAttempt",
    "reconcile",
    "reject",
    "roles_state",
    "run_pass",
]
