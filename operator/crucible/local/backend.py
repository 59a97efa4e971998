"""The local backend: one run's attempts as local processes, driven by the core's reconcile step.

    LocalBackend(runner_ctx...)   # crucible.core.reconcile.Backend

The embedded runner polls: each tick is :func:`crucible.core.reconcile.run_pass` with this
backend — the same step the Kopf operator runs — so hang detection, progress, goodput,
failure classification and the order of a DataPipeline's roles are the core's. Observe reads
the processes' exit codes, ``<checkpoint.uri>/metrics.jsonl`` (what the trainer reported) and
the checkpoint folder; act starts a role's process group (torchrun-style, see
:mod:`.processes`) or stops the attempt; the status goes to ``state.json``; events are printed.

Restarts are warm (:mod:`.warm`): once an attempt of a trainer stage has trained a step, the
backend pre-starts one spare interpreter per rank with the stage's imports done, and the next
attempt's processes are those spares, released with the attempt's arguments and environment.
``<run>/logs/timeline.jsonl`` records, per attempt, when its processes started (warm or cold) and
when their exit was seen; the trainer adds when its imports were done and its checkpoint read
(``metrics.jsonl``), so a restart's latency can be taken apart (``bench/goodput.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.api.common import Resource, RunStatus
from crucible.core.decide import AttemptState, Dependency
from crucible.core.failure import APPLICATION, APPLICATION_ERROR, Failure, ProcessEnd
from crucible.core.plan import LaunchPlan, Role, role_names
from crucible.core.reconcile import (
    AttemptObservation,
    EnsureAttempt,
    Observed,
    Step,
    StopAttempt,
    roles_state,
)
from crucible.core.status import MetricsSample, status_patch
from crucible.core.transitions import Event
from crucible.local import warm
from crucible.local.metrics import MetricsTail, latest_checkpoint, read_success
from crucible.local.processes import ProcessGroup, ProcessSpec, free_ports, torchrun_env
from crucible.local.ui import Ui
from crucible.local.warm import Spare
from crucible.local.workdir import RunState, WorkDir, write_json_atomic

LOG_TAIL_LINES = 20


@dataclass
class LocalBackend:
    """The processes of one run in this ``crucible run`` (nothing survives the runner: a run it
    finds Running without processes lost its attempt, and the step restarts it)."""

    workdir: WorkDir
    state: RunState
    ui: Ui
    label: str
    dependencies: tuple[Dependency, ...]
    trainer_command: list[str] | None = None
    plan: LaunchPlan | None = None
    groups: dict[str, ProcessGroup] = field(default_factory=dict)
    tail: MetricsTail | None = None
    checkpoint_step: int | None = None
    on_event: Callable[[Event], None] | None = None
    python: str = sys.executable
    spares: list[Spare] = field(default_factory=list)
    """Warm interpreters for the next attempt's first role, rank by rank."""
    started_at: float = 0.0
    exit_seen: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.state.namespace, self.state.kind, self.state.name)

    @property
    def current_role(self) -> str | None:
        return next(reversed(self.groups), None)

    # -- observe -------------------------------------------------------------------------
    async def observe(self, run: Resource, status: RunStatus) -> Observed:
        roles = role_names(run)
        role_states: dict[str, AttemptState] = {}
        for name, group in self.groups.items():
            codes = group.codes()
            if any(c not in (None, 0) for c in codes):
                role_states[name] = "failed"
            elif all(c == 0 for c in codes):
                role_states[name] = "succeeded"
            else:
                role_states[name] = "running"
        state, next_role = roles_state(roles, role_states)
        ends: tuple[ProcessEnd, ...] = ()
        results: Mapping[str, Any] | None = None
        failure = None
        if state == "failed":
            ends = self._ends()
            if not self.exit_seen:
                self.exit_seen = True
                self._timeline("exitSeen", codes=[c for g in self.groups.values() for c in g.codes()])
        elif state == "running":
            self._prestart_spares()
        elif state == "succeeded" and self.plan is not None:
            if not self.exit_seen:
                self.exit_seen = True
                self._timeline("exitSeen", codes=[c for g in self.groups.values() for c in g.codes()])
            success = read_success(Path(self.plan.output_uri))
            if success is None:
                failure = Failure(APPLICATION, APPLICATION_ERROR,
                                  f"every process exited 0 but {self.plan.output_uri}/_SUCCESS was not written "
                                  "(the stage must write it last)", log_tail=_tail(self._log(0)))
                state = "failed"
            else:
                results = success.get("results") or {}
        return Observed(status=status, attempt=AttemptObservation(state, ends, next_role, results, failure),
                        dependencies=self.dependencies, metrics=self._sample(), metrics_seen=True)

    def _sample(self) -> MetricsSample | None:
        if self.tail is None or self.plan is None:
            return None
        if self.tail.poll(time.time()):
            found = latest_checkpoint(Path(self.plan.checkpoint_uri or ""))
            self.checkpoint_step = found[0] if found else self.checkpoint_step
        return self.tail.sample(self.checkpoint_step)

    def _log(self, index: int, role: Role | None = None) -> Path:
        assert self.plan is not None
        log = self.workdir.log_path(*self.key, self.plan.attempt, index)
        if role is not None and role.sharded and index:
            log = log.with_name(f"attempt-{self.plan.attempt}.{role.name}-{index}.log")
        return log

    def _ends(self) -> tuple[ProcessEnd, ...]:
        assert self.plan is not None
        roles = {r.name: r for r in self.plan.roles}
        ends = []
        for name, group in self.groups.items():
            role = roles[name]
            for result in group.results():
                if result.stopped_by_us or result.returncode is None:
                    continue  # stopped because a peer failed, or still running: no evidence
                ends.append(ProcessEnd(
                    name=f"{self.plan.name} {role.name} rank {result.rank} (pid {result.pid})",
                    exit_code=result.returncode if result.returncode >= 0 else None,
                    signal=result.signal,
                    log_tail=_tail(self._log(result.rank if role.distributed or role.sharded else 0, role)),
                ))
        return tuple(ends)

    # -- act -----------------------------------------------------------------------------
    async def start_attempt(self, run: Resource, plan: LaunchPlan) -> None:
        self.stop_all()
        self.plan = plan
        self.groups = {}
        write_json_atomic(Path(self.workdir.run_dir(*self.key) / "spec.json"), plan.spec)
        self.tail = MetricsTail(Path(plan.checkpoint_uri) / "metrics.jsonl") if plan.checkpoint_uri else None
        if self.tail is not None:
            self.tail.poll(time.time())  # what earlier attempts wrote: their kept steps count
        if self.state.run_started is None:
            self.state.run_started = time.time()
        self._start_role(plan.roles[0])

    async def start_role(self, run: Resource, plan: LaunchPlan, role: str) -> None:
        self.plan = plan
        self._start_role(next(r for r in plan.roles if r.name == role))

    def _start_role(self, role: Role) -> None:
        specs = self._process_specs(role)
        spares = self._take_spares(specs) if self.plan is not None and role is self.plan.roles[0] else []
        group = ProcessGroup(specs)
        group.start(spares)
        self.groups[role.name] = group
        self.state.pids = group.pids
        self.started_at = time.time()
        self.exit_seen = False
        self._timeline("started", role=role.name, pids=group.pids, warm=bool(spares))

    # -- warm spares ---------------------------------------------------------------------
    def _take_spares(self, specs: list[ProcessSpec]) -> list[Spare | None]:
        """The spares, when every rank has one that fits; else none (they are discarded)."""
        spares, self.spares = self.spares, []
        if not spares:
            return []
        why = None if len(spares) == len(specs) else f"{len(spares)} spares for {len(specs)} processes"
        for spare, spec in zip(spares, specs, strict=False):
            why = why or spare.usable_for(spec.argv, spec.env)
        if why is not None:
            if not all(spare.quiet for spare in spares):
                self.ui.info(f"{self.label}: starting the attempt cold: {why}")
            for spare in spares:
                spare.discard()
            return []
        return list(spares)

    def _prestart_spares(self) -> None:
        """Once the first role's attempt has trained a step, start its ranks' spares for the next attempt."""
        if self.spares or self.plan is None or self.trainer_command is not None or not warm.enabled():
            return
        first = self.plan.roles[0].name
        group = self.groups.get(first)
        if group is None or len(self.groups) != 1 or self.tail is None:
            return
        if self.tail.last_advance is None or self.tail.last_advance < self.started_at:
            return  # not before this attempt's own imports are done: they are on the critical path
        if not all(warm.is_trainer_argv(spec.argv, self.python) for spec in group.specs):
            return
        folder = self.workdir.run_dir(*self.key) / "logs"
        self.spares = [Spare.start(self.python, spec.argv[3], spec.env, folder, spec.rank, warm.spec_path_of(spec.argv))
                       for spec in group.specs]
        self._timeline("sparesStarted", pids=[sp.pid for sp in self.spares])

    def discard_spares(self) -> None:
        for spare in self.spares:
            spare.discard()
        self.spares = []

    def _timeline(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "attempt": self.plan.attempt if self.plan else None,
                  "event": event, **fields}
        folder = self.workdir.run_dir(*self.key) / "logs"
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "timeline.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    async def ensure_attempt(self, run: Resource, action: EnsureAttempt) -> None:
        return None  # processes are started whole or not at all

    async def stop_attempt(self, run: Resource, action: StopAttempt) -> None:
        self.stop_all(kill=action.hang)

    def stop_all(self, kill: bool = False) -> None:
        for group in self.groups.values():
            group.kill() if kill else group.stop()
        self.groups = {}
        self.state.pids = []

    def close(self) -> None:
        """The run is over here (finished, failed or interrupted): its processes and spares go."""
        self.stop_all()
        self.discard_spares()

    async def write_status(self, run: Resource, old: RunStatus, new: RunStatus, step: Step) -> bool:
        changed = status_patch(self.state.status, new) is not None
        self.state.status = new
        if changed:
            self.workdir.save_state(self.state)
        return True

    async def emit_event(self, run: Resource, event: Event) -> None:
        """Restarts and the end of a run are the runner's own lines; the rest is printed here."""
        if self.on_event is not None:
            self.on_event(event)
        elif event.reason == "LossSpike":
            self.ui.warn(f"{self.label}: {event.message}")

    # -- processes -----------------------------------------------------------------------
    def _process_specs(self, role: Role) -> list[ProcessSpec]:
        assert self.plan is not None
        launch = self.plan
        base_env = {**os.environ, **launch.env, "PYTHONUNBUFFERED": "1"}
        port, metrics_port = free_ports(2)  # distinct: the rendezvous store and the metrics server
        if launch.metrics_port:
            base_env["CRUCIBLE_METRICS_PORT"] = str(metrics_port)
        base_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, role.world_size))))
        specs = []
        for index in range(role.world_size):
            argv = list(role.command_for(index))
            if self.trainer_command is not None and argv[1:3] == ["-m", "crucible.trainer"]:
                argv = [*self.trainer_command, *argv[3:]]
            env = dict(base_env)
            if role.distributed or role.world_size == 1:
                env.update(torchrun_env(index, role.world_size, port))
            specs.append(ProcessSpec(argv, env, self._log(index, role), index))
        return specs


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])
