"""crucible.core.failure: infrastructure vs application, table-driven."""

from __future__ import annotations

import pytest

from crucible.core import failure as f
from crucible.core.failure import ProcessEnd, classify, is_hung

OK = ProcessEnd("p-1", node="n1", exit_code=0)
RUNNING = ProcessEnd("p-1", node="n1")


@pytest.mark.parametrize(
    ("ends", "cls", "reason", "nodes"),
    [
        ([ProcessEnd("p-0", "n0", exit_code=75), ProcessEnd("p-1", "n1", exit_code=0)], "infrastructure", f.RETRIABLE_EXIT, ("n0",)),
        ([ProcessEnd("p-0", "n0", exit_code=75), ProcessEnd("p-1", "n1", exit_code=75)], "infrastructure", f.RETRIABLE_EXIT, ()),
        ([ProcessEnd("p-0", "n0", signal=9), RUNNING], "infrastructure", f.KILLED_BY_SIGNAL, ("n0",)),
        ([ProcessEnd("p-0", "n0", exit_code=137, reason="Error"), OK], "infrastructure", f.KILLED_BY_SIGNAL, ("n0",)),
        ([ProcessEnd("p-0", "n0", exit_code=143, reason="Error"), OK], "infrastructure", f.KILLED_BY_SIGNAL, ("n0",)),
        ([ProcessEnd("p-0", "n0", disruption="DeletionByTaintManager"), OK], "infrastructure", f.EVICTED, ("n0",)),
        ([ProcessEnd("p-0", "n0", disruption="PreemptionByScheduler"), OK], "infrastructure", f.PREEMPTED, ()),
        # a lost node wins over the NCCL errors of its peers, which are not blamed
        ([ProcessEnd("p-0", "n0", exit_code=1), ProcessEnd("p-1", "n1", node_lost=True)], "infrastructure", f.NODE_LOST, ("n1",)),
        ([ProcessEnd("p-0", "n0", exit_code=137, reason="OOMKilled"), OK], "application", f.OOM_KILLED, ()),
        ([ProcessEnd("p-0", "n0", exit_code=2), OK], "application", f.BAD_INPUT, ()),
        ([ProcessEnd("p-0", "n0", exit_code=1), OK], "application", f.APPLICATION_ERROR, ()),
        ([ProcessEnd("p-0", "n0", exit_code=3), RUNNING], "application", f.APPLICATION_ERROR, ()),
    ],
)
def test_classify(ends: list[ProcessEnd], cls: str, reason: str, nodes: tuple[str, ...]) -> None:
    got = classify(ends)
    assert got is not None
    assert (got.failure_class, got.reason, got.nodes) == (cls, reason, nodes)
    assert got.retriable is (cls == "infrastructure")
    assert got.reason in (f.INFRASTRUCTURE_REASONS if got.retriable else f.APPLICATION_REASONS)


@pytest.mark.parametrize("ends", [[], [OK], [RUNNING, OK], [ProcessEnd("p", exit_code=0, reason="Completed")]])
def test_nothing_failed(ends: list[ProcessEnd]) -> None:
    assert classify(ends) is None


def test_hang_is_infrastructure_without_blame() -> None:
    got = classify([RUNNING], hung=True, hang_message="no step for 30m")
    assert got is not None and (got.reason, got.nodes, got.message) == (f.HANG, (), "no step for 30m")


def test_message_and_log_tail() -> None:
    log = "\n".join(f"line {i}" for i in range(100)) + "\nValueError: bad vocab\n"
    got = classify([ProcessEnd("job-0-abc", "gpu-7", exit_code=1, log_tail=log), ProcessEnd("job-1", "gpu-8", exit_code=1)])
    assert got is not None
    assert got.message == "job-0-abc on node gpu-7 exited 1 (1 more process(es) failed)"
    assert got.log_tail.splitlines()[-1] == "ValueError: bad vocab"
    assert len(got.log_tail.splitlines()) == f.LOG_TAIL_LINES


def test_oom_message_says_what_to_do() -> None:
    got = classify([ProcessEnd("p", "n", exit_code=137, reason="OOMKilled")])
    assert got is not None and "resources.memory" in got.message


@pytest.mark.parametrize(
    ("last", "now", "timeout", "hung"),
    [(None, 100.0, 10, False), (100.0, 109.0, 10, False), (100.0, 110.0, 10, True), (100.0, 1e9, None, False)],
)
def test_is_hung(last: float | None, now: float, timeout: int | None, hung: bool) -> None:
    assert is_hung(last_progress=last, now=now, hang_timeout_seconds=timeout) is hung
