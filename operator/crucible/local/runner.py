"""The embedded backend: run a DAG of resources as local processes with the operator's own core.

Per run, in DAG order, the runner polls the run with the operator's own pass,
:func:`crucible.core.reconcile.run_pass`, and a :class:`~crucible.local.backend.LocalBackend`
(processes instead of pods, ``state.json`` instead of the status subresource):

    state.json ──► observe (exit codes, metrics.jsonl) ──► reconcile (core) ──► start / stop processes
        ▲                                                                              │
        └──────────────────────────── write status ◄──────────────────────────────────┘

The core plans (command, env, spec), classifies failures, detects hangs, computes progress and
goodput, orders a DataPipeline's roles and decides restart (with backoff, from the latest
checkpoint — the trainer resumes by itself) or fail. What is the runner's own: the DAG over
``fromRun``, skipping finished runs, fingerprints, the progress bars and the summary.

Rerunning is safe and cheap: a run whose ``output/_SUCCESS`` exists and whose fingerprint
(the resolved spec + the receipts of its inputs + the content of its local input files) is
unchanged is skipped; a changed one starts over (its output and checkpoints are removed), and
so does everything downstream of it, because their inputs' receipts change. A run that was
stopped (Ctrl-C) or whose runner died (SIGKILL, power loss) resumes from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.api.common import Resource, RunStatus
from crucible.api.registry import kind_of
from crucible.core import decide as dc
from crucible.core import revisions as revs
from crucible.core.plan import LaunchPlan, PlanError, plan
from crucible.core.reconcile import Settings, run_pass
from crucible.core.transitions import Transition, next_status
from crucible.local.backend import LocalBackend
from crucible.local.dag import Dag, Key, build_dag
from crucible.local.load import LoadedResource
from crucible.local.metrics import latest_checkpoint, read_success
from crucible.local.ui import PlainUi, Ui
from crucible.local.warm import KIND_STAGES, Spare
from crucible.local.workdir import (
    SPEC_FILE,
    NotOwnedError,
    RunState,
    WorkDir,
    claim,
    is_inside,
    owner_id,
    remove_owned,
)
from crucible.trainer.config.common import FailurePolicy
from crucible.trainer.config.receipt import foreign_reason, spec_hash
from crucible.trainer.config.training import SHAPE_FIELDS, ModelConfig

PREPARE_ANNOTATION = "crucible.dev/prepare"
"""Embedded mode only: a command run (in the YAML file's folder, CRUCIBLE_WORKDIR set) before the
pipeline starts, to put local inputs in place. The operator ignores it. A YAML file someone hands
you must not run code on your machine by itself: the command runs only with ``--allow-prepare``
(:attr:`RunnerOptions.allow_prepare`) or when the user says yes to it (:attr:`RunnerOptions.confirm_prepare`)."""
BASE_MODEL_ENV = "CRUCIBLE_BASE_MODEL"
TRAINER_COMMAND_ENV = "CRUCIBLE_TRAINER_COMMAND"
"""Overrides ``<this python> -m crucible.trainer`` (e.g. a wrapper that enters a container)."""
LOG_TAIL_LINES = 20
OPERATIONAL_FIELDS = ("suspend", "failurePolicy", "metrics", "scheduling", "resources")
"""Spec fields that change how a run is operated, not what it produces: editing them never reruns it."""
TRAINING_LENGTH_FIELDS = ("maxSteps", "maxTokens", "evalEvery", "evalBatches")
_HASH_LIMIT = 64 * 1024 * 1024
_SHAPE_WIRE = frozenset(ModelConfig.model_fields[f].alias or f for f in SHAPE_FIELDS)


class RunnerError(RuntimeError):
    """A problem the user must fix before anything runs; the message says where and what to do."""


@dataclass
class RunOutcome:
    key: Key
    phase: str
    message: str = ""
    seconds: float = 0.0
    skipped: bool = False
    restarts: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    output_uri: str | None = None
    cpu_seconds: float = 0.0
    """CPU time (user + system) of the run's processes in this invocation, all attempts."""


@dataclass
class RunnerOptions:
    workdir: Path
    only: Sequence[str] = ()
    """Run only these (name or kind/name) and what they need."""
    fresh: bool = False
    """Forget the state, outputs and checkpoints of the selected runs first."""
    base_model: str | None = None
    """A local Hugging Face model every PretrainRun continues from (and every DataPipeline tokenizes with)."""
    trainer_command: Sequence[str] | None = None
    """Replaces ``python -m crucible.trainer`` in the planned argv (tests use a stand-in)."""
    run_prepare: bool = True
    allow_prepare: bool = False
    """Run ``crucible.dev/prepare`` commands without asking (``crucible run --allow-prepare``)."""
    confirm_prepare: Callable[[str], bool] | None = None
    """Asked with a description of each command when ``allow_prepare`` is off; None: refuse."""
    poll_seconds: float = 0.25
    first_spare: Spare | None = None
    """A warm spare ``crucible run`` started for the first attempt of the first training run
    (:func:`crucible.local.warm.first_attempt_spare`): the runner hands it to the first run of its
    stage and discards it when none uses it."""


class Interrupted(Exception):
    """Ctrl-C: the current attempt was stopped; its state says how to resume."""


class Runner:
    def __init__(self, options: RunnerOptions, ui: Ui | None = None) -> None:
        self.options = options
        self.ui: Ui = ui or PlainUi()
        self.workdir = WorkDir(options.workdir)
        self._stop = threading.Event()
        if options.trainer_command is None and os.environ.get(TRAINER_COMMAND_ENV):
            options.trainer_command = shlex.split(os.environ[TRAINER_COMMAND_ENV])

    # ------------------------------------------------------------------ entry
    def request_stop(self) -> None:
        self._stop.set()

    def run(self, loaded: list[LoadedResource]) -> list[RunOutcome]:
        try:
            return self._run(loaded)
        finally:
            self.discard_first_spare()

    def discard_first_spare(self) -> None:
        """The first attempt's spare, when no run took it (or the runner stopped before one did)."""
        spare, self.options.first_spare = self.options.first_spare, None
        if spare is not None:
            spare.discard()

    def _run(self, loaded: list[LoadedResource]) -> list[RunOutcome]:
        dag = build_dag(loaded)
        order = dag.order()
        selected = self._select(dag, order)
        with self.workdir.lock():
            self.workdir.save_pipeline(order, sorted({str(i.source) for i in loaded}))
            if self.options.fresh:
                for key in selected:
                    self._forget(key, self._explicit_output(dag.nodes[key]))
            if self.options.run_prepare:
                self._prepare([dag.nodes[k] for k in order if k in selected])
            outcomes: dict[Key, RunOutcome] = {}
            for key in order:
                if key not in selected:
                    continue
                outcomes[key] = self._run_one(dag, key, outcomes)
        return [outcomes[k] for k in order if k in outcomes]

    def _select(self, dag: Dag, order: list[Key]) -> set[Key]:
        if not self.options.only:
            return set(order)
        wanted: list[Key] = []
        for name in self.options.only:
            parts = name.split("/")
            hits = [
                k for k in order
                if (len(parts) == 1 and k[2] == parts[0])
                or (len(parts) == 2 and k[1].lower() == parts[0].lower() and k[2] == parts[1])
            ]
            if not hits:
                names = ", ".join(f"{k[1]}/{k[2]}" for k in order)
                raise RunnerError(f"--only {name}: no such run among the loaded resources ({names})")
            if len(hits) > 1:
                raise RunnerError(f"--only {name}: ambiguous; write kind/name ({', '.join(f'{k[1]}/{k[2]}' for k in hits)})")
            wanted += hits
        return dag.with_upstream(wanted)

    def _forget(self, key: Key, explicit_output: Path | None = None) -> None:
        """Delete the run's folder and an explicit output it created — nothing without its marker."""
        try:
            if explicit_output is not None:
                remove_owned(explicit_output, owner_id(*key))
            self.workdir.forget(*key)
        except NotOwnedError as exc:
            raise RunnerError(f"{key[1]} {key[2]}: {exc}") from exc

    def _explicit_output(self, item: LoadedResource) -> Path | None:
        """``spec.output.uri`` when it is a local folder outside the run folder (the user named it)."""
        uri = self._localize(item).spec.output.uri
        if not uri or "://" in uri:
            return None
        path = Path(uri)
        return None if is_inside(path, self.workdir.run_dir(*item.key)) else path

    def _remove_output(self, key: Key, output_dir: Path, explicit: bool) -> None:
        """Delete a run's output: its own folder's ``output/``, or an explicit one it created."""
        try:
            if explicit:
                remove_owned(output_dir, owner_id(*key))
            elif self.workdir.run_dir(*key).exists():
                self.workdir.claim_run_dir(*key)  # proves the run folder (and so output/) is ours
                shutil.rmtree(output_dir, ignore_errors=True)
        except NotOwnedError as exc:
            raise RunnerError(f"{key[1]} {key[2]}: {exc}") from exc

    # --------------------------------------------------------------- prepare
    def _prepare(self, items: list[LoadedResource]) -> None:
        done: set[tuple[str, str]] = set()
        for item in items:
            command = item.resource.metadata.annotations.get(PREPARE_ANNOTATION)
            if not command:
                continue
            folder = item.source.parent.absolute()
            if (command, str(folder)) in done:
                continue
            done.add((command, str(folder)))
            what = f"{item.where}: {item.resource.kind} {item.resource.name} asks to run `{command}` in {folder}"
            if not self.options.allow_prepare and not (self.options.confirm_prepare and self.options.confirm_prepare(what)):
                raise RunnerError(
                    f"{what} (metadata.annotations[{PREPARE_ANNOTATION}]). A YAML file does not run commands on "
                    "this machine by itself: read the command, then run again with --allow-prepare (or put the "
                    "inputs in place yourself and remove the annotation)"
                )
            argv = shlex.split(command)
            if argv and argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            self.ui.info(f"preparing inputs for {item.resource.kind} {item.resource.name}: {command}  (in {folder})")
            env = {**os.environ, "CRUCIBLE_WORKDIR": str(self.workdir.root)}
            try:
                proc = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, check=False)
            except OSError as exc:
                raise RunnerError(
                    f"{item.where}: metadata.annotations[{PREPARE_ANNOTATION}]: cannot run {command!r}: {exc}"
                ) from exc
            for line in proc.stdout.strip().splitlines()[-5:]:
                self.ui.info(f"  {line}")
            if proc.returncode != 0:
                raise RunnerError(
                    f"{item.where}: metadata.annotations[{PREPARE_ANNOTATION}]: {command!r} exited "
                    f"{proc.returncode}:\n{proc.stderr.strip()[-2000:]}"
                )

    # ---------------------------------------------------------------- one run
    def _run_one(self, dag: Dag, key: Key, done: Mapping[Key, RunOutcome]) -> RunOutcome:
        item = dag.nodes[key]
        namespace, kind, name = key
        label = f"{kind} {name}"
        resource = self._localize(item)
        run_dir = self.workdir.run_dir(*key)
        state = self.workdir.load_state(*key) or RunState(kind, name, namespace, source_file=str(item.source))
        state.source_file = str(item.source)
        policy: FailurePolicy = getattr(resource.spec, "failure_policy", None) or FailurePolicy()

        deps = self._dependencies(dag, key)
        waiting = dc.decide(dc.Situation(status=RunStatus(), now=time.time(), attempt_state="absent",
                                         policy=policy, dependencies=deps))
        if waiting.action in ("wait", "fail"):
            phase = "Failed" if waiting.action == "fail" else "Waiting"
            state.status = next_status(state.status, waiting, now=time.time())
            if waiting.action == "fail":
                state.status.phase = "Failed"
            self.workdir.save_state(state)
            self.ui.info(f"{label}: not run — {waiting.message}")
            return RunOutcome(key, phase, waiting.message)

        inputs = dict(waiting.inputs)
        try:
            probe = plan(resource, storage_root=self.workdir.storage_root, inputs=inputs)
        except PlanError as exc:
            raise RunnerError(f"{item.where}: {exc}") from exc
        self._check_local_inputs(item, resource, probe)
        # a FinetuneRun following its dataset reads its base model once, in revision 1: a new output of
        # model.fromRun is no new revision of it (follow: model is for that)
        ignored = ("model",) if revs.follows_dataset(resource) else ()
        fingerprint = self._fingerprint(probe, dag, key, ignored_inputs=ignored)
        training_fingerprint = self._fingerprint(probe, dag, key, training_only=True, ignored_inputs=ignored)
        output_dir = Path(probe.output_uri)
        explicit = self._explicit_output(item) is not None

        if revs.enabled(resource):  # new input makes the next revision, not a fresh start
            changed = state.fingerprint is not None and state.fingerprint != fingerprint
            go, why = revs.next_revision(resource, state.status, time.time(), changed)
            if go:
                self.ui.info(f"{label}: its inputs changed since revision {len(state.status.revisions)}; "
                             f"running revision {len(state.status.revisions) + 1}")
                state.status = revs.start(state.status)
                state.fingerprint = fingerprint
            elif why:
                self.workdir.save_state(state)
                self.ui.info(f"{label}: {why}")
                return RunOutcome(key, state.status.phase, why, skipped=True, restarts=state.status.restarts,
                                  results=dict(state.status.results), output_uri=state.status.output_uri)
            resource = revs.for_revision(resource, state.status, self.workdir.storage_root)
            try:
                probe = plan(resource, storage_root=self.workdir.storage_root, inputs=inputs)
            except PlanError as exc:
                raise RunnerError(f"{item.where}: {exc}") from exc
            output_dir = Path(probe.output_uri)

        if state.fingerprint is not None and state.fingerprint != fingerprint:
            self._check_inputs_intact(item, probe)  # a damaged input is no reason to delete anything
            had_work = (output_dir / "_SUCCESS").exists() or latest_checkpoint(run_dir / "checkpoints")
            if state.training_fingerprint == training_fingerprint and latest_checkpoint(run_dir / "checkpoints"):
                # Only the length of training (or its evaluation) changed: keep the checkpoints and
                # continue from the latest one, e.g. after raising training.maxSteps.
                self.ui.info(f"{label}: training length changed; continuing from its latest checkpoint")
                self._remove_output(key, output_dir, explicit)
                state.status = RunStatus(attempt=state.status.attempt + 1)
            else:
                if had_work:
                    self.ui.info(f"{label}: its spec or inputs changed since it last ran; starting it over")
                self._forget(key, output_dir if explicit else None)
                state = RunState(kind, name, namespace, source_file=str(item.source))
        state.fingerprint = fingerprint
        state.training_fingerprint = training_fingerprint
        if explicit:
            try:
                claim(output_dir, owner_id(*key), "spec.output.uri")
            except NotOwnedError as exc:
                raise RunnerError(f"{item.where}: {kind} {name}: {exc}") from exc

        success = read_success(output_dir)
        if success is not None:
            reason = foreign_reason(success, spec_hash(probe.spec, probe.stage), f"{kind}/{name}")
            if reason is not None:
                # The folder is this run's (checked above), the receipt in it is not this spec's.
                self.ui.info(f"{label}: {output_dir}/_SUCCESS is not this run's result ({reason}); running it again")
                self._remove_output(key, output_dir, explicit)
                if explicit:
                    claim(output_dir, owner_id(*key), "spec.output.uri")
                success = None
        if success is not None:
            if state.status.phase != "Succeeded":
                state.status = next_status(
                    state.status, dc.Decision(Transition.SUCCEED, message="output/_SUCCESS exists"),
                    now=time.time(), output_uri=probe.output_uri, results=success.get("results") or {},
                )
            self._record_revision(resource, state)
            self.workdir.save_state(state)
            self.ui.info(f"{label}: already succeeded (output/_SUCCESS exists), skipped")
            return RunOutcome(key, "Succeeded", "skipped: already succeeded", skipped=True,
                              restarts=state.status.restarts, results=dict(state.status.results),
                              output_uri=probe.output_uri)

        status = state.status
        if status.phase in ("Succeeded", "Failed"):
            # Its output is gone, or it failed last time and is asked to run again: a fresh
            # attempt that keeps the checkpoints (and so resumes from them).
            status = RunStatus(attempt=status.attempt + 1, revision=status.revision, revisions=status.revisions)
        state.status = status
        outcome = self._attempts(item, resource, state, policy, inputs, label)
        if outcome.phase == "Succeeded":
            self._record_revision(resource, state)
            self.workdir.save_state(state)
        return outcome

    def _record_revision(self, resource: Resource, state: RunState) -> None:
        """With spec.revisions: log the finished revision (with its receipt's hash) in status.revisions."""
        if not revs.enabled(resource) or not state.status.output_uri:
            return
        receipt = Path(state.status.output_uri) / "_SUCCESS"
        digest = hashlib.sha256(receipt.read_bytes()).hexdigest() if receipt.is_file() else None
        state.status = revs.record(resource, state.status, digest)

    def _attempts(
        self, item: LoadedResource, resource: Resource, state: RunState, policy: FailurePolicy,
        inputs: dict[str, str], label: str,
    ) -> RunOutcome:
        """Poll the run to its end: each tick is the core's pass with the local backend."""
        key = item.key
        started = time.monotonic()
        cpu_started = _children_cpu()
        ui_key = "/".join(key)
        total = _total_steps(resource)
        self.ui.start(ui_key, label, total)
        backend = LocalBackend(self.workdir, state, self.ui, label, self._dependencies_from_inputs(item, inputs),
                               trainer_command=list(self.options.trainer_command)
                               if self.options.trainer_command is not None else None)
        spare = self.options.first_spare
        if spare is not None and KIND_STAGES.get(resource.kind) == spare.stage:
            backend.spares, self.options.first_spare = [spare], None  # the first attempt may start warm
        settings = Settings(storage_root=self.workdir.storage_root, spec_path=str(self.workdir.run_dir(*key) / SPEC_FILE),
                            python=sys.executable)

        def outcome(phase: str, message: str) -> RunOutcome:
            return RunOutcome(key, phase, message, time.monotonic() - started, restarts=state.status.restarts,
                              cpu_seconds=_children_cpu() - cpu_started)

        try:
            while True:
                if self._stop.is_set():
                    backend.stop_all()
                    self._record_interrupt(state)
                    raise Interrupted()
                step = asyncio.run(run_pass(backend, resource, state.status, time.time(), settings=settings))
                t = step.decision.transition
                if t is Transition.SUCCEED:
                    seconds = time.monotonic() - started
                    self.ui.finish(ui_key, True, _done_detail(state.status, seconds))
                    result = outcome("Succeeded", "")
                    result.results = dict(state.status.results)
                    result.output_uri = state.status.output_uri
                    return result
                if t is Transition.FAIL:
                    self.ui.finish(ui_key, False, state.status.message or step.decision.reason)
                    if step.decision.message and "\n" in step.decision.message:
                        self.ui.info(step.decision.message)
                    return outcome("Failed", step.decision.message)
                if t is Transition.STAY_SUSPENDED:
                    self.ui.finish(ui_key, False, "suspended (spec.suspend is true)")
                    return outcome("Suspended", step.decision.message)
                if t is Transition.RESTART:
                    self.ui.warn(f"{label}: attempt {step.decision.attempt - 1} failed ({step.decision.reason}: "
                                 f"{step.decision.message}); restarting from the latest checkpoint "
                                 f"(restart {state.status.restarts} of {policy.max_restarts})")
                    continue
                if t is Transition.BACKOFF:
                    self.ui.update(ui_key, None, None, f"restart {state.status.restarts} in "
                                                       f"{step.decision.delay_seconds or 0:.0f}s")
                    self._stop.wait(timeout=max(0.0, step.requeue_after or 0.0))
                    continue
                self.ui.update(ui_key, state.status.progress.step, total, self._detail(backend, total))
                self._stop.wait(timeout=self.options.poll_seconds)  # Ctrl-C: handled at the top
        finally:
            backend.close()

    def _detail(self, backend: LocalBackend, total: int | None) -> str:
        p = backend.state.status.progress
        if p.step is not None:
            detail = f"step {p.step}" + (f"/{total}" if total else "")
            if p.loss is not None:
                detail += f"  loss {p.loss:.3f}"
            if p.tokens_per_second:
                detail += f"  {p.tokens_per_second:,.0f} tok/s"
        else:
            detail = _last_line(self.workdir.log_path(*backend.key, backend.state.status.attempt))
        if backend.plan is not None and len(backend.plan.roles) > 1 and backend.current_role:
            detail = f"[{backend.current_role}] {detail}"
        return detail

    def _record_interrupt(self, state: RunState) -> None:
        step = state.status.progress.step
        where = f" at step {step}" if step is not None else ""
        if state.status.phase in ("Pending", "Running"):
            state.status.phase = "Pending"
            state.status.attempt += 1
        state.status.message = f"stopped by Ctrl-C{where}; run crucible run again to resume from the latest checkpoint"
        state.pids = []
        self.workdir.save_state(state)

    def _dependencies(self, dag: Dag, key: Key) -> tuple[dc.Dependency, ...]:
        deps = []
        for path, target in sorted(dag.upstream.get(key, {}).items()):
            state = self.workdir.load_state(*target)
            output = None
            phase = None
            if state is not None:
                phase = state.status.phase
                output = state.status.output_uri
                if phase == "Succeeded" and (output is None or read_success(Path(output)) is None):
                    phase = "Pending"  # its output vanished: it must run again first
            deps.append(dc.Dependency(path, target[1], target[2], phase, output,
                                      state.status.message if state is not None else None))
        return tuple(deps)

    def _dependencies_from_inputs(self, item: LoadedResource, inputs: Mapping[str, str]) -> tuple[dc.Dependency, ...]:
        refs = item.resource.input_refs()
        return tuple(dc.Dependency(path, refs[path].kind, refs[path].name, "Succeeded", uri)
                     for path, uri in sorted(inputs.items()) if path in refs)

    def _localize(self, item: LoadedResource) -> Resource:
        """The resource with relative local URIs made absolute under the work directory (and the base-model override)."""
        resource = item.resource
        wire = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
        spec = wire["spec"]
        for _, parent, k in _uri_fields(spec):
            value = parent[k]
            if _is_relative_path(value):
                parent[k] = str(self.workdir.root / value)
        base = self.options.base_model
        target = kind_of(resource.kind).base_model_field
        if base and target:
            *head, last = target.split(".")
            parent = spec
            for part in head:
                parent = parent.setdefault(part, {})
            if not parent.get(last):
                parent[last] = {"uri": base}
                if target == "model.source":  # the base model brings its own shape: drop a fresh one's fields
                    for shape in _SHAPE_WIRE:
                        parent.pop(shape, None)
        wire.pop("status", None)
        return type(resource).model_validate(wire)

    def _check_local_inputs(self, item: LoadedResource, resource: Resource, launch: LaunchPlan) -> None:
        produced = {launch.output_uri, launch.checkpoint_uri}
        problems = []
        for path, parent, k in _uri_fields(launch.spec):
            value = parent[k]
            if value in produced or value in launch.inputs.values() or "://" in value:
                continue
            if path in ("output.uri", "checkpoint.uri"):
                continue
            if not (glob.glob(value) if glob.has_magic(value) else os.path.exists(value)):
                problems.append(
                    f"{item.where}: {resource.kind} {resource.name}: spec.{path}: {value} does not exist; "
                    "create it, or fix the path (relative paths are read from the work directory "
                    f"{self.workdir.root})"
                )
        for env_name in launch.secret_env:
            if env_name not in os.environ:
                problems.append(
                    f"{item.where}: {resource.kind} {resource.name}: spec.resources.secretEnv.{env_name}: embedded "
                    f"mode has no Secrets; set {env_name} in the environment you start crucible run from"
                )
        if problems:
            raise RunnerError("\n".join(problems))

    def _check_inputs_intact(self, item: LoadedResource, launch: LaunchPlan) -> None:
        """Refuse to start over when a local token-shard input is damaged (a shard gone or altered).

        Its ``index.json`` still lists the shard, so the input did not change, it broke: starting
        the run over would delete its checkpoints for nothing. The message says what to restore.
        """
        produced = {launch.output_uri, launch.checkpoint_uri}
        problems = []
        for path, parent, k in _uri_fields(launch.spec):
            value = parent[k]
            if value in produced or "://" in value or not os.path.isdir(value):
                continue
            for index in sorted(Path(value).rglob("index.json")):
                problems += [f"{item.where}: {item.resource.kind} {item.resource.name}: spec.{path}: {p}"
                             for p in _shard_damage(index)]
        if problems:
            raise RunnerError("\n".join(problems) + "\nthe input is damaged, not changed; restore it (e.g. run its "
                              "DataPipeline again) — nothing of this run was deleted")

    def _fingerprint(self, launch: LaunchPlan, dag: Dag, key: Key, training_only: bool = False,
                     ignored_inputs: Sequence[str] = ()) -> str:
        """sha256 of what decides a run's result: the spec (less operational fields), input receipts, local inputs.

        ``training_only`` leaves out how long training runs and how it is evaluated: when only
        those change, the checkpoints are still a valid start.
        """
        spec = {k: v for k, v in launch.spec.items() if k not in OPERATIONAL_FIELDS}
        checkpoint = {k: v for k, v in (spec.get("checkpoint") or {}).items() if k == "uri"}
        if checkpoint:
            spec["checkpoint"] = checkpoint
        if training_only:
            spec.pop("eval", None)
            spec["training"] = {k: v for k, v in (spec.get("training") or {}).items() if k not in TRAINING_LENGTH_FIELDS}
        h = hashlib.sha256()
        h.update(json.dumps(spec, sort_keys=True).encode())
        for path, target in sorted(dag.upstream.get(key, {}).items()):
            if path in ignored_inputs:
                continue
            state = self.workdir.load_state(*target)
            receipt = read_success(Path(state.status.output_uri)) if state and state.status.output_uri else None
            h.update(f"{path}={json.dumps(receipt, sort_keys=True)}".encode())
        produced = {launch.output_uri, launch.checkpoint_uri, *launch.inputs.values()}
        for path, parent, k in _uri_fields(launch.spec):
            value = parent[k]
            if value in produced or "://" in value:
                continue
            for file in _files_under(value):
                h.update(f"{path}:{file}:".encode())
                h.update(_file_digest(file))
        return h.hexdigest()


# ---------------------------------------------------------------------- helpers
def _uri_fields(node: Any, prefix: str = "") -> Iterator[tuple[str, dict[str, Any], str]]:
    """(dotted path, parent dict, key) of every string ``uri`` in a spec."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else k
            if k == "uri" and isinstance(v, str):
                yield path, node, k
            else:
                yield from _uri_fields(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _uri_fields(v, f"{prefix}[{i}]")


def _shard_damage(index_path: Path) -> list[str]:
    """What is wrong with the shards a token-split ``index.json`` lists (empty when intact)."""
    try:
        index = json.loads(index_path.read_text())
        entries = [(str(e["name"]), str(e["sha256"])) for e in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not a token split's index; the stage reports what it makes of it
    out = []
    for name, digest in entries:
        for suffix in (".bin", ".idx"):
            shard = index_path.parent / f"{name}{suffix}"
            if not shard.is_file():
                out.append(f"{shard} is missing (listed in {index_path})")
        shard = index_path.parent / f"{name}.bin"
        if (shard.is_file() and shard.stat().st_size <= _HASH_LIMIT
                and hashlib.sha256(shard.read_bytes()).hexdigest() != digest):
            out.append(f"{shard} differs from its sha256 in {index_path} (torn or altered)")
    return out


def _is_relative_path(value: str) -> bool:
    return "://" not in value and not os.path.isabs(value) and not value.startswith("~")


def _files_under(value: str) -> list[str]:
    matches = glob.glob(value) if glob.has_magic(value) else [value]
    out: list[str] = []
    for m in sorted(matches):
        if os.path.isdir(m):
            out += sorted(str(p) for p in Path(m).rglob("*") if p.is_file())
        elif os.path.isfile(m):
            out.append(m)
    return out


def _file_digest(path: str) -> bytes:
    st = os.stat(path)
    if st.st_size > _HASH_LIMIT:
        return f"{st.st_size}:{st.st_mtime_ns}".encode()
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).digest()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


def _last_line(path: Path) -> str:
    line = _tail(path, 1).strip()
    return (line[:77] + "...") if len(line) > 80 else line


def _total_steps(resource: Resource) -> int | None:
    training = getattr(resource.spec, "training", None)
    return getattr(training, "max_steps", None) if training is not None else None


def _done_detail(status: RunStatus, seconds: float) -> str:
    parts = [f"{seconds:.0f}s"]
    if status.restarts:
        parts.append(f"{status.restarts} restart(s)")
    if status.progress.loss is not None:
        parts.append(f"loss {status.progress.loss:.3f}")
    return ", ".join(parts)


@contextlib.contextmanager
def sigint_stops(runner: Runner, ui: Ui) -> Iterator[None]:
    """First Ctrl-C: stop the current attempt cleanly (SIGTERM, then SIGKILL after a grace period)."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if runner._stop.is_set():
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
            raise KeyboardInterrupt
        ui.warn("stopping (Ctrl-C again to abort at once); run the same command again to resume")
        runner.request_stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

