"""Start and watch the local processes of one attempt, torchrun-style.

A role with a world of N processes gets N children with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT — what torchrun would set
on one node. Each child runs in its own session (so the terminal's Ctrl-C reaches only the
runner, which then stops the children in order) and is tied to the runner's life by
``PR_SET_PDEATHSIG``: a SIGKILLed ``crucible run`` never leaves trainers behind.

The runner polls :meth:`ProcessGroup.codes` each tick and hands them to the core's reconcile
step; when one process of a world fails, the step's StopAttempt stops the others at once (they
would otherwise block in a collective until a timeout), as torchrun does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crucible.local.warm import Spare

TERMINATE_GRACE_SECONDS = 10.0

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held bound at once while chosen, so the kernel cannot hand
    the same one out twice (two ``free_port()`` calls in a row may return the same port, and a
    trainer's rendezvous store and its metrics server then collide: "Address already in use")."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ProcessSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    log: Path
    rank: int


@dataclass
class ProcessResult:
    rank: int
    pid: int
    returncode: int | None
    """Exit status; negative: killed by that signal (as subprocess reports it)."""
    stopped_by_us: bool = False
    """We stopped it because another process of the world failed, a hang, or Ctrl-C."""

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


def torchrun_env(rank: int, world_size: int, master_port: int) -> dict[str, str]:
    """What torchrun sets for one process of a single-node world."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
    }


@dataclass
class ProcessGroup:
    """The running children of one role of one attempt."""

    specs: list[ProcessSpec]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopped: set[int] = field(default_factory=set)

    def start(self, spares: Sequence[Spare | None] = ()) -> None:
        """Start every process; ``spares[i]`` (a warm spare that fits spec i) becomes process i instead."""
        for i, spec in enumerate(self.specs):
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            spare = spares[i] if i < len(spares) else None
            with open(spec.log, "ab") as log:
                warm = f" (warm spare, pid {spare.pid})" if spare is not None else ""
                log.write(f"--- crucible: started {' '.join(spec.argv)} (rank {spec.rank}) at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}{warm}\n".encode())
                log.flush()
                if spare is not None:
                    self.procs.append(spare.release(spec.argv, spec.env, spec.log))
                    continue
                proc = subprocess.Popen(
                    list(spec.argv),
                    env=dict(spec.env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self._stopped.add(proc.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    def stop(self, grace: float = TERMINATE_GRACE_SECONDS) -> None:
        """SIGTERM every live child (and its own children), SIGKILL what is left after ``grace``."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def results(self) -> list[ProcessResult]:
        return [
            ProcessResult(spec.rank, proc.pid, proc.poll(), proc.pid in self._stopped)
            for spec, proc in zip(self.specs, self.procs, strict=True)
        ]

    def codes(self) -> list[int | None]:
        """Each child's exit status (None: running); never blocks."""
        return [p.poll() for p in self.procs]

    def kill(self) -> None:
        """SIGKILL at once (a hung world does not answer SIGTERM in time)."""
        self.signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
