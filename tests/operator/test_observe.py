"""crucible.operator.observe: Jobs, Pods and Nodes of an attempt as the core sees them."""

from __future__ import annotations

from typing import Any

import pytest

from crucible.core import failure as f
from crucible.core.failure import classify
from crucible.operator.observe import observe_attempt, process_end

READY = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
NOT_READY = {"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}


def job(role: str = "trainer", *, done: bool = False, failed: bool = False, completions: int = 2) -> dict[str, Any]:
    conds = []
    if done:
        conds.append({"type": "Complete", "status": "True"})
    if failed:
        conds.append({"type": "Failed", "status": "True"})
    return {"metadata": {"name": f"r-{role}-0", "labels": {"crucible.dev/role": role}},
            "spec": {"completions": completions}, "status": {"conditions": conds}}


def pod(index: int, phase: str = "Running", *, node: str | None = "n1", role: str = "trainer",
        terminated: dict[str, Any] | None = None, reason: str | None = None,
        conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "podIP": f"10.0.0.{index + 1}", "conditions": conditions or []}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    if reason:
        status["reason"] = reason
    return {"metadata": {"name": f"r-0-{index}-x", "labels": {"crucible.dev/role": role},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": node} if node else {}, "status": status}


@pytest.mark.parametrize(
    ("jobs", "pods", "nodes", "state", "reason"),
    [
        ([], [], {}, "absent", None),
        ([job()], [], {}, "pending", None),
        ([job()], [pod(0, "Pending", node=None), pod(1, "Pending", node=None)], {}, "pending", None),
        ([job()], [pod(0), pod(1, node="n2")], {"n1": READY, "n2": READY}, "running", None),
        ([job(done=True)], [pod(0, "Succeeded", terminated={"exitCode": 0})], {"n1": READY}, "succeeded", None),
        ([job()], [pod(0), pod(1, node="n2")], {"n1": READY, "n2": NOT_READY}, "failed", f.NODE_LOST),
        ([job()], [pod(0), pod(1, node="gone")], {"n1": READY, "gone": None}, "failed", f.NODE_LOST),
        ([job()], [pod(0, "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})], {"n1": READY},
         "failed", f.OOM_KILLED),
        ([job()], [pod(0, "Failed", terminated={"exitCode": 75, "reason": "Error"}), pod(1, node="n2")],
         {"n1": READY, "n2": READY}, "failed", f.RETRIABLE_EXIT),
        ([job()], [pod(0, "Failed", reason="Evicted")], {"n1": READY}, "failed", f.EVICTED),
        ([job()], [pod(0, "Failed", conditions=[{"type": "DisruptionTarget", "status": "True",
                                                  "reason": "PreemptionByScheduler"}])], {"n1": READY},
         "failed", f.PREEMPTED),
        ([job(failed=True)], [], {}, "failed", None),
    ],
)
def test_observe_attempt(jobs, pods, nodes, state, reason) -> None:
    view = observe_attempt(jobs, pods, nodes, roles=("trainer",))
    assert view.state == state
    failure = classify(view.ends)
    assert (failure.reason if failure else None) == reason


def test_rank0_ip_and_termination_message() -> None:
    pods = [pod(1, "Succeeded", node="n2", terminated={"exitCode": 0, "message": ""}),
            pod(0, "Succeeded", terminated={"exitCode": 0, "message": '{"results": {"finalLoss": 2.0}}'})]
    view = observe_attempt([job(done=True)], pods, {"n1": READY, "n2": READY}, roles=("trainer",))
    assert view.rank0_ip == "10.0.0.1"
    assert view.termination_message == '{"results": {"finalLoss": 2.0}}'


def test_results_of_a_sharded_stage_come_from_the_worker_that_wrote_them() -> None:
    roles = ("filter", "dedup", "tokenize")
    jobs = [job(r, done=True) for r in roles]
    pods = [pod(0, "Succeeded", role="tokenize", terminated={"exitCode": 0, "message": ""}),
            pod(1, "Succeeded", node="n2", role="tokenize",
                terminated={"exitCode": 0, "message": '{"stage": "data", "results": {"documentsOut": 7}}'}),
            pod(0, "Succeeded", role="filter", terminated={"exitCode": 0, "message": ""})]
    view = observe_attempt(jobs, pods, {"n1": READY, "n2": READY}, roles=roles)
    assert view.state == "succeeded"
    assert view.termination_message == '{"stage": "data", "results": {"documentsOut": 7}}'


def test_sequential_roles_name_the_next_one() -> None:
    roles = ("filter", "dedup", "tokenize")
    done_filter = [job("filter", done=True)]
    view = observe_attempt(done_filter, [], {}, roles=roles)
    assert (view.state, view.next_role) == ("running", "dedup")
    view = observe_attempt([*done_filter, job("dedup")], [pod(0, role="dedup")], {"n1": READY}, roles=roles)
    assert (view.state, view.next_role) == ("running", None)
    all_done = [job(r, done=True) for r in roles]
    assert observe_attempt(all_done, [], {}, roles=roles).state == "succeeded"


def test_a_pod_that_failed_without_a_container_status_counts_as_killed() -> None:
    end = process_end(pod(0, "Failed"), {"n1": READY})
    assert end.exit_code == 137
    assert classify([end]).reason == f.KILLED_BY_SIGNAL


RETRIABLE = '{"exitCode": 75, "kind": "retriable", "reason": "NCCL watchdog timeout"}'
APP = '{"exitCode": 1, "kind": "application-error", "reason": "KeyError: step"}'


@pytest.mark.parametrize(
    ("message", "reason", "tail"),
    [
        (RETRIABLE, f.RETRIABLE_EXIT, "NCCL watchdog timeout"),
        (f"{RETRIABLE}\n{RETRIABLE}", f.RETRIABLE_EXIT, "NCCL watchdog timeout"),
        (f"{RETRIABLE}\n{APP}", f.APPLICATION_ERROR, "KeyError: step"),  # the crash, not its peers' timeouts
        ('{"exitCode": 2, "kind": "bad-input", "reason": "spec.data.uri: no shards"}', f.BAD_INPUT,
         "spec.data.uri: no shards"),
        ("Traceback (most recent call last):\nboom", f.APPLICATION_ERROR, "Traceback (most recent call last):\nboom"),
        ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  rank      : 3\n  exitcode  : -9 (pid: 77)",
         f.KILLED_BY_SIGNAL, "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  rank      : 3\n"
                             "  exitcode  : -9 (pid: 77)"),
    ],
)
def test_torchrun_exit_1_is_read_through_the_termination_message(message: str, reason: str, tail: str) -> None:
    end = process_end(pod(0, "Failed", terminated={"exitCode": 1, "reason": "Error", "message": message}),
                      {"n1": READY})
    failure = classify([end])
    assert failure is not None and failure.reason == reason
    assert failure.log_tail == tail


@pytest.mark.parametrize(
    ("message", "results"),
    [
        ('{"stage": "pretrain", "results": {"finalLoss": 2.1}}', {"finalLoss": 2.1}),
        ('{"exitCode": 75, "kind": "retriable", "reason": "x"}\n{"stage": "data", "results": {"tokens": 9}}', {"tokens": 9}),
        ('{"stage": "quantize",\n "results": {"sizeBytesAfter": 10}}', {"sizeBytesAfter": 10}),
        ("plain log text", None),
        (None, None),
    ],
)
def test_stage_results_come_from_the_termination_message(message: str | None, results: dict | None) -> None:
    from crucible.operator.observe import AttemptView
    from crucible.operator.reconcile import _results

    assert _results(AttemptView("succeeded", termination_message=message), "s3://bucket/out") == results


def test_stage_results_from_a_local_success_file(tmp_path) -> None:
    from crucible.operator.observe import AttemptView
    from crucible.operator.reconcile import _results

    (tmp_path / "_SUCCESS").write_text('{"stage": "pretrain", "finishedAt": "now", "results": {"perplexity": 12.5}}')
    assert _results(AttemptView("succeeded"), str(tmp_path)) == {"perplexity": 12.5}
