"""``python -m crucible.trainer STAGE --spec FILE [stage options]``: what pods and the embedded runner start.

STAGE picks the stage module, imported lazily so ``quantize`` never pays for DeepSpeed and a
broken optional dependency of one stage does not take the others down. Each module exposes
``main(argv: list[str]) -> int`` and receives the arguments after STAGE unchanged. Exit codes
are the contract in :mod:`crucible.trainer.config.common` (0, 1, 2, 75).
"""

from __future__ import annotations

import importlib
import sys
import time

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


if __name__ == "__main__":
    sys.exit(main())
