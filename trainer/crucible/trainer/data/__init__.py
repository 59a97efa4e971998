"""Data: the DataPipeline stage and the token-shard format shared with the trainer.

- :mod:`.pipeline` — the stage (``python -m crucible.trainer data``), ``run_pipeline(config,
  output_uri) -> Manifest`` and the ``manifest.json`` shape (module docstring);
- :mod:`.step` — the step contract (``Filter.filter(doc) -> reason | None``, ``Modifier``);
- one module per step: :mod:`.normalize`, :mod:`.language`, :mod:`.gopher_repetition`,
  :mod:`.gopher_quality`, :mod:`.c4`, :mod:`.fineweb`, :mod:`.pii`, :mod:`.toxicity`;
- :mod:`.minhash` — vectorized MinHash, LSH buckets, union-find; :mod:`.readers` — sources;
  :mod:`.tokenizer` — BPE training / reuse; :mod:`.shards` — the packed token format;
- :mod:`.synthetic` — a generated corpus with planted defects (tests, benchmark).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path


def private_tmp(path: Path) -> Path:
    """A temporary sibling private to this writer: host (pod), process and thread are in its name, so
    two workers never write one temporary file — two pods on a shared volume (both often pid 1), a pod
    restarted while the old one still runs, or two workers run as threads of one process."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.tmp")
