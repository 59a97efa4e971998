"""Where a DataPipeline's parts write: the output URI, used in place or staged for S3.

Every file is written under a temporary name private to the process and renamed, so a reader
(another worker, a rerun) sees a whole file or none.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crucible.trainer.data import private_tmp
from crucible.trainer.storage import Storage, is_s3, join


class Workspace:
    """Files under the output URI. Local output is used in place; for ``s3://`` every file is
    written to a local staging directory and uploaded (:meth:`publish`), and files of other
    workers are downloaded on first use (:meth:`fetch`)."""

    def __init__(self, uri: str, storage: Storage) -> None:
        self.uri = uri.rstrip("/") if is_s3(uri) else uri
        self.storage = storage
        self.remote = is_s3(uri)
        if self.remote:
            # Private to this process: a stale copy from another run must never be read back.
            self.local = Path(tempfile.mkdtemp(prefix="crucible-data-"))
        else:
            self.local = Path(uri)
        self.local.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Remove the local staging copy of a remote output (a local output stays)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def path(self, rel: str) -> Path:
        p = self.local / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def uri_of(self, rel: str) -> str:
        return join(self.uri, rel) if self.remote else str(self.local / rel)

    def publish(self, rel: str) -> None:
        if self.remote:
            self.storage.upload_file(self.local / rel, join(self.uri, rel))

    def publish_dir(self, rel: str) -> None:
        if self.remote:
            root = self.local / rel
            for p in sorted(root.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    self.publish(p.relative_to(self.local).as_posix())

    def exists(self, rel: str) -> bool:
        if self.remote:
            return self.storage.exists(join(self.uri, rel))
        return (self.local / rel).exists()

    def fetch(self, rel: str) -> Path:
        p = self.local / rel
        if self.remote and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            self.storage.download_file(join(self.uri, rel), p)
        return p

    def fetch_dir(self, rel: str) -> Path:
        p = self.local / rel
        if self.remote:
            self.storage.download_prefix(join(self.uri, rel), p)
        return p

    def write_json(self, rel: str, data: Any) -> bytes:
        raw = (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        atomic_write(self.path(rel), raw)
        self.publish(rel)
        return raw

    def read_json(self, rel: str) -> Any:
        return json.loads(self.fetch(rel).read_text())

    def delete(self, rel: str) -> None:
        target = self.local / rel
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        if self.remote:
            self.storage.delete(join(self.uri, rel))


def tmp_name(path: Path) -> Path:
    """A temporary sibling private to this writer (:func:`crucible.trainer.data.private_tmp`)."""
    return private_tmp(path)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class AtomicZstdWriter:
    """jsonl.zst written to a temporary name and renamed on close (deterministic bytes)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.path = path
        self.tmp = tmp_name(path)
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._stream = zstandard.ZstdCompressor(level=3, threads=0).stream_writer(self._raw, closefd=False)

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n")

    def close(self) -> None:
        self._stream.close()
        self._raw.close()
        os.replace(self.tmp, self.path)


def read_zstd_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        for line in io.BufferedReader(reader):  # type: ignore[arg-type]
            yield json.loads(line)
