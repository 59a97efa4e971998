"""The EchoRun stage: ``python -m echo_stage --spec FILE`` (the contract of every stage: read
the resolved spec, write the output, then ``_SUCCESS`` and the termination message)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echo_stage")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    data = Path(spec["data"]["uri"])
    if not data.exists():
        print(f"spec.data.uri: {data} does not exist", file=sys.stderr)
        return 2
    out = Path(spec["output"]["uri"])
    out.mkdir(parents=True, exist_ok=True)
    message = spec.get("message", "hello world")
    (out / "echo.txt").write_text(message + "\n")
    results = {"words": len(message.split()), "said": message}
    receipt = json.dumps({"stage": "echo", "inputs": {"data": str(data)}, "results": results})
    (out / "_SUCCESS").write_text(receipt)
    log = os.environ.get("CRUCIBLE_TERMINATION_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(receipt + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
