"""What the terminal shows while ``crucible run`` works: one progress line per run, then a summary.

On a terminal, rich draws live progress bars; anywhere else (CI logs, pipes, tests) the same
events come out as plain timestamped lines, a progress line at most every ``PLAIN_EVERY``
seconds per run.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

PLAIN_EVERY = 15.0


class Ui(Protocol):
    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, key: str, label: str, total: int | None) -> None: ...
    def update(self, key: str, completed: int | None, total: int | None, detail: str) -> None: ...
    def finish(self, key: str, ok: bool, detail: str) -> None: ...
    def close(self) -> None: ...


class PlainUi:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self._last: dict[str, float] = {}
        self._labels: dict[str, str] = {}
        self._first: dict[str, tuple[float, int]] = {}  # when a run first reported progress, and how much

    def _print(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def info(self, message: str) -> None:
        self._print(message)

    def warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    def start(self, key: str, label: str, total: int | None) -> None:
        self._labels[key] = label
        self._first.pop(key, None)  # a restarted attempt measures its own rate
        self._last[key] = time.monotonic()
        self._print(f"{label}: started")

    def update(self, key: str, completed: int | None, total: int | None, detail: str) -> None:
        now = time.monotonic()
        if completed is not None and key not in self._first:
            self._first[key] = (now, completed)
        if now - self._last.get(key, 0.0) < PLAIN_EVERY:
            return
        self._last[key] = now
        self._print(f"{self._labels.get(key, key)}: {self._position(key, completed, total, now)}{detail}")

    def _position(self, key: str, completed: int | None, total: int | None, now: float) -> str:
        """``30%, eta 3m10s · `` from the run's own rate since its first progress report (the detail
        that follows has the step itself)."""
        if completed is None or not total:
            return ""
        out = f"{100 * completed / total:.0f}%"
        since, start = self._first.get(key, (now, completed))
        if completed > start and now > since:
            left = (total - completed) * (now - since) / (completed - start)
            out += f", eta {_clock(left)}"
        return out + " · "

    def finish(self, key: str, ok: bool, detail: str) -> None:
        self._print(f"{self._labels.get(key, key)}: {'done' if ok else 'FAILED'} {detail}")

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    whole = max(0, round(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


class RichUi:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("[bold]{task.fields[label]:<28}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),  # from the stage's own step rate: how long this stage has left
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self._tasks: dict[str, Any] = {}

    def info(self, message: str) -> None:
        self.progress.console.print(message)

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {message}")

    def start(self, key: str, label: str, total: int | None) -> None:
        if key in self._tasks:
            self.progress.reset(self._tasks[key], total=total, label=label, detail="")
            return
        self._tasks[key] = self.progress.add_task(label, total=total, label=label, detail="")

    def update(self, key: str, completed: int | None, total: int | None, detail: str) -> None:
        task = self._tasks.get(key)
        if task is None:
            return
        kwargs: dict[str, Any] = {"detail": detail}
        if total:
            kwargs["total"] = total
        if completed is not None:
            kwargs["completed"] = completed
        self.progress.update(task, **kwargs)

    def finish(self, key: str, ok: bool, detail: str) -> None:
        task = self._tasks.get(key)
        if task is None:
            return
        t = self.progress.tasks[task]
        total = t.total or 1
        self.progress.update(
            task,
            total=total,
            completed=total if ok else t.completed,
            detail=("[green]" if ok else "[red]FAILED ") + detail.replace("[", r"\["),
        )
        self.progress.stop_task(task)

    def close(self) -> None:
        self.progress.stop()


def make_ui(plain: bool | None = None) -> Ui:
    if plain is None:
        plain = not sys.stdout.isatty()
    if not plain:
        try:
            return RichUi()
        except ImportError:
            pass
    return PlainUi()
