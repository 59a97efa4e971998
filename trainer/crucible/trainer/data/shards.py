"""Packed token shards: the one format DataPipeline writes and the trainer reads.

A split directory (``train/`` or ``validation/``) holds::

    index.json               {"format": "crucible-tokens", "version": 1, "dtype": "uint16",
                              "vocabSize": 8192, "eosId": 0, "shards": [{"name", "tokens",
                              "documents", "sha256"}...], "tokens": N, "documents": M}
    shard-00000.bin          little-endian token ids, uint16 when vocabSize <= 65536 else uint32
    shard-00000.idx          header + (documents + 1) uint64 token offsets of document starts

Every document's tokens end with ``eosId`` inside the ``.bin`` stream, so a reader that packs
the stream into fixed-length sequences still sees where documents end, and one that wants
document boundaries (attention masking, per-document sampling) reads them from ``.idx``.

``.idx`` header (little-endian): magic ``b"CRCBLTOK"`` (8 bytes), version u32, dtype code u32
(2 = uint16, 4 = uint32), documents u64, tokens u64; then the offsets.

``index.json`` is written last, so a split without it is incomplete and is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"CRCBLTOK"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
INDEX_FILE = "index.json"
FORMAT_NAME = "crucible-tokens"


class ShardFormatError(ValueError):
    """A shard or index that is missing, torn or not in this format. The message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    tokens: int
    documents: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "tokens": self.tokens, "documents": self.documents, "sha256": self.sha256}


class ShardWriter:
    """Appends documents to ``shard-NNNNN.bin/.idx`` files of about ``tokens_per_shard`` tokens.

    A document is never split across shards. ``close()`` writes ``index.json`` last and
    returns it. Files are written under a temporary name and renamed, so a killed writer
    leaves no file that looks complete.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        vocab_size: int,
        eos_id: int,
        tokens_per_shard: int = 100_000_000,
        prefix: str = "shard",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.tokens_per_shard = tokens_per_shard
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self._chunks: list[np.ndarray] = []
        self._offsets: list[int] = [0]
        self._closed = False

    def add_document(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Add one document; ``eos_id`` is appended unless it already ends with it."""
        arr = np.asarray(token_ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in document {len(self._offsets) - 1}")
        if arr.size == 0 or arr[-1] != self.eos_id:
            arr = np.append(arr, self.eos_id)
        self._chunks.append(arr.astype(self.dtype))
        self._offsets.append(self._offsets[-1] + int(arr.size))
        if self._offsets[-1] >= self.tokens_per_shard:
            self._flush()

    def add_documents(self, docs: Iterable[Sequence[int] | np.ndarray]) -> None:
        for doc in docs:
            self.add_document(doc)

    def _flush(self) -> None:
        if len(self._offsets) == 1:
            return
        name = f"{self.prefix}-{len(self.shards):05d}"
        tokens = np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)
        offsets = np.asarray(self._offsets, dtype=np.uint64)
        bin_path = self.directory / f"{name}.bin"
        idx_path = self.directory / f"{name}.idx"
        _atomic_write(bin_path, tokens.tobytes())
        header = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, len(offsets) - 1, int(offsets[-1]))
        _atomic_write(idx_path, header + offsets.tobytes())
        self.shards.append(ShardInfo(name, int(offsets[-1]), len(offsets) - 1, sha256_file(bin_path)))
        self._chunks, self._offsets = [], [0]

    def close(self, extra: dict[str, object] | None = None, write_index: bool = True) -> dict[str, object]:
        """Flush the last shard and write ``index.json``; returns the index.

        ``write_index=False`` leaves the index to the caller: several writers (one per
        DataPipeline worker, each with its own ``prefix``) fill one split directory and the
        last step merges their shard lists with :func:`write_index`.
        """
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._flush()
        self._closed = True
        index = build_index(self.shards, self.vocab_size, self.eos_id, extra)
        if write_index:
            _atomic_write(self.directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
        return index


def build_index(
    shards: Sequence[ShardInfo], vocab_size: int, eos_id: int, extra: dict[str, object] | None = None
) -> dict[str, object]:
    """The ``index.json`` content for ``shards`` in stream order."""
    dtype = dtype_for_vocab(vocab_size)
    index: dict[str, object] = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "dtype": dtype.name,
        "vocabSize": vocab_size,
        "eosId": eos_id,
        "tokens": sum(s.tokens for s in shards),
        "documents": sum(s.documents for s in shards),
        "shards": [s.to_json() for s in shards],
    }
    if extra:
        index.update(extra)
    return index


def write_index(
    directory: str | os.PathLike[str],
    shards: Sequence[ShardInfo],
    vocab_size: int,
    eos_id: int,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """Write ``index.json`` for shards already in ``directory`` (written last, atomically)."""
    index = build_index(shards, vocab_size, eos_id, extra)
    _atomic_write(Path(directory) / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
    return index


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TokenShard:
    """One memory-mapped shard: its token stream and document offsets."""

    def __init__(self, bin_path: str | os.PathLike[str]) -> None:
        self.bin_path = Path(bin_path)
        self.idx_path = self.bin_path.with_suffix(".idx")
        try:
            raw = self.idx_path.read_bytes()
        except FileNotFoundError as exc:
            raise ShardFormatError(f"{self.idx_path}: index file missing; rerun the DataPipeline") from exc
        if len(raw) < _HEADER.size:
            raise ShardFormatError(f"{self.idx_path}: truncated header ({len(raw)} bytes)")
        magic, version, itemsize, documents, tokens = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ShardFormatError(f"{self.idx_path}: not a Crucible token index (magic {magic!r})")
        if version != VERSION:
            raise ShardFormatError(f"{self.idx_path}: format version {version}, this Crucible reads {VERSION}")
        if itemsize not in (2, 4):
            raise ShardFormatError(f"{self.idx_path}: unknown dtype code {itemsize}")
        expected = _HEADER.size + 8 * (documents + 1)
        if len(raw) != expected:
            raise ShardFormatError(f"{self.idx_path}: {len(raw)} bytes, expected {expected} for {documents} documents")
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self.offsets = np.frombuffer(raw, dtype=np.uint64, offset=_HEADER.size)
        size = self.bin_path.stat().st_size if self.bin_path.exists() else -1
        if size != tokens * itemsize:
            raise ShardFormatError(
                f"{self.bin_path}: {size} bytes, index says {tokens} tokens × {itemsize} bytes; the shard is torn"
            )
        self.num_tokens = int(tokens)
        self.num_documents = int(documents)
        self.tokens: np.ndarray = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if tokens else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return self.num_tokens

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (ending in EOS)."""
        return np.asarray(self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])])

    def documents(self) -> Iterator[np.ndarray]:
        for i in range(self.num_documents):
            yield self.document(i)


class ShardSet:
    """All shards of one split, in index order, as one logical token stream."""

    def __init__(self, directory: str | os.PathLike[str], verify: bool = False) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        try:
            self.index = json.loads(index_path.read_text())
        except FileNotFoundError as exc:
            raise ShardFormatError(
                f"{index_path}: missing; the split is incomplete or the path is wrong "
                "(point data.uri at a DataPipeline output)"
            ) from exc
        except json.JSONDecodeError as exc:
            raise ShardFormatError(f"{index_path}: not valid JSON ({exc})") from exc
        if self.index.get("format") != FORMAT_NAME:
            raise ShardFormatError(f"{index_path}: format is {self.index.get('format')!r}, expected {FORMAT_NAME!r}")
        self.vocab_size = int(self.index["vocabSize"])
        self.eos_id = int(self.index["eosId"])
        self.shards: list[TokenShard] = []
        for entry in self.index["shards"]:
            bin_path = self.directory / f"{entry['name']}.bin"
            if verify and sha256_file(bin_path) != entry["sha256"]:
                raise ShardFormatError(f"{bin_path}: sha256 differs from {index_path}; the shard is corrupted")
            self.shards.append(TokenShard(bin_path))
        self.num_tokens = sum(s.num_tokens for s in self.shards)
        self.num_documents = sum(s.num_documents for s in self.shards)
        self._starts = np.cumsum([0] + [s.num_tokens for s in self.shards])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the concatenated stream from ``start``, as int64 (crosses shards)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"range [{start}, {start + length}) outside {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            shard_i = int(np.searchsorted(self._starts, pos, side="right") - 1)
            shard = self.shards[shard_i]
            local = pos - int(self._starts[shard_i])
            take = min(length - filled, shard.num_tokens - local)
            out[filled : filled + take] = shard.tokens[local : local + take]
            filled += take
            pos += take
        return out

    def documents(self) -> Iterator[np.ndarray]:
        for shard in self.shards:
            yield from shard.documents()
