"""``crucible logs NAME``: the log of an embedded run (``-f`` follows it)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from crucible.local.cli_common import add_workdir_argument, find_workdir
from crucible.local.cli_status import runner_active
from crucible.local.workdir import WorkDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="run name, or kind/name when two kinds share it")
    add_workdir_argument(parser)
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the run ends")
    parser.add_argument("--attempt", type=int, default=None, help="attempt number (default: the latest)")
    parser.add_argument("--rank", type=int, default=0, help="process rank of a multi-process run (default 0)")
    parser.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")


def _log_files(run_dir: Path) -> list[Path]:
    def attempt_of(p: Path) -> int:
        try:
            return int(p.name.split(".")[0].removeprefix("attempt-"))
        except ValueError:
            return -1

    return sorted((run_dir / "logs").glob("attempt-*.log"), key=lambda p: (attempt_of(p), p.name))


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `crucible logs NAME | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 0


def _run(args: argparse.Namespace) -> int:
    root = find_workdir(args.workdir)
    if root is None:
        return 1
    workdir = WorkDir(root)
    matches = workdir.find(args.name)
    if not matches:
        known = ", ".join(f"{s.kind.lower()}/{s.name}" for s in workdir.all_states()) or "none yet"
        print(f"no run named {args.name!r} in {root} (runs: {known})", file=sys.stderr)
        return 1
    if len(matches) > 1:
        print(f"{args.name!r} is ambiguous: " + ", ".join(f"{s.kind.lower()}/{s.name}" for s in matches)
              + "; write kind/name", file=sys.stderr)
        return 1
    state = matches[0]
    attempt = state.status.attempt if args.attempt is None else args.attempt
    path = workdir.log_path(state.namespace, state.kind, state.name, attempt, args.rank)
    if not path.exists() and args.attempt is None:
        files = [p for p in _log_files(workdir.run_dir(state.namespace, state.kind, state.name))
                 if ".rank-" not in p.name]
        path = files[-1] if files else path
    if not path.exists():
        print(f"{state.kind}/{state.name} has no log for attempt {attempt} rank {args.rank} yet ({path})", file=sys.stderr)
        return 1
    follow_attempts = args.follow and args.attempt is None
    while True:
        with open(path, errors="replace") as fh:
            lines = fh.readlines()
            start = max(0, len(lines) - args.tail) if args.tail is not None else 0
            sys.stdout.writelines(lines[start:])
            sys.stdout.flush()
            if not args.follow:
                return 0
            nxt = _follow(fh, workdir, state.namespace, state.kind, state.name, path, args.rank, follow_attempts)
        if nxt is None:
            return 0
        print(f"--- crucible logs: attempt changed, now following {nxt}", flush=True)
        path, args.tail = nxt, None


def _follow(fh, workdir: WorkDir, namespace: str, kind: str, name: str, path: Path, rank: int,
            follow_attempts: bool) -> Path | None:
    """Print new lines until the runner is gone (None) or a newer attempt's log appears (its path)."""
    idle = 0.0
    try:
        while True:
            line = fh.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
                idle = 0.0
                continue
            time.sleep(0.5)
            idle += 0.5
            if follow_attempts and idle >= 1.0:
                current = workdir.load_state(namespace, kind, name)
                if current is not None:
                    newer = workdir.log_path(namespace, kind, name, current.status.attempt, rank)
                    if newer != path and newer.exists():
                        return newer
            if idle >= 2.0 and not runner_active(workdir.root):
                return None
    except KeyboardInterrupt:
        return None
