"""Put the quickstart's local inputs into the work directory (run by `crucible run` before the pipeline).

The DataPipeline's annotation ``crucible.dev/prepare: python prepare.py`` makes the embedded
runner call this in this folder with ``CRUCIBLE_WORKDIR`` set. It writes
``$CRUCIBLE_WORKDIR/inputs/``:

* ``stdlib-docs.jsonl`` — the raw corpus, gathered now from this Python's standard library
  with planted noise (see build_corpus.py);
* ``instructions.jsonl`` (48 prompt/response pairs) and ``preferences.jsonl`` (40
  prompt/chosen/rejected triples), copied from ``data/``.

Files are rewritten only when their content changes, so a rerun of `crucible run` skips every
finished stage. On a cluster, copy the same files to your bucket and point the ``uri`` fields at them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from build_corpus import build

HERE = Path(__file__).resolve().parent


def copy_if_changed(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if not dst.exists() or dst.read_bytes() != data:
        dst.write_bytes(data)


def main() -> int:
    workdir = os.environ.get("CRUCIBLE_WORKDIR")
    if not workdir:
        print("prepare.py: set CRUCIBLE_WORKDIR to the work directory (crucible run does this)", file=sys.stderr)
        return 2
    inputs = Path(workdir) / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    path, n_clean, n_noise = build(inputs)
    print(f"corpus: {n_clean + n_noise} raw documents ({n_clean} from the standard library of Python "
          f"{sys.version.split()[0]}, {n_noise} planted noise) -> {path}")
    for name in ("instructions.jsonl", "preferences.jsonl", "rl-prompts.jsonl"):
        copy_if_changed(HERE / "data" / name, inputs / name)
    print(f"instructions and preference pairs -> {inputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
