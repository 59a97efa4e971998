"""Reading sources: local paths and s3://, jsonl (.gz, .zst), parquet and plain-text folders.

Bad input never crashes the pipeline. Each problem is counted under a reason and logged with
``file:line``: ``invalid_utf8``, ``malformed_json``, ``not_an_object``, ``missing_text``,
``empty_text``, ``too_long``, ``empty_file``, ``truncated_file`` (a compressed stream that
ends early: the records before the damage are kept), ``unreadable_file`` (permission, missing
or access-denied object). Only a storage outage (:class:`StorageUnavailable`) propagates: that
is an infrastructure fault for the backends to retry, not a property of the data.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from crucible.trainer.config.data import SourceConfig
from crucible.trainer.data.document import Document
from crucible.trainer.stage_io import SpecError
from crucible.trainer.storage import Storage, StorageError, StorageUnavailable, is_s3

log = logging.getLogger("crucible.data")

_SUFFIX_FORMATS = (
    (".jsonl.gz", "jsonl", "gzip"),
    (".json.gz", "jsonl", "gzip"),
    (".ndjson.gz", "jsonl", "gzip"),
    (".jsonl.zst", "jsonl", "zstd"),
    (".json.zst", "jsonl", "zstd"),
    (".ndjson.zst", "jsonl", "zstd"),
    (".jsonl", "jsonl", None),
    (".ndjson", "jsonl", None),
    (".json", "jsonl", None),
    (".parquet", "parquet", None),
    (".txt", "text", None),
    (".txt.gz", "text", "gzip"),
    (".txt.zst", "text", "zstd"),
    (".md", "text", None),
)
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
MAX_LOGGED_PER_REASON = 20


class SourceError(SpecError):
    """A source that names nothing readable: a spec error (exit 2); the message names the field."""


@dataclass(frozen=True)
class InputFile:
    """One file of one source; ``index`` is its position among all inputs (sets document keys)."""

    source: SourceConfig
    uri: str
    relpath: str
    index: int
    format: str
    compression: str | None
    size: int = -1  # bytes; -1 when unknown

    @property
    def splittable(self) -> bool:
        """Whether a worker can read a byte range (plain jsonl) or row groups (parquet) of it."""
        return self.compression is None and self.format in ("jsonl", "parquet")


@dataclass(frozen=True)
class Piece:
    """The part of one input a worker reads: the whole file, a byte range of a plain jsonl file
    (the lines that START in ``[start, stop)``), or row groups ``[start, stop)`` of a parquet file."""

    file: InputFile
    start: int = 0
    stop: int | None = None  # None: to the end

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


@dataclass
class InputErrors:
    """Bad-input counts per reason and per source, with the first few locations logged."""

    counts: Counter[str] = field(default_factory=Counter)
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, source: str, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.by_source[(source, reason)] += 1
        if self.counts[reason] <= MAX_LOGGED_PER_REASON:
            log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        elif self.counts[reason] == MAX_LOGGED_PER_REASON + 1:
            log.warning("more %s records skipped; counts are in manifest.json", reason)

    def to_json(self) -> dict[str, Any]:
        by_source: dict[str, dict[str, int]] = {}
        for (src, reason), n in sorted(self.by_source.items()):
            by_source.setdefault(src, {})[reason] = n
        return {"dropped": dict(sorted(self.counts.items())), "droppedBySource": by_source}


def detect_format(name: str, declared: str) -> tuple[str, str | None] | None:
    lower = name.lower()
    for suffix, fmt, compression in _SUFFIX_FORMATS:
        if lower.endswith(suffix):
            if declared in ("auto", fmt):
                return fmt, compression
            return declared, compression
    if declared != "auto":
        return declared, ("gzip" if lower.endswith(".gz") else "zstd" if lower.endswith(".zst") else None)
    return None


def _has_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def _s3_listing(storage: Storage, root: str) -> list[tuple[str, int]]:
    """(uri, size) of every object below an S3 prefix, sorted (one paginated listing)."""
    from crucible.trainer.storage import S3Location

    loc = S3Location.parse(root.rstrip("/") + "/")
    paginator = storage.client.get_paginator("list_objects_v2")
    pages = storage._s3_call(root, lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=loc.key)))
    found = [(f"s3://{loc.bucket}/{obj['Key']}", int(obj.get("Size", -1))) for page in pages
             for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    return sorted(found)


def _s3_size(storage: Storage, uri: str) -> int:
    from crucible.trainer.storage import S3Location

    loc = S3Location.parse(uri)
    head = storage._s3_call(uri, storage.client.head_object, Bucket=loc.bucket, Key=loc.key)
    return int(head.get("ContentLength", -1))


def _walk_folder(root: Path, where: str) -> list[tuple[str, str, int]]:
    """Every file below ``root``, following symlinked sub-folders once each (a link back into a
    folder already walked is reported and skipped, never looped on), sorted by relative path."""
    found: list[tuple[str, str, int]] = []
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
        except OSError as exc:
            log.warning("%s: cannot read folder %s (%s); its files are not read", where, folder, exc)
            return
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s: %s links back to a folder already read (a symlink loop); not read twice", where, folder)
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("%s: cannot list folder %s (%s); its files are not read", where, folder, exc)
            return
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            if entry.is_symlink() and not path.exists():
                log.warning("%s: %s is a broken symlink; skipped", where, path)
                continue
            if entry.is_dir():  # follows symlinks
                if entry.is_symlink():
                    log.info("%s: following symlinked folder %s -> %s", where, path, os.path.realpath(path))
                walk(path, child_rel)
            elif entry.is_file():
                found.append((str(path), child_rel, path.stat().st_size))

    walk(root, "")
    return sorted(found, key=lambda t: t[1])


def _list_source(source: SourceConfig, storage: Storage, where: str = "sources") -> list[tuple[str, str, int]]:
    """(uri, path relative to the source root, size in bytes) of every candidate file, sorted."""
    uri = source.uri
    if is_s3(uri):
        if _has_glob(uri):
            root = uri[: min(uri.find(c) for c in "*?[" if c in uri)].rsplit("/", 1)[0]
            return [(u, u[len(root) + 1 :], n) for u, n in _s3_listing(storage, root) if fnmatch.fnmatch(u, uri)]
        listed = _s3_listing(storage, uri)
        if listed:
            root = uri.rstrip("/")
            return [(u, u[len(root) + 1 :], n) for u, n in listed]
        return [(uri, uri.rsplit("/", 1)[-1], _s3_size(storage, uri))] if storage.exists(uri) else []
    if _has_glob(uri):
        root = os.path.dirname(uri[: min(uri.find(c) for c in "*?[" if c in uri)]) or "."
        found = sorted(p for p in glob.glob(uri, recursive=True) if os.path.isfile(p))
        return [(p, os.path.relpath(p, root), os.path.getsize(p)) for p in found]
    path = Path(uri)
    if path.is_file():
        return [(str(path), path.name, path.stat().st_size)]
    if path.is_dir():
        return _walk_folder(path, where)
    return []


def list_inputs(sources: list[SourceConfig], storage: Storage) -> list[InputFile]:
    """Every input file of every source, in spec order then path order; raises SourceError."""
    files: list[InputFile] = []
    for i, source in enumerate(sources):
        try:
            candidates = _list_source(source, storage, f"sources[{i}] {source.name}")
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise SourceError(f"sources[{i}].uri: cannot list {source.uri!r}: {exc}") from exc
        matched = 0
        for uri, rel, size in candidates:
            detected = detect_format(rel, source.format)
            if detected is None:
                log.info("sources[%d] %s: skipping %s (unknown extension)", i, source.name, rel)
                continue
            files.append(InputFile(source, uri, rel, len(files), detected[0], detected[1], size))
            matched += 1
        if not matched:
            raise SourceError(
                f"sources[{i}].uri: {source.uri!r} matches no readable file (.jsonl, .jsonl.gz, .jsonl.zst, "
                ".parquet, .txt); check the path, or set sources[{i}].format".replace("{i}", str(i))
            )
    return files


class _Opened:
    """A local path for an input: the file itself, or an S3 object downloaded to a temp file."""

    def __init__(self, item: InputFile, storage: Storage) -> None:
        self.item = item
        self.storage = storage
        self._tmp: str | None = None

    def __enter__(self) -> str:
        if not is_s3(self.item.uri):
            return self.item.uri
        fd, self._tmp = tempfile.mkstemp(prefix="crucible-input-")
        os.close(fd)
        self.storage.download_file(self.item.uri, self._tmp)
        return self._tmp

    def __exit__(self, *exc: object) -> None:
        if self._tmp:
            Path(self._tmp).unlink(missing_ok=True)


class _ZstdReader(io.RawIOBase):
    """A zstd stream (one or more frames) that raises EOFError when the input ends inside a
    frame: zstandard's stream reader returns a short read instead, so a torn file would lose
    its last records (or, for one small block, all of them) without a word."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw = raw
        self._zstd = zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending and not self._done:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame (file truncated)")
                self._done = True
                break
            while chunk:
                self._in_frame = True
                try:
                    self._pending += self._dobj.decompress(chunk)
                except self._zstd.ZstdError as exc:
                    raise EOFError(f"damaged zstd stream ({exc})") from exc
                if self._dobj.eof:  # a frame ended: the rest of the chunk starts the next one
                    chunk = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    chunk = b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: str, compression: str | None) -> IO[bytes]:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the wrapper or the caller
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 16)  # type: ignore[return-value]
    return raw


def _count_newlines(f: IO[bytes], stop: int) -> int:
    """Newlines in the first ``stop`` bytes of ``f`` (read in blocks, nothing kept)."""
    f.seek(0)
    count, left = 0, stop
    while left > 0:
        block = f.read(min(left, 1 << 23))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def _lines_of_range(f: IO[bytes], start: int, stop: int | None) -> tuple[int, Iterator[bytes]]:
    """(index of the first line that starts in [start, stop), those lines) of a plain file."""
    if start <= 0:
        first = 0
        f.seek(0)
    else:
        # the line containing byte start-1 belongs to the previous range (unless it ends there)
        first = _count_newlines(f, start - 1)
        f.seek(start - 1)
        tail = f.readline()
        if tail.endswith(b"\n"):
            first += 1
    pos = f.tell()

    def lines() -> Iterator[bytes]:
        nonlocal pos
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line

    return first, lines()


class DocumentReader:
    """Turns input files into documents, counting everything it skips."""

    def __init__(self, storage: Storage, max_doc_chars: int, extra_fields: Sequence[str] = ()) -> None:
        self.storage = storage
        self.max_doc_chars = max_doc_chars
        self.extra_fields = tuple(extra_fields)  # jsonl fields copied into Document.meta
        self.errors = InputErrors()
        self.records: Counter[str] = Counter()  # records seen per source (documents in)

    def read(self, item: InputFile | Piece) -> Iterator[Document]:
        """The documents of one input file, or of one :class:`Piece` of it."""
        piece = item if isinstance(item, Piece) else Piece(item)
        item = piece.file
        where = item.uri
        try:
            with _Opened(item, self.storage) as path:
                if os.path.getsize(path) == 0:
                    if piece.start == 0:
                        self.errors.add(item.source.name, "empty_file", where)
                    return
                if item.format == "parquet":
                    yield from self._parquet(item, path, piece)
                elif item.format == "text":
                    yield from self._text(item, path)
                else:
                    yield from self._jsonl(item, path, piece)
        except StorageUnavailable:
            raise
        except (OSError, StorageError) as exc:
            self.errors.add(item.source.name, "unreadable_file", where, str(exc))

    def _make(self, item: InputFile, text: Any, doc_id: Any, record: int, where: str) -> Document | None:
        source = item.source.name
        self.records[source] += 1
        if not isinstance(text, str):
            self.errors.add(source, "missing_text", where, f"field {item.source.text_field!r}")
            return None
        if not text.strip():
            self.errors.add(source, "empty_text", where)
            return None
        if len(text) > self.max_doc_chars:
            self.errors.add(source, "too_long", where, f"{len(text)} characters > maxDocChars {self.max_doc_chars}")
            return None
        ident = str(doc_id) if doc_id is not None and doc_id != "" else f"{source}/{item.relpath}:{record + 1}"
        return Document(
            text=text, id=ident, source=source, domain=item.source.domain, key=(item.index << 32) | record
        )

    def _jsonl(self, item: InputFile, path: str, piece: Piece) -> Iterator[Document]:
        text_field, id_field = item.source.text_field, item.source.id_field
        source = item.source.name
        line_no = 0
        stream = _open_binary(path, item.compression)
        try:
            with stream:
                first, lines = (0, iter(stream)) if piece.whole else _lines_of_range(stream, piece.start, piece.stop)
                for line_no, raw in enumerate(lines, start=first + 1):
                    if not raw.strip():
                        continue
                    where = f"{item.uri}:{line_no}"
                    try:
                        line = raw.decode("utf-8")
                        if b"\\u" in raw and _LONE_SURROGATE.search(raw):
                            obj = json.loads(line)
                            json.dumps(obj, ensure_ascii=False).encode("utf-8")
                        else:
                            obj = json.loads(line)
                    except UnicodeError as exc:
                        self.records[source] += 1
                        self.errors.add(source, "invalid_utf8", where, str(exc)[:120])
                        continue
                    except ValueError as exc:
                        self.records[source] += 1
                        self.errors.add(source, "malformed_json", where, str(exc)[:120])
                        continue
                    if not isinstance(obj, dict):
                        self.records[source] += 1
                        self.errors.add(source, "not_an_object", where)
                        continue
                    doc = self._make(item, obj.get(text_field), obj.get(id_field) if id_field else None,
                                     line_no - 1, where)
                    if doc is not None:
                        for name in self.extra_fields:
                            doc.meta[name] = obj.get(name)
                        yield doc
        except (EOFError, OSError, ValueError) as exc:  # damaged gzip / zstd stream
            self.errors.add(source, "truncated_file", f"{item.uri}:{line_no + 1}", str(exc)[:120])

    def _text(self, item: InputFile, path: str) -> Iterator[Document]:
        try:
            with _open_binary(path, item.compression) as stream:
                data = stream.read()
        except (EOFError, OSError, ValueError) as exc:
            self.errors.add(item.source.name, "truncated_file", item.uri, str(exc)[:120])
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.records[item.source.name] += 1
            self.errors.add(item.source.name, "invalid_utf8", f"{item.uri}:byte {exc.start}", str(exc)[:120])
            return
        doc = self._make(item, text, None, 0, item.uri)
        if doc is not None:
            doc.id = f"{item.source.name}/{item.relpath}"
            yield doc

    def _parquet(self, item: InputFile, path: str, piece: Piece) -> Iterator[Document]:
        import pyarrow.parquet as pq

        text_field, id_field = item.source.text_field, item.source.id_field
        source = item.source.name
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            self.errors.add(source, "unreadable_file", item.uri, f"not a parquet file: {str(exc)[:120]}")
            return
        names = set(pf.schema_arrow.names)
        groups = list(range(pf.metadata.num_row_groups))[piece.start : piece.stop]
        if text_field not in names:
            rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
            if not rows:
                return
            self.records[source] += rows
            self.errors.counts["missing_text"] += rows - 1
            self.errors.by_source[(source, "missing_text")] += rows - 1
            self.errors.add(source, "missing_text", item.uri, f"no column {text_field!r} in {sorted(names)}")
            return
        columns = [text_field] + ([id_field] if id_field and id_field in names else [])
        row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
        for batch in pf.iter_batches(batch_size=4096, columns=columns, row_groups=groups) if groups else ():
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
            for text, doc_id in zip(texts, ids, strict=True):
                doc = self._make(item, text, doc_id, row, f"{item.uri}:row {row}")
                row += 1
                if doc is not None:
                    yield doc
