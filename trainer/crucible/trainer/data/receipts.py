"""What the manifest says of each source beyond its counts: licence, consent, origin, raw files.

Each raw input file is hashed (sha256, streamed) and sized when the manifest is written, so a
receipt names exactly the bytes the pipeline read; `crucible lineage` re-hashes them later and
reports any that changed. Hashing reads every raw byte once more: on the order of 1 GB/s per
core locally, bounded by the object store's bandwidth on S3.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from crucible.trainer.data.readers import InputFile
from crucible.trainer.data.shards import sha256_file
from crucible.trainer.storage import Storage, is_s3


def file_receipt(uri: str, storage: Storage) -> dict[str, Any]:
    if is_s3(uri):
        data = storage.read_bytes(uri)
        return {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return {"uri": uri, "sha256": sha256_file(uri), "size": os.path.getsize(uri)}


def source_receipts(sources: list[Any], inputs: list[InputFile], storage: Storage) -> dict[str, dict[str, Any]]:
    """Per source name: its declared licence, consent and origin, and every raw file with sha256 and size."""
    files: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sources}
    for item in sorted(inputs, key=lambda f: f.index):
        files[item.source.name].append(file_receipt(item.uri, storage))
    return {
        s.name: {"license": s.license, "consent": s.consent, "origin": s.origin, "rawFiles": files[s.name]}
        for s in sources
    }
