"""Hang watchdog: exit retriable when no training step completes within ``hangTimeout``.

A collective stuck on a dead peer, a wedged GPU or a storage mount that never answers all
look the same from inside: no step progress. The watchdog thread notices and ends the process
with exit 75 (``os._exit``, since a hung collective cannot be unwound), so the operator
restarts the job elsewhere instead of burning GPU-hours until a human looks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from crucible.trainer.config.common import EXIT_RETRIABLE


class Watchdog:
    def __init__(
        self,
        timeout_s: float,
        on_hang: Callable[[str], None] | None = None,
        poll_s: float | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s if poll_s is not None else min(max(timeout_s / 10, 0.05), 10.0)
        self.on_hang = on_hang or _exit_retriable
        self._last = time.monotonic()
        self._what = "startup"
        self._stop = threading.Event()
        self._paused = 0
        self._thread = threading.Thread(target=self._run, name="crucible-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self, what: str = "step") -> None:
        self._last = time.monotonic()
        self._what = what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self.on_hang(
                    f"no progress for {idle:.0f}s (hangTimeout {self.timeout_s:.0f}s) after {self._what}; "
                    "exiting as retriable so the job restarts from the last checkpoint"
                )
                return


def _exit_retriable(message: str) -> None:
    from crucible.trainer.faults import write_termination_message

    print(f"crucible.trainer: watchdog: {message}", file=sys.stderr, flush=True)
    write_termination_message(EXIT_RETRIABLE, f"hang watchdog: {message}")
    os._exit(EXIT_RETRIABLE)
