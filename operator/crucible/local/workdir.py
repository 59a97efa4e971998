"""The work directory of embedded runs: one folder per run, its state, its logs.

Layout (the same ``<root>/<namespace>/<kind-lower>/<name>`` prefix the operator uses on
shared storage, with the work directory as the storage root)::

    <workdir>/
      .lock                                  held by the `crucible run` that owns the directory
      pipeline.json                          which resources the last `crucible run` loaded, in order
      <namespace>/<kind-lower>/<name>/
        state.json                           status (RunStatus wire form) + what the runner needs to resume
        spec.json                            the spec the trainer read in the latest attempt
        logs/attempt-<A>.log                 stdout+stderr of rank 0 (other ranks: attempt-<A>.rank-<R>.log)
        output/                              the artefact; output/_SUCCESS is written last by the stage
        checkpoints/                         training stages: step-NNNNNNNNN/ and metrics.jsonl

``state.json`` is written atomically (write to a temporary file, rename), so a SIGKILL of
``crucible run`` never leaves a torn state behind.

Crucible deletes only what it created and can prove it created: every folder it makes for a
run (the run folder, and an explicit ``output.uri`` it filled) gets an ownership marker
(:data:`OWNER_FILE`, naming the run) when it is created, and :func:`remove_owned` refuses a
folder without that run's marker. A folder that already held someone's files is never
claimed, so never deleted; run folders never leave the work directory (:meth:`WorkDir.run_dir`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.api.common import RunStatus

STATE_FILE = "state.json"
SPEC_FILE = "spec.json"
PIPELINE_FILE = "pipeline.json"
LOCK_FILE = ".lock"
SUCCESS_FILE = "_SUCCESS"
METRICS_FILE = "metrics.jsonl"
OWNER_FILE = ".crucible-owner"
"""Written by Crucible into every folder it creates for a run: ``{"run": "ns/Kind/name", "createdAt"}``."""
RUN_LAYOUT = frozenset({STATE_FILE, SPEC_FILE, "logs", "output", "checkpoints", OWNER_FILE})
"""What a run folder holds; one with nothing else predates the marker and is adopted."""


class NotOwnedError(RuntimeError):
    """A folder Crucible would write to or delete holds files it cannot prove it created."""


def owner_id(namespace: str, kind: str, name: str) -> str:
    return f"{namespace}/{kind}/{name}"


def marker_owner(path: Path) -> str | None:
    """The run named by ``path``'s ownership marker, None when there is none (or it is unreadable)."""
    try:
        data = json.loads((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    run = data.get("run") if isinstance(data, dict) else None
    return run if isinstance(run, str) else None


def claim(path: Path, owner: str, field: str = "") -> None:
    """Make ``path`` a folder owned by ``owner``: create it (or take an empty one) and write the marker.

    A folder that is already ``owner``'s is left as it is; one holding other files, or another
    run's marker, raises :class:`NotOwnedError` — Crucible never writes into (and so never
    later deletes) a folder of someone else's.
    """
    holder = marker_owner(path) if path.is_dir() else None
    if holder == owner:
        return
    where = f"{field}: " if field else ""
    if holder is not None:
        raise NotOwnedError(f"{where}{path} belongs to {holder} (its {OWNER_FILE} says so); give this run "
                            "its own folder")
    if path.exists() and not path.is_dir():
        raise NotOwnedError(f"{where}{path} is a file, not a folder; point it at a new folder")
    if path.is_dir() and any(path.iterdir()):
        raise NotOwnedError(f"{where}{path} already holds files Crucible did not write (no {OWNER_FILE} marker); "
                            "point it at a new or empty folder, or move those files away")
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / OWNER_FILE, {"run": owner, "createdAt": now_rfc3339()})


def remove_owned(path: Path, owner: str) -> bool:
    """Delete ``path`` only when its marker names ``owner``; True when it was deleted.

    A missing folder is fine (False); one without the marker raises :class:`NotOwnedError`.
    """
    if not path.exists():
        return False
    if marker_owner(path) != owner:
        raise NotOwnedError(f"{path} was not created by {owner} (no matching {OWNER_FILE}); Crucible does not "
                            "delete it. Delete it yourself if it should go")
    shutil.rmtree(path)
    return True


def is_inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
    except ValueError:
        return False
    return True


def now_rfc3339(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON by rename, readable by the owner only (specs and states are nobody else's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass
class RunState:
    """What ``state.json`` holds: the run's status plus the runner's own bookkeeping."""

    kind: str
    name: str
    namespace: str
    status: RunStatus = field(default_factory=RunStatus)
    fingerprint: str | None = None
    """sha256 of the resolved spec and the receipts of its inputs; a change means rerun from scratch."""
    training_fingerprint: str | None = None
    """The same without the training length; unchanged means the checkpoints are still a valid start."""
    pids: list[int] = field(default_factory=list)
    run_started: float | None = None
    """Unix time of the first attempt (CRUCIBLE_RUN_STARTED)."""
    source_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "namespace": self.namespace,
            "fingerprint": self.fingerprint,
            "trainingFingerprint": self.training_fingerprint,
            "pids": self.pids,
            "runStarted": self.run_started,
            "sourceFile": self.source_file,
            "status": self.status.model_dump(mode="json", by_alias=True, exclude_none=True),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(
            kind=data["kind"],
            name=data["name"],
            namespace=data.get("namespace") or "default",
            status=RunStatus.model_validate(data.get("status") or {}),
            fingerprint=data.get("fingerprint"),
            training_fingerprint=data.get("trainingFingerprint"),
            pids=list(data.get("pids") or []),
            run_started=data.get("runStarted"),
            source_file=data.get("sourceFile"),
        )


class WorkDir:
    """Paths and state of every run under one work directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.unreadable: list[tuple[Path, str]] = []
        """State files :meth:`all_states` or :meth:`load_state` could not read, with why."""

    @property
    def storage_root(self) -> str:
        return str(self.root)

    def run_dir(self, namespace: str, kind: str, name: str) -> Path:
        path = self.root / namespace / kind.lower() / name
        if any(part in ("", ".", "..") or "/" in part for part in (namespace, kind, name)) or not is_inside(path, self.root):
            raise NotOwnedError(f"run folder {path} would lie outside the work directory {self.root}; "
                                "metadata.namespace and metadata.name must be DNS labels")
        return path

    def claim_run_dir(self, namespace: str, kind: str, name: str) -> Path:
        """The run folder, created with its ownership marker (an old one holding only Crucible's layout is adopted)."""
        path = self.run_dir(namespace, kind, name)
        owner = owner_id(namespace, kind, name)
        if path.is_dir() and marker_owner(path) is None and {p.name for p in path.iterdir()} <= RUN_LAYOUT:
            write_json_atomic(path / OWNER_FILE, {"run": owner, "createdAt": now_rfc3339(), "adopted": True})
        claim(path, owner, "run folder")
        return path

    def forget(self, namespace: str, kind: str, name: str) -> bool:
        """Delete the run folder (state, logs, output, checkpoints) — only if this run's marker is in it."""
        return remove_owned(self.run_dir(namespace, kind, name), owner_id(namespace, kind, name))

    def state_path(self, namespace: str, kind: str, name: str) -> Path:
        return self.run_dir(namespace, kind, name) / STATE_FILE

    def log_path(self, namespace: str, kind: str, name: str, attempt: int, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank-{rank}"
        return self.run_dir(namespace, kind, name) / "logs" / f"attempt-{attempt}{suffix}.log"

    def load_state(self, namespace: str, kind: str, name: str) -> RunState | None:
        """The run's state; None when there is none. A torn or foreign ``state.json`` is set aside
        (renamed ``state.json.unreadable``) with a warning: the truth is in the checkpoints and the
        output's ``_SUCCESS``, which the run resumes from or checks again, so nothing is lost."""
        path = self.state_path(namespace, kind, name)
        try:
            return RunState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = path.with_name(f"{STATE_FILE}.unreadable")
            os.replace(path, aside)
            reason = _why(exc)
            self.unreadable.append((path, reason))
            print(f"warning: {path}: unreadable run state ({reason}); kept as {aside.name}. The run continues from "
                  "its checkpoints and output", file=sys.stderr)
            return None

    def save_state(self, state: RunState) -> None:
        if not (self.run_dir(state.namespace, state.kind, state.name) / OWNER_FILE).exists():
            self.claim_run_dir(state.namespace, state.kind, state.name)
        write_json_atomic(self.state_path(state.namespace, state.kind, state.name), state.to_json())

    def all_states(self) -> list[RunState]:
        """Every run recorded here, in the order of the last ``crucible run`` (then by path)."""
        found: dict[tuple[str, str, str], RunState] = {}
        if not self.root.is_dir():
            return []
        self.unreadable = []
        for path in sorted(self.root.glob(f"*/*/*/{STATE_FILE}")):
            try:
                state = RunState.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
                self.unreadable.append((path, _why(exc)))
                continue
            found[(state.namespace, state.kind, state.name)] = state
        order = self.pipeline_order()
        ranked = {key: i for i, key in enumerate(order)}
        return sorted(found.values(), key=lambda s: (ranked.get((s.namespace, s.kind, s.name), len(ranked)),
                                                     s.namespace, s.kind, s.name))

    def pipeline_order(self) -> list[tuple[str, str, str]]:
        try:
            data = json.loads((self.root / PIPELINE_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [(r["namespace"], r["kind"], r["name"]) for r in data.get("runs", [])]

    def save_pipeline(self, runs: list[tuple[str, str, str]], sources: list[str]) -> None:
        write_json_atomic(
            self.root / PIPELINE_FILE,
            {
                "sources": sources,
                "runs": [{"namespace": ns, "kind": k, "name": n} for ns, k, n in runs],
                "updatedAt": now_rfc3339(),
            },
        )

    def find(self, name: str) -> list[RunState]:
        """Runs matching ``name``, ``kind/name`` or ``namespace/kind/name`` (kind case-insensitive)."""
        parts = name.split("/")
        if len(parts) > 3 or not all(parts):
            return []
        out = []
        for state in self.all_states():
            key = (state.namespace, state.kind.lower(), state.name)[-len(parts):]
            wanted = tuple(p.lower() if i == len(parts) - 2 else p for i, p in enumerate(parts))
            if key == wanted:
                out.append(state)
        return out

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for one ``crucible run``; a second one gets a clear error."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                raise WorkDirBusyError(
                    f"{self.root} is in use by crucible run (pid {holder}); wait for it to finish, "
                    "stop it with Ctrl-C, or pass a different --workdir"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)


def _why(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not complete JSON: {exc.msg} at line {exc.lineno}"
    return f"{type(exc).__name__}: {exc}"


class WorkDirBusyError(RuntimeError):
    """Another ``crucible run`` holds the work directory."""
