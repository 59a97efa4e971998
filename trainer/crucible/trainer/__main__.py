"""``python -m crucible.trainer STAGE --spec FILE [stage options]``: what pods and the embedded runner start.

STAGE picks the stage module, imported lazily so ``quantize`` never pays for DeepSpeed and a
broken optional dependency of one stage does not take the others down. Each module exposes
``main(argv: list[str]) -> int`` and receives the arguments after STAGE unchanged. Exit codes
are the contract in :mod:`crucible.trainer.config.common` (0, 1, 2, 75).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
import time
from typing import NoReturn

import crucible.trainer
from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_BAD_INPUT

STAGES: dict[str, str] = {
    "data": "crucible.trainer.data.pipeline",
    "pretrain": "crucible.trainer.pretrain",
    "finetune": "crucible.trainer.finetune",
    "preference": "crucible.trainer.preference",
    "quantize": "crucible.trainer.quantize",
}

USAGE = (
    "usage: python -m crucible.trainer STAGE --spec FILE [options]\n"
    f"  STAGE: one of {', '.join(STAGES)}\n"
    "  FILE: the resource spec as JSON, with every fromRun resolved to a uri"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    stage, rest = argv[0], argv[1:]
    module_name = STAGES.get(stage)
    if module_name is None:
        print(f"crucible.trainer: unknown stage {stage!r}\n{USAGE}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(
                f"crucible.trainer: stage {stage!r} is not available in this installation "
                f"(module {module_name} is missing)",
                file=sys.stderr,
            )
        else:
            print(
                f"crucible.trainer: stage {stage!r} needs the Python package {exc.name!r}, which is not "
                "installed in this image; install crucible with the matching extra",
                file=sys.stderr,
            )
        return EXIT_APPLICATION_ERROR
    crucible.trainer.IMPORTS_DONE_AT = time.time()
    stage_main = getattr(module, "main", None)
    if stage_main is None:
        print(f"crucible.trainer: {module_name} has no main(argv) function", file=sys.stderr)
        return EXIT_APPLICATION_ERROR
    return int(stage_main(rest) or 0)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` as the interpreter would, less its teardown.

    What a normal exit does that matters is done, in the same order: the threading module's
    exit hooks (executors finish their work) and every non-daemon thread joined, then the
    ``atexit`` handlers, then stdout and stderr flushed. What is skipped is finalising every
    module and object — with torch, transformers and their compiled graphs loaded that takes
    seconds of CPU (5–6 s on this project's CI machine, far longer on a busy one) after the
    stage has written its ``_SUCCESS`` or its exit reason, on the critical path of every attempt's
    end and of every restart. Files the stages write are closed when written (nothing is left
    in a Python buffer), and the kernel keeps what was written, so nothing is lost.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()  # concurrent.futures' exit hooks, then joins the non-daemon threads
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exc:  # argparse and friends: their code, the usual way (message printed)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    exit_now(code)
