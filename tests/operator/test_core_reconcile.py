"""The pure reconcile step both backends run (crucible.core.reconcile), table-driven with builders."""

from __future__ import annotations

import pytest
from opbuilders import make, make_status

from crucible.core.failure import ProcessEnd
from crucible.core.reconcile import (
    AttemptObservation,
    EnsureAttempt,
    Observed,
    Settings,
    StartAttempt,
    StartRole,
    StopAttempt,
    reconcile,
    roles_state,
)
from crucible.core.status import MetricsSample, rfc3339
from crucible.core.transitions import Transition

NOW = 1_700_000_000.0
SETTINGS = Settings(storage_root="s3://bucket/runs")
POLICY = {"maxRestarts": 2, "backoffSeconds": 0, "maxBackoffSeconds": 0, "hangTimeout": "60s"}


def running(**fields: object) -> dict[str, object]:
    return {"phase": "Running", "attempt": 0, "startTime": rfc3339(NOW - 100),
            "progress": {"step": 5, "updatedAt": rfc3339(NOW - 10)}, **fields}


@pytest.mark.parametrize(
    ("roles", "states", "want"),
    [
        (("data",), {}, ("absent", "data")),
        (("filter", "dedup", "tokenize"), {"filter": "running"}, ("running", None)),
        (("filter", "dedup", "tokenize"), {"filter": "succeeded"}, ("running", "dedup")),
        (("filter", "dedup", "tokenize"), {"filter": "succeeded", "dedup": "pending"}, ("pending", None)),
        (("filter", "dedup", "tokenize"), {"filter": "succeeded", "dedup": "failed"}, ("failed", None)),
        (("filter", "dedup"), {"filter": "succeeded", "dedup": "succeeded"}, ("succeeded", None)),
    ],
)
def test_roles_run_one_after_the_other(roles: tuple[str, ...], states: dict, want: tuple) -> None:
    assert roles_state(roles, states) == want


def test_a_new_run_starts_with_a_plan_and_an_output() -> None:
    run = make("PretrainRun", "pt")
    step = reconcile(run, Observed(make_status(), AttemptObservation("absent", next_role="trainer")), NOW,
                     settings=SETTINGS)
    assert step.decision.transition is Transition.START
    (action,) = step.actions
    assert isinstance(action, StartAttempt) and action.plan.attempt == 0
    assert step.status.output_uri == "s3://bucket/runs/ml/pretrainrun/pt/output"
    assert [e.reason for e in step.events] == ["AttemptStarted"]


def test_progress_checkpoint_goodput_and_spikes_come_from_the_sample() -> None:
    run = make("PretrainRun", "pt", failurePolicy=POLICY)
    sample = MetricsSample(step=7, loss=2.5, tokens=7000, tokens_per_second=100.0, checkpoint_step=6, loss_spikes=1)
    step = reconcile(run, Observed(make_status(**running()), AttemptObservation("running"), metrics=sample,
                                   metrics_seen=True), NOW, settings=SETTINGS)
    assert step.decision.transition is Transition.ATTEMPT_RUNNING and step.actions == ()
    s = step.status
    assert (s.progress.step, s.progress.loss, s.progress.updated_at) == (7, 2.5, rfc3339(NOW))
    assert s.last_checkpoint is not None and s.last_checkpoint.uri.endswith("/pretrainrun/pt/checkpoints/step-000000006")
    assert s.goodput == pytest.approx(70 / 100)
    assert s.loss_spikes == 1 and [e.reason for e in step.events] == ["LossSpike"]


def test_no_progress_for_the_hang_timeout_restarts_with_a_kill() -> None:
    run = make("PretrainRun", "pt", failurePolicy=POLICY)
    status = make_status(**running(progress={"step": 5, "updatedAt": rfc3339(NOW - 61)}))
    observed = Observed(status, AttemptObservation("running"), metrics=MetricsSample(step=5), metrics_seen=True)
    step = reconcile(run, observed, NOW, settings=SETTINGS)
    assert (step.decision.transition, step.decision.reason) == (Transition.RESTART, "Hang")
    assert step.actions == (StopAttempt(0, hang=True),)
    # never read the metrics in this attempt: an unreachable endpoint restarts nothing
    unseen = Observed(status, AttemptObservation("running"))
    assert reconcile(run, unseen, NOW, settings=SETTINGS).decision.transition is Transition.ATTEMPT_RUNNING


def test_a_failed_process_is_classified_and_the_attempt_stopped() -> None:
    run = make("PretrainRun", "pt", failurePolicy=POLICY)
    ends = (ProcessEnd("pt-0", exit_code=None, signal=9),)
    step = reconcile(run, Observed(make_status(**running()), AttemptObservation("failed", ends)), NOW,
                     settings=SETTINGS)
    assert (step.decision.transition, step.decision.reason) == (Transition.RESTART, "KilledBySignal")
    assert step.status.phase == "Restarting" and step.status.attempt == 1
    assert step.actions == (StopAttempt(0),)


def test_the_next_role_is_started_when_its_turn_comes() -> None:
    run = make("DataPipeline", "dp", workers=2)
    step = reconcile(run, Observed(make_status(**running()), AttemptObservation("running", next_role="dedup")), NOW,
                     settings=SETTINGS)
    (action,) = step.actions
    assert isinstance(action, StartRole) and action.role == "dedup"
    assert [r.name for r in action.plan.roles] == ["filter", "dedup", "tokenize"]


def test_children_are_ensured_once_when_the_backend_asks() -> None:
    run = make("PretrainRun", "pt")
    observed = Observed(make_status(**running()), AttemptObservation("pending"), children_ensured=False)
    (action,) = reconcile(run, observed, NOW, settings=SETTINGS).actions
    assert isinstance(action, EnsureAttempt) and action.plan is not None and action.attempt == 0


def test_success_records_the_results_the_backend_read() -> None:
    run = make("PretrainRun", "pt")
    step = reconcile(run, Observed(make_status(**running()), AttemptObservation("succeeded", results={"finalLoss": 2.0})),
                     NOW, settings=SETTINGS)
    assert step.decision.transition is Transition.SUCCEED
    assert step.status.results == {"finalLoss": 2.0} and step.status.phase == "Succeeded"
