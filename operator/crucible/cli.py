"""The ``crucible`` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so ``crucible validate`` never imports torch or kopf.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("crucible.api.validate", "check resources offline (files or folders of YAML)"),
    "crds": ("crucible.api.crdgen", "generate the CustomResourceDefinitions from the models"),
    "render": ("crucible.operator.render_cli", "print the Kubernetes objects the operator would create"),
    "plan": ("crucible.core.capacity", "parameters, tokens, FLOPs, GPU-hours and energy of a PretrainRun"),
    "operator": ("crucible.operator.main", "run the Kopf operator against the current cluster"),
    "run": ("crucible.local.cli_run", "run resources on this machine, no cluster (embedded mode)"),
    "status": ("crucible.local.cli_status", "phase, step, loss and restarts of embedded runs"),
    "logs": ("crucible.local.cli_logs", "the log of an embedded run"),
    "lineage": ("crucible.local.lineage", "walk a model back to its raw sources, verifying every receipt's hashes"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: crucible COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'crucible COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"crucible: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"crucible {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
