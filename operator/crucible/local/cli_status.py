"""``crucible status``: phase, step, loss and restarts of every embedded run."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from crucible.core.status import progress_from_sample
from crucible.local.cli_common import add_workdir_argument, find_workdir
from crucible.local.metrics import MetricsTail
from crucible.local.summary import STATUS_HEADER, status_rows, table
from crucible.local.workdir import LOCK_FILE, RunState, WorkDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workdir_argument(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table (default) or json: the status of every run as the operator would write it")


def refresh_progress(workdir: WorkDir, state: RunState) -> None:
    """Step and loss from the run's metrics.jsonl, which may be ahead of state.json (or its runner gone)."""
    path = workdir.run_dir(state.namespace, state.kind, state.name) / "checkpoints" / "metrics.jsonl"
    if not path.exists():
        return
    tail = MetricsTail(path, offset=max(0, path.stat().st_size - 65536))
    tail.poll(time.time())
    sample = tail.sample()
    if sample is not None:
        state.status.progress = progress_from_sample(sample, previous=state.status.progress,
                                                     total_steps=state.status.progress.total_steps, now=time.time())


def runner_active(root: Path) -> bool:
    """True while a ``crucible run`` holds the work directory."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `crucible status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 0


def _run(args: argparse.Namespace) -> int:
    root = find_workdir(args.workdir)
    if root is None:
        return 1
    workdir = WorkDir(root)
    states = workdir.all_states()
    for path, reason in workdir.unreadable:
        print(f"warning: {path}: unreadable run state ({reason}); `crucible run` sets it aside and continues "
              "the run from its checkpoints", file=sys.stderr)
    if args.output == "json":
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    if not states:
        if workdir.unreadable:
            print(f"no readable runs in {root}: {len(workdir.unreadable)} state file(s) could not be read (see above)")
            return 1
        print(f"no runs recorded in {root} yet")
        return 0
    active = runner_active(workdir.root)
    for state in states:
        if state.status.phase != "Succeeded":
            refresh_progress(workdir, state)
    rows = status_rows(states)
    if not active:
        for row in rows:
            if row[2] in ("Running", "Restarting", "Pending"):
                row[7] = "stopped: no crucible run is active; run it again to resume"
    print(table(rows, STATUS_HEADER))
    print(f"\n{root}: crucible run {'is running' if active else 'is not running'}")
    return 0
