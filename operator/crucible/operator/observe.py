"""Observe: the current attempt's Jobs, Pods and Nodes as the core sees them (pure).

    observe_attempt(jobs, pods, nodes, *, roles) -> AttemptView

``jobs`` and ``pods`` are the objects labelled with the run and the attempt; ``nodes`` maps
each node name a pod ran on to its Node object (None when the node is gone). Roles run in
order (a DataPipeline's stages): :attr:`AttemptView.next_role` names the role whose Job must
be created next, once every earlier one has completed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crucible.core.decide import AttemptState
from crucible.core.failure import ProcessEnd
from crucible.core.reconcile import roles_state
from crucible.operator.render import CONTAINER, JOB_INDEX_LABEL, LABEL_ROLE
from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_BAD_INPUT, EXIT_RETRIABLE


@dataclass(frozen=True)
class AttemptView:
    state: AttemptState
    ends: tuple[ProcessEnd, ...] = ()
    next_role: str | None = None
    rank0_ip: str | None = None
    termination_message: str | None = None
    """Rank 0's container termination message (the trainer's _SUCCESS JSON on success)."""
    pods_by_node: Mapping[str, str] = field(default_factory=dict)


def _job_done(job: Mapping[str, Any]) -> bool:
    conds = job.get("status", {}).get("conditions") or []
    if any(c.get("type") == "Complete" and c.get("status") == "True" for c in conds):
        return True
    completions = job.get("spec", {}).get("completions") or 1
    return int(job.get("status", {}).get("succeeded") or 0) >= completions


def _job_failed(job: Mapping[str, Any]) -> bool:
    conds = job.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conds)


def node_lost(node: Mapping[str, Any] | None) -> bool:
    if node is None:
        return True
    conds = node.get("status", {}).get("conditions") or []
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    return ready is not None and ready.get("status") != "True"


def _container_state(pod: Mapping[str, Any]) -> dict[str, Any]:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return cs.get("state") or {}
    return {}


_TORCHRUN_SIGNAL = re.compile(r"exitcode\s*:\s*-(\d+)")
_KIND_CODES = {"bad-input": EXIT_BAD_INPUT, "application-error": EXIT_APPLICATION_ERROR, "retriable": EXIT_RETRIABLE}


def trainer_exit(message: str | None) -> tuple[int | None, str]:
    """The exit the trainer reported in its termination message, and the reasons.

    Under torchrun a pod's exit status is torchrun's own (1 whenever a worker failed), so each
    failing rank appends ``{"exitCode", "kind", "reason"}`` to ``$CRUCIBLE_TERMINATION_LOG``
    (crucible.trainer.faults). When ranks disagree, a bad input or an application error wins
    over a retriable fault: the peers of a crashed rank fail on communication, and that must
    not turn a bug into restarts. Not JSON (Kubernetes' fallback to the log tail): the exit of a
    worker torchrun reports as killed by a signal (``exitcode : -9``) as 128+N, else (None, text).
    """
    if not message:
        return None, ""
    codes: list[int] = []
    reasons: list[str] = []
    for line in message.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "exitCode" in doc:
            codes.append(_KIND_CODES.get(doc.get("kind", ""), int(doc["exitCode"])))
            reasons.append(str(doc.get("reason", "")))
    if not codes:
        # torchrun's own report of a worker that died of a signal (its exit status is then 1)
        killed = _TORCHRUN_SIGNAL.search(message)
        if killed:
            return 128 + int(killed.group(1)), message
        return None, message
    for code in (EXIT_BAD_INPUT, EXIT_APPLICATION_ERROR, EXIT_RETRIABLE):
        if code in codes:
            return code, "\n".join(dict.fromkeys(r for c, r in zip(codes, reasons, strict=True) if c == code))
    return codes[0], "\n".join(reasons)


def process_end(pod: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any] | None]) -> ProcessEnd:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    node = spec.get("nodeName")
    terminated = _container_state(pod).get("terminated")
    disruption = None
    for c in status.get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            disruption = c.get("reason") or "DisruptionTarget"
    if status.get("reason") == "Evicted":
        disruption = disruption or "Evicted"
    lost = bool(node) and node in nodes and node_lost(nodes[node]) and status.get("phase") not in ("Succeeded",)
    exit_code = terminated.get("exitCode") if terminated else None
    signal = terminated.get("signal") if terminated else None
    log_tail = (terminated.get("message") or "") if terminated else ""
    if terminated and exit_code not in (None, 0) and terminated.get("reason") != "OOMKilled":
        reported, detail = trainer_exit(log_tail)
        if reported is not None:
            exit_code, log_tail = reported, detail
    failed_phase = status.get("phase") == "Failed"
    if failed_phase and exit_code is None and not disruption and not lost:
        exit_code = 137  # failed with no container status: killed before it could report
    return ProcessEnd(
        name=meta.get("name", "?"),
        node=node,
        exit_code=exit_code,
        signal=signal,
        reason=terminated.get("reason") if terminated else None,
        disruption=disruption if (failed_phase or disruption) else None,
        node_lost=lost,
        log_tail=log_tail,
    )


def observe_attempt(
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any] | None],
    *,
    roles: Sequence[str],
) -> AttemptView:
    """The attempt's state from its Jobs' and Pods'; the order of roles is
    :func:`crucible.core.reconcile.roles_state`'s, as for local processes."""
    by_role = {j.get("metadata", {}).get("labels", {}).get(LABEL_ROLE): j for j in jobs}
    ends = tuple(process_end(p, nodes) for p in pods)

    def role_of(p: Mapping[str, Any]) -> str | None:
        return p.get("metadata", {}).get("labels", {}).get(LABEL_ROLE)

    role_states: dict[str, AttemptState] = {}
    for role, job in by_role.items():
        if role is None:
            continue
        if _job_failed(job):
            role_states[role] = "failed"
        elif _job_done(job):
            role_states[role] = "succeeded"
        else:
            running = any(p.get("status", {}).get("phase") == "Running" for p in pods if role_of(p) == role)
            role_states[role] = "running" if running else "pending"
    if role_states and any(e.exit_code not in (None, 0) or e.signal is not None or e.node_lost or e.disruption for e in ends):
        role_states[next((r for r in roles if r in role_states), roles[0] if roles else "")] = "failed"
    state, next_role = roles_state(roles, role_states)
    if state == "absent":
        return AttemptView("absent", next_role=next_role)

    current = next_role or next((r for r in roles if role_states.get(r) != "succeeded"), roles[-1] if roles else None)
    pods_by_node = {p["spec"]["nodeName"]: p["metadata"]["name"] for p in pods if p.get("spec", {}).get("nodeName")}
    rank0 = next((p for p in pods if role_of(p) == current
                  and str(p.get("metadata", {}).get("annotations", {}).get(JOB_INDEX_LABEL,
                          p.get("metadata", {}).get("labels", {}).get(JOB_INDEX_LABEL, "0"))) == "0"), None)
    rank0_ip = rank0.get("status", {}).get("podIP") if rank0 else None
    term = _container_state(rank0).get("terminated", {}) if rank0 else {}
    message = term.get("message") if term else None
    if state == "succeeded":
        # With several workers (a DataPipeline stage), the worker that finished last wrote the
        # _SUCCESS results, not necessarily index 0: take the first message that carries them.
        last_role = [p for p in pods if role_of(p) == roles[-1]]
        messages = [_container_state(p).get("terminated", {}).get("message") for p in [rank0, *last_role] if p]
        message = next((m for m in messages if m and '"results"' in m), message)
    return AttemptView(state, ends, next_role, rank0_ip, message, pods_by_node)
