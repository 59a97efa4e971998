"""``crucible run PATH...``: run resources on this machine, no cluster (embedded mode)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from crucible.local.cli_common import DEFAULT_PARENT, add_workdir_argument

if TYPE_CHECKING:
    from crucible.local.warm import Spare

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders of resources (searched recursively)")
    add_workdir_argument(parser, for_run=True)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this run (name or kind/name) and what it needs; repeatable")
    parser.add_argument("--fresh", action="store_true",
                        help="forget earlier state, outputs and checkpoints of the selected runs and start over")
    parser.add_argument("--allow-prepare", action="store_true",
                        help="run the resources' crucible.dev/prepare commands without asking (read them first: "
                             "they run on this machine); without it crucible run asks on a terminal, else refuses")
    parser.add_argument("--plain", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("--no-report", action="store_true", help="do not write report.md / report.html at the end")
    parser.epilog = (
        "Environment: CRUCIBLE_BASE_MODEL=DIR (a local Hugging Face model folder) makes every PretrainRun "
        "continue from that model and every DataPipeline tokenize with its tokenizer, instead of training "
        "both from scratch."
    )


def default_workdir(paths: list[str]) -> Path:
    first = Path(paths[0])
    stem = (first.stem if first.is_file() else first.absolute().name) or "run"
    return DEFAULT_PARENT / stem


def base_model_from_env() -> str | None:
    value = os.environ.get("CRUCIBLE_BASE_MODEL", "").strip()
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"CRUCIBLE_BASE_MODEL={value}: {path}/config.json not found; point it at a local Hugging Face "
            "model folder (config.json, model.safetensors, tokenizer files), or unset it to train from scratch"
        )
    return str(path)


def ask_on_terminal(what: str) -> bool:
    """Show a prepare command and ask before running it; False (refuse) when nobody is at a terminal."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    print(f"{what}.\nThis runs on your machine. Run it? [y/N] ", end="", flush=True)
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def run(args: argparse.Namespace) -> int:
    from crucible.local import warm

    # the first training run's interpreter imports torch and its stage beside the work below
    spare = warm.first_attempt_spare(args.paths)
    try:
        return _run(args, spare)
    finally:
        if spare is not None:
            spare.discard()  # none took it (a released spare is the attempt's process: left alone)


def _run(args: argparse.Namespace, spare: Spare | None) -> int:
    from crucible.local.dag import DagError
    from crucible.local.load import LoadError, load_resources
    from crucible.local.runner import Interrupted, Runner, RunnerError, RunnerOptions, sigint_stops
    from crucible.local.summary import print_summary
    from crucible.local.ui import make_ui
    from crucible.local.workdir import WorkDirBusyError

    workdir: Path = args.workdir or default_workdir(args.paths)
    try:
        loaded = load_resources(args.paths)
        base_model = base_model_from_env()
    except (LoadError, DagError, ValueError) as exc:
        print(f"crucible run: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ui = make_ui(plain=True if args.plain else None)
    options = RunnerOptions(workdir=workdir, only=args.only, fresh=args.fresh, base_model=base_model,
                            allow_prepare=args.allow_prepare, confirm_prepare=ask_on_terminal, first_spare=spare)
    runner = Runner(options, ui)
    ui.info(f"crucible run: {len(loaded)} resource(s) from {', '.join(args.paths)}; work directory {workdir}")
    if base_model:
        ui.info(f"CRUCIBLE_BASE_MODEL: PretrainRuns continue from {base_model} (DataPipelines use its tokenizer)")
    started = time.monotonic()
    code = 0
    outcomes = []
    try:
        with sigint_stops(runner, ui):
            outcomes = runner.run(loaded)
    except (DagError, RunnerError) as exc:
        ui.close()
        print(f"crucible run: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WorkDirBusyError as exc:
        ui.close()
        print(f"crucible run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (Interrupted, KeyboardInterrupt):
        ui.close()
        print(f"\nstopped. Run the same command again to resume; `crucible status -w {workdir}` shows where each run is.")
        return EXIT_INTERRUPTED
    wall = time.monotonic() - started
    if not args.no_report:
        try:
            from crucible.local.report import print_checks, write_report

            ui.info("writing the report (held-out perplexity of every model, answers side by side)...")
            paths = write_report(workdir)
            print_checks(workdir)
            print(f"report: {paths['markdown']}  {paths['html']}")
        except Exception as exc:  # the report must never hide the runs' own outcome
            print(f"warning: could not write the report: {type(exc).__name__}: {exc}", file=sys.stderr)
    ui.close()
    print_summary(outcomes, wall, workdir)
    if any(o.phase != "Succeeded" for o in outcomes):
        code = EXIT_FAILED
    return code
