"""crucible.core.decide and crucible.core.status: every transition of the run lifecycle."""

from __future__ import annotations

import pytest
from opbuilders import make_status

from crucible.core import decide as d
from crucible.core import failure as f
from crucible.core.decide import Decision, Dependency, Situation, backoff_seconds, decide
from crucible.core.failure import Failure
from crucible.core.status import RESTARTING, find_condition, rfc3339, status_patch
from crucible.core.transitions import TRANSITIONS, Transition, next_status
from crucible.trainer.config.common import FailurePolicy

NOW = 1_800_000_000.0
POLICY = FailurePolicy(max_restarts=2, backoff_seconds=10, max_backoff_seconds=25)
INFRA = Failure("infrastructure", f.NODE_LOST, "node n1 is gone", ("n1",))
APP = Failure("application", f.APPLICATION_ERROR, "p-0 exited 1", (), "Traceback\nKeyError: 'x'")


def situation(phase: str = "Pending", state: str = "absent", **kw) -> Situation:
    status_fields = {k: kw.pop(k) for k in ("restarts", "consecutiveRestarts", "attempt", "failedNodes", "conditions")
                     if k in kw}
    return Situation(status=make_status(phase=phase, **status_fields), now=kw.pop("now", NOW),
                     attempt_state=state, policy=kw.pop("policy", POLICY), **kw)  # type: ignore[arg-type]


DP_OK = Dependency("data", "DataPipeline", "dp", "Succeeded", "s3://b/dp/output")
DP_RUNNING = Dependency("data", "DataPipeline", "dp", "Running")
DP_MISSING = Dependency("data", "DataPipeline", "dp", None)
DP_FAILED = Dependency("data", "DataPipeline", "dp", "Failed", message="ApplicationError: boom")


@pytest.mark.parametrize(
    ("s", "action", "reason", "attempt"),
    [
        (situation(), "start", d.STARTING, 0),
        (situation(dependencies=(DP_OK,)), "start", d.STARTING, 0),
        (situation(dependencies=(DP_RUNNING,)), "wait", d.WAITING_FOR_INPUT, 0),
        (situation("Waiting", dependencies=(DP_MISSING,)), "wait", d.WAITING_FOR_INPUT, 0),
        (situation("Waiting", dependencies=(DP_FAILED,)), "fail", d.DEPENDENCY_FAILED, 0),
        (situation(state="pending"), "wait", d.ATTEMPT_PENDING, 0),
        (situation("Running", "running"), "wait", d.ATTEMPT_RUNNING, 0),
        (situation("Running", "succeeded"), "succeed", d.SUCCEEDED, 0),
        (situation("Running", "failed", failure=APP), "fail", f.APPLICATION_ERROR, 0),
        (situation("Running", "failed", failure=INFRA), "restart", f.NODE_LOST, 1),
        (situation("Running", "running", failure=Failure("infrastructure", f.HANG, "no step")), "restart", f.HANG, 1),
        (situation("Running", "failed", failure=INFRA, restarts=2, attempt=2), "fail", d.RESTART_BUDGET_EXHAUSTED, 2),
        (situation("Running", "absent", attempt=1), "restart", d.ATTEMPT_LOST, 2),
        (situation("Running", "running", suspend=True), "suspend", d.SUSPENDED, 0),
        (situation("Suspended", "absent", suspend=True), "wait", d.SUSPENDED, 0),
        (situation("Suspended", "absent", attempt=1), "start", d.RESUMING, 2),
        (situation("Succeeded", "absent"), "none", d.FINISHED, 0),
        (situation("Failed", "failed", failure=INFRA), "none", d.FINISHED, 0),
    ],
)
def test_decide_table(s: Situation, action: str, reason: str, attempt: int) -> None:
    got = decide(s)
    assert (got.action, got.reason, got.attempt) == (action, reason, attempt)


def test_application_failure_carries_log_lines() -> None:
    got = decide(situation("Running", "failed", failure=APP))
    assert "KeyError: 'x'" in got.message


def test_restart_excludes_old_and_new_nodes_and_backs_off() -> None:
    got = decide(situation("Running", "failed", failure=INFRA, restarts=1, consecutiveRestarts=1, failedNodes=["n0"]))
    assert got.excluded_nodes == ("n0", "n1")
    assert got.delay_seconds == 20
    keep = decide(situation("Running", "failed", failure=INFRA,
                            policy=FailurePolicy(exclude_failed_nodes=False)))
    assert keep.excluded_nodes == ()


@pytest.mark.parametrize(("n", "delay"), [(0, 10), (1, 20), (2, 25), (40, 25)])
def test_backoff(n: int, delay: float) -> None:
    assert backoff_seconds(POLICY, n) == delay


def test_restart_waits_for_backoff_then_starts_next_attempt_from_status() -> None:
    running = make_status(phase="Running", attempt=0)
    restart = decide(Situation(running, NOW, "failed", POLICY, failure=INFRA))
    after = next_status(running, restart, now=NOW)
    assert (after.phase, after.restarts, after.attempt, after.failed_nodes) == ("Restarting", 1, 1, ["n1"])
    early = decide(Situation(after, NOW + 5, "absent", POLICY))
    assert (early.action, early.reason, early.delay_seconds) == ("wait", d.BACKOFF, 5)
    due = decide(Situation(after, NOW + 10, "absent", POLICY))
    assert (due.action, due.attempt, due.excluded_nodes) == ("start", 1, ("n1",))
    # a second restart re-stamps the Restarting condition and doubles the wait
    again = next_status(after, decide(Situation(after, NOW + 30, "failed", POLICY, failure=INFRA)), now=NOW + 30)
    cond = find_condition(again.conditions, RESTARTING)
    assert cond is not None and cond.last_transition_time == rfc3339(NOW + 30)
    assert decide(Situation(again, NOW + 45, "absent", POLICY)).action == "wait"
    assert decide(Situation(again, NOW + 50, "absent", POLICY)).action == "start"


def test_backoff_resets_after_an_attempt_that_ran_a_healthy_period() -> None:
    """Crash-looping attempts wait longer and longer; one that ran maxBackoffSeconds (25 s here) or
    longer was healthy, so the restart after it waits backoffSeconds again (kubelet-style reset),
    while status.restarts keeps counting every restart against maxRestarts."""
    policy = FailurePolicy(max_restarts=10, backoff_seconds=10, max_backoff_seconds=25)
    status = make_status(phase="Running", attempt=0)
    t = NOW
    delays = []
    for ran in (2, 3, 4, 30, 2, 100):  # seconds each attempt ran before its node died
        status = next_status(status, Decision(Transition.ATTEMPT_RUNNING, message="running"), now=t)
        t += ran
        restart = decide(Situation(status, t, "failed", policy, failure=INFRA))
        assert restart.action == "restart"
        status = next_status(status, restart, now=t)
        delays.append(restart.delay_seconds)
        # the backoff the Restarting phase waits is the one the restart announced
        assert decide(Situation(status, t + restart.delay_seconds - 1, "absent", policy)).action == "wait"
        resumed = decide(Situation(status, t + restart.delay_seconds, "absent", policy))
        assert resumed.action == "start"
        t += restart.delay_seconds
        status = next_status(status, resumed, now=t)
    assert delays == [10, 20, 25, 10, 20, 10]
    assert status.restarts == 6 and status.consecutive_restarts == 1
    # a status written before the field existed (no consecutiveRestarts) backs off from the base
    legacy = make_status(phase="Running", restarts=5)
    assert decide(Situation(legacy, NOW, "failed", policy, failure=INFRA)).delay_seconds == 10


def test_status_lifecycle_and_single_write_on_change() -> None:
    s0 = make_status()
    waiting = next_status(s0, Decision(Transition.WAIT_FOR_INPUT, message="waiting for DataPipeline dp"), now=NOW)
    assert waiting.phase == "Waiting"
    assert status_patch(s0, waiting) is not None
    assert status_patch(waiting, next_status(waiting, Decision(Transition.WAIT_FOR_INPUT,
                                                                message="waiting for DataPipeline dp"), now=NOW + 60)) is None
    started = next_status(waiting, Decision(Transition.START, message="go", attempt=0), now=NOW + 1, output_uri="/o")
    assert (started.phase, started.output_uri, started.start_time) == ("Pending", "/o", rfc3339(NOW + 1))
    running = next_status(started, Decision(Transition.ATTEMPT_RUNNING, message="attempt 0 is running"), now=NOW + 2)
    assert running.phase == "Running"
    done = next_status(running, Decision(Transition.SUCCEED), now=NOW + 3, results={"finalLoss": 2.5})
    assert (done.phase, done.results, done.completion_time) == ("Succeeded", {"finalLoss": 2.5}, rfc3339(NOW + 3))
    failed = next_status(running, Decision(Transition.FAIL, f.APPLICATION_ERROR, "p-0 exited 1\n--- last log lines ---\nboom"), now=NOW)
    assert failed.phase == "Failed" and failed.message == "ApplicationError: p-0 exited 1"
    cond = find_condition(failed.conditions, "Failed")
    assert cond is not None and "boom" in cond.message
    # the input status is never mutated
    assert s0.phase == "Pending" and s0.conditions == []


def test_every_transition_has_an_action_a_status_change_and_an_event_rule() -> None:
    assert set(TRANSITIONS) == set(Transition)
    for transition in Transition:
        spec = TRANSITIONS[transition]
        assert spec.action in ("wait", "start", "restart", "suspend", "succeed", "fail", "none")
        new = next_status(make_status(), Decision(transition, message="m", attempt=1), now=NOW)
        assert new is not None
