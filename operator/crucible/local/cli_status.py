"""``crucible status``: phase, step, loss and restarts of every embedded run."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
from pathlib import Path

from crucible.local.cli_common import add_workdir_argument, find_workdir
from crucible.local.summary import STATUS_HEADER, status_rows, table
from crucible.local.workdir import LOCK_FILE, WorkDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workdir_argument(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table (default) or json: the status of every run as the operator would write it")


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
    if args.output == "json":
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    if not states:
        print(f"no runs recorded in {root} yet")
        return 0
    active = runner_active(workdir.root)
    rows = status_rows(states)
    if not active:
        for row in rows:
            if row[2] in ("Running", "Restarting", "Pending"):
                row[7] = "stopped: no crucible run is active; run it again to resume"
    print(table(rows, STATUS_HEADER))
    print(f"\n{root}: crucible run {'is running' if active else 'is not running'}")
    return 0
