"""Dedup across workers with memory per worker in O(documents / workers).

Four steps, each streaming, each writing files a rerun can trust (temporary name, then rename):

1. **Sorted runs per bucket** (:class:`BucketRunWriter`, in every filter part). Each band key
   (and each exact hash) goes to bucket ``key % buckets``; every ``run_docs`` documents the
   buffered records are sorted and spilled to local disk as one *run* per bucket; at the end
   the runs of each bucket are merged (:func:`merge_segments`) into one sorted file
   ``bucket-QQQQQ.bin`` (layout below). Memory: one run's records, never the part's.
2. **Links** (:func:`link_bucket`, dedup worker ``q``). The files ``bucket-q.bin`` of every
   filter part are merged band by band in blocks; within each group of equal keys every member
   is linked to the group's smallest document key (as :func:`minhash.bucket_pairs` does for a
   whole column). The links of one worker are reduced to a spanning forest (root, member), so
   a pair found in many bands is stored once per worker. Memory: the merge buffers plus the
   worker's links.
3. **Union-find over the link set** (:func:`cluster`, once, by the first tokenize worker that
   finds it missing): the forests of every worker, joined with :func:`minhash.cluster_roots`;
   every non-root is dropped (exact when it is joined to its root by exact links alone, else
   near), and the drop decisions are written per filter part, split by the part's key range.
4. **Read back** (:class:`DropDecisions`, tokenize part ``p``): only part ``p``'s sorted
   removed keys, looked up per batch with ``searchsorted``.

The kept set is today's whatever the number of workers: the earliest document (smallest key)
of each connected component, components taken over the same links.

``bucket-QQQQQ.bin``::

    b"CRCBKT01"  u32 segments (bands + 1)  u32 0
    segments x (u64 byte offset, u64 rows)
    segment b < bands: rows of (band key, doc key) u64, sorted by (key, doc)
    segment bands:     rows of (hash hi, hash lo, doc key) u64, sorted (the exact hashes)
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crucible.trainer.data import private_tmp
from crucible.trainer.data.minhash import cluster_roots

MAGIC = b"CRCBKT01"
_HEAD = struct.Struct("<8sII")
RUN_DOCS = 1 << 17  # documents buffered before a sorted run is spilled (~20 MB at 14 bands)
MERGE_BUDGET_ROWS = 1 << 19  # rows buffered over all runs being merged (~8-12 MB)
REASON_EXACT = 1
REASON_NEAR = 2


def _tmp(path: Path) -> Path:
    return private_tmp(path)


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of every key (the keys are hashes, so the low bits are uniform)."""
    return (keys % np.uint64(buckets)).astype(np.int64)


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Rows (n, w) sorted by column 0, then 1, ... (the doc key last breaks ties)."""
    if len(rows) < 2:
        return rows
    order = np.lexsort(tuple(rows[:, c] for c in range(rows.shape[1] - 1, -1, -1)))
    return rows[order]


# -- bucket files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """``rows`` sorted rows of ``width`` u64 at ``offset`` bytes in ``path``."""

    path: Path
    offset: int
    rows: int
    width: int

    def load(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.width), np.uint64)
        mm = np.memmap(self.path, dtype=np.uint64, mode="r", offset=self.offset + 8 * self.width * start,
                       shape=(stop - start, self.width))
        return np.array(mm)


def read_bucket_file(path: Path, bands: int) -> list[Segment]:
    """The segments of one ``bucket-QQQQQ.bin`` (``bands`` near segments and the exact one)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise ValueError(f"{path}: truncated bucket file header")
        magic, count, _ = _HEAD.unpack(head)
        if magic != MAGIC or count != bands + 1:
            raise ValueError(f"{path}: not a bucket file of {bands} bands (magic {magic!r}, {count} segments)")
        table = np.frombuffer(f.read(16 * count), dtype=np.uint64).reshape(count, 2)
    return [Segment(path, int(off), int(rows), 2 if b < bands else 3) for b, (off, rows) in enumerate(table)]


class _SegmentedWriter:
    """Writes one bucket file: segments in order, the table filled in on close."""

    def __init__(self, path: Path, segments: int) -> None:
        self.path, self.tmp = path, _tmp(path)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.table = np.zeros((segments, 2), np.uint64)
        self.f.write(_HEAD.pack(MAGIC, segments, 0) + self.table.tobytes())
        self.current = -1

    def begin(self, segment: int) -> None:
        self.current = segment
        self.table[segment, 0] = self.f.tell()

    def write(self, rows: np.ndarray) -> None:
        if len(rows):
            self.f.write(np.ascontiguousarray(rows, dtype=np.uint64).tobytes())
            self.table[self.current, 1] += len(rows)

    def close(self) -> None:
        self.f.seek(_HEAD.size)
        self.f.write(self.table.tobytes())
        self.f.close()
        os.replace(self.tmp, self.path)


# -- the k-way block merge -----------------------------------------------------------------------


def merge_segments(segments: list[Segment], budget_rows: int = MERGE_BUDGET_ROWS) -> Iterator[np.ndarray]:
    """Sorted chunks of the union of sorted ``segments`` (all of one width).

    The chunks concatenate to the fully sorted union, and rows with equal first columns are
    never split between two chunks, so a group of equal keys can be handled chunk by chunk.
    Memory: about ``budget_rows`` rows plus the largest group of equal keys.
    """
    segments = [s for s in segments if s.rows]
    if not segments:
        return
    width = segments[0].width
    block = max(256, budget_rows // len(segments))
    pos = [0] * len(segments)
    bufs = [np.zeros((0, width), np.uint64) for _ in segments]

    def refill(i: int) -> None:
        stop = min(segments[i].rows, pos[i] + block)
        bufs[i] = np.concatenate([bufs[i], segments[i].load(pos[i], stop)])
        pos[i] = stop

    for i in range(len(segments)):
        refill(i)
    while True:
        active = [i for i in range(len(segments)) if pos[i] < segments[i].rows]
        if not active:
            rest = [b for b in bufs if len(b)]
            if rest:
                yield _sorted_rows(np.concatenate(rest))
            return
        # Every unread row of an active run is >= the last row buffered from it, so every row
        # below the smallest such last key is buffered now: emit those.
        threshold = min(bufs[i][-1, 0] for i in active)
        out = []
        for i, buf in enumerate(bufs):
            cut = int(np.searchsorted(buf[:, 0], threshold, side="left"))
            if cut:
                out.append(buf[:cut])
                bufs[i] = buf[cut:]
        if out:
            yield _sorted_rows(np.concatenate(out))
        for i in active:
            if not len(bufs[i]) or bufs[i][-1, 0] == threshold:
                refill(i)


# -- 1. filter side: sorted runs per bucket --------------------------------------------------------


class BucketRunWriter:
    """Band keys and exact hashes of one filter part, as sorted bucket files under ``directory``.

    :meth:`add` takes a batch; every ``run_docs`` documents the buffer becomes one sorted run
    per bucket on local disk (``directory/.spill-PID/``); :meth:`close` merges the runs and
    writes ``bucket-QQQQQ.bin`` for every bucket (all of them, empty ones included).
    """

    def __init__(self, directory: Path, buckets: int, bands: int, exact: bool, run_docs: int = RUN_DOCS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.buckets, self.bands, self.exact = buckets, bands, exact
        self.run_docs = run_docs
        self.spill = self.directory / f".spill-{os.getpid()}"
        self.runs = 0
        self._docs: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []  # (D, bands)
        self._present: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []  # (D, 2)
        self._buffered = 0
        self.records = 0

    def add(self, doc_keys: np.ndarray, band_keys: np.ndarray, has_signature: np.ndarray,
            exact_hashes: np.ndarray | None) -> None:
        """One batch: doc keys (D,), band keys (D, bands), has-signature (D,), exact hashes (D, 2)."""
        if not len(doc_keys):
            return
        self._docs.append(np.asarray(doc_keys, np.uint64))
        self._keys.append(np.asarray(band_keys, np.uint64).reshape(len(doc_keys), self.bands))
        self._present.append(np.asarray(has_signature, bool))
        if self.exact:
            assert exact_hashes is not None
            self._hashes.append(np.asarray(exact_hashes, np.uint64))
        self._buffered += len(doc_keys)
        if self._buffered >= self.run_docs:
            self._spill()

    def _segments_in_memory(self) -> list[list[np.ndarray]]:
        """[bucket][segment] sorted rows of what is buffered now."""
        out: list[list[np.ndarray]] = [[] for _ in range(self.buckets)]
        if not self._docs:
            empty2, empty3 = np.zeros((0, 2), np.uint64), np.zeros((0, 3), np.uint64)
            return [[empty2] * self.bands + [empty3] for _ in range(self.buckets)]
        docs = np.concatenate(self._docs)
        keys = np.concatenate(self._keys)
        present = np.concatenate(self._present)
        for band in range(self.bands):
            rows = np.stack([keys[present, band], docs[present]], axis=1)
            self._split_by_bucket(_sorted_rows(rows), out)
        if self.exact:
            hashes = np.concatenate(self._hashes)
            rows = np.concatenate([hashes, docs[:, None]], axis=1)
            self._split_by_bucket(_sorted_rows(rows), out)
        else:
            for bucket in out:
                bucket.append(np.zeros((0, 3), np.uint64))
        self.records += sum(len(seg) for bucket in out for seg in bucket)
        self._docs, self._keys, self._present, self._hashes = [], [], [], []
        self._buffered = 0
        return out

    def _split_by_bucket(self, rows: np.ndarray, out: list[list[np.ndarray]]) -> None:
        which = bucket_of(rows[:, 0], self.buckets)
        order = np.argsort(which, kind="stable")  # stays sorted within each bucket
        rows, which = rows[order], which[order]
        bounds = np.searchsorted(which, np.arange(self.buckets + 1))
        for q in range(self.buckets):
            out[q].append(rows[bounds[q] : bounds[q + 1]])

    def _spill(self) -> None:
        segments = self._segments_in_memory()
        run_dir = self.spill / f"run-{self.runs:05d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for q, segs in enumerate(segments):
            self._write(run_dir / f"bucket-{q:05d}.bin", segs)
        self.runs += 1

    def _write(self, path: Path, segs: list[np.ndarray]) -> None:
        writer = _SegmentedWriter(path, self.bands + 1)
        for i, rows in enumerate(segs):
            writer.begin(i)
            writer.write(rows)
        writer.close()

    def close(self) -> list[str]:
        """Write every ``bucket-QQQQQ.bin``; returns their names."""
        names = [f"bucket-{q:05d}.bin" for q in range(self.buckets)]
        if not self.runs:
            for q, segs in enumerate(self._segments_in_memory()):
                self._write(self.directory / names[q], segs)
            return names
        if self._buffered:
            self._spill()
        for q in range(self.buckets):
            runs = [read_bucket_file(self.spill / f"run-{r:05d}" / names[q], self.bands) for r in range(self.runs)]
            writer = _SegmentedWriter(self.directory / names[q], self.bands + 1)
            for seg in range(self.bands + 1):
                writer.begin(seg)
                for chunk in merge_segments([run[seg] for run in runs]):
                    writer.write(chunk)
            writer.close()
        shutil.rmtree(self.spill, ignore_errors=True)
        return names


# -- 2. dedup side: links of one bucket ---------------------------------------------------------------


def _group_links(rows: np.ndarray, key_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(smallest doc of the group, other member) for sorted rows grouped by the key columns."""
    if len(rows) < 2:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    new = np.ones(len(rows), bool)
    same = np.ones(len(rows) - 1, bool)
    for c in range(key_columns):
        same &= rows[1:, c] == rows[:-1, c]
    new[1:] = ~same
    first = np.maximum.accumulate(np.where(new, np.arange(len(rows)), 0))
    docs = rows[:, key_columns]
    member = ~new
    return docs[first[member]], docs[member]


def forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A spanning forest of the links as (root, member) pairs: the same components, fewer links."""
    nodes, roots = cluster_roots(a, b)
    keep = nodes != roots
    return roots[keep], nodes[keep]


@dataclass
class BucketLinks:
    """The links found in one bucket, each as a spanning forest."""

    exact_root: np.ndarray
    exact_member: np.ndarray
    all_root: np.ndarray  # exact and near links together
    all_member: np.ndarray
    near_links: int
    exact_links: int


def link_bucket(files: list[Path], bands: int, budget_rows: int = MERGE_BUDGET_ROWS) -> BucketLinks:
    """Links of bucket ``q`` from the ``bucket-q.bin`` of every filter part."""
    parts = [read_bucket_file(p, bands) for p in files]
    near_a: list[np.ndarray] = []
    near_b: list[np.ndarray] = []
    exact_a: list[np.ndarray] = []
    exact_b: list[np.ndarray] = []
    for seg in range(bands + 1):
        exact = seg == bands
        for chunk in merge_segments([p[seg] for p in parts], budget_rows):
            a, b = _group_links(chunk, 2 if exact else 1)
            (exact_a if exact else near_a).append(a)
            (exact_b if exact else near_b).append(b)
    empty = np.zeros(0, np.uint64)
    ea = np.concatenate(exact_a) if exact_a else empty
    eb = np.concatenate(exact_b) if exact_b else empty
    na = np.concatenate(near_a) if near_a else empty
    nb = np.concatenate(near_b) if near_b else empty
    er, em = forest(ea, eb)
    ar, am = forest(np.concatenate([ea, na]), np.concatenate([eb, nb]))
    return BucketLinks(er, em, ar, am, len(na), len(ea))


def save_links(path: Path, links: BucketLinks) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, exact_root=links.exact_root, exact_member=links.exact_member,
                 all_root=links.all_root, all_member=links.all_member)
    os.replace(tmp, path)


# -- 3. union-find over the link set --------------------------------------------------------------------


def cluster(link_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(removed doc keys sorted, reason of each: REASON_EXACT or REASON_NEAR) over every link file."""
    loaded = [np.load(p) for p in link_files]
    cat = lambda name: np.concatenate([x[name] for x in loaded]) if loaded else np.zeros(0, np.uint64)  # noqa: E731
    nodes, roots = cluster_roots(cat("exact_root"), cat("exact_member"))
    exact_removed = nodes[nodes != roots]
    nodes, roots = cluster_roots(cat("all_root"), cat("all_member"))
    removed = nodes[nodes != roots]
    reasons = np.where(np.isin(removed, exact_removed, assume_unique=True), REASON_EXACT, REASON_NEAR).astype(np.uint64)
    return removed, reasons


def split_decisions(removed: np.ndarray, reasons: np.ndarray, ranges: list[tuple[int, int] | None]
                    ) -> list[np.ndarray]:
    """Per filter part, the rows (key, reason) whose key lies in the part's [first, last] range."""
    out = []
    for r in ranges:
        if r is None:
            out.append(np.zeros((0, 2), np.uint64))
            continue
        lo = int(np.searchsorted(removed, np.uint64(r[0]), side="left"))
        hi = int(np.searchsorted(removed, np.uint64(r[1]), side="right"))
        out.append(np.stack([removed[lo:hi], reasons[lo:hi]], axis=1))
    return out


def save_decisions(path: Path, rows: np.ndarray) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(rows, dtype=np.uint64))
    os.replace(tmp, path)


# -- 4. read back ---------------------------------------------------------------------------------------


class DropDecisions:
    """One filter part's removed keys; :meth:`reasons` looks a batch of keys up."""

    def __init__(self, path: Path) -> None:
        rows = np.load(path)
        self.keys = np.ascontiguousarray(rows[:, 0]) if len(rows) else np.zeros(0, np.uint64)
        self.codes = np.ascontiguousarray(rows[:, 1]) if len(rows) else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return len(self.keys)

    def reasons(self, keys: np.ndarray) -> np.ndarray:
        """0 (kept), REASON_EXACT or REASON_NEAR for every key."""
        keys = np.asarray(keys, np.uint64)
        if not len(self.keys):
            return np.zeros(len(keys), np.int64)
        idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[idx] == keys
        return np.where(hit, self.codes[idx], 0).astype(np.int64)
