"""Shared bits of ``crucible run|status|logs``: finding the work directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from crucible.local.workdir import PIPELINE_FILE

DEFAULT_PARENT = Path(".crucible")


def add_workdir_argument(parser: argparse.ArgumentParser, *, for_run: bool = False) -> None:
    help_ = (
        "work directory: state, logs, outputs and checkpoints of every run (default: .crucible/<name of the "
        "first PATH>; relative input paths in the YAML are read from here)"
        if for_run
        else "work directory of the runs (default: $CRUCIBLE_WORKDIR, else the most recent under .crucible/)"
    )
    parser.add_argument("-w", "--workdir", type=Path, default=None, help=help_)


def find_workdir(arg: Path | None) -> Path | None:
    """The work directory ``crucible status|logs`` should read, or None (with a message printed)."""
    if arg is not None:
        if not (arg / PIPELINE_FILE).exists() and not arg.is_dir():
            print(f"{arg}: no such work directory; pass the --workdir that crucible run used", file=sys.stderr)
            return None
        return arg
    env = os.environ.get("CRUCIBLE_WORKDIR")
    if env:
        return Path(env)
    candidates = sorted(
        (p.parent for p in DEFAULT_PARENT.glob(f"*/{PIPELINE_FILE}")),
        key=lambda d: (d / PIPELINE_FILE).stat().st_mtime,
        reverse=True,
    )
    if not candidates:
        print(
            "no work directory found under .crucible/; pass --workdir DIR (the one crucible run used)",
            file=sys.stderr,
        )
        return None
    if len(candidates) > 1:
        others = ", ".join(str(c) for c in candidates[1:])
        print(f"(showing {candidates[0]}, the most recent; others: {others}; pick one with --workdir)", file=sys.stderr)
    return candidates[0]
