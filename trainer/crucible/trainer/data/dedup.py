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
3. **Connected components, partitioned by document key** (:func:`route_links`, then
   :func:`cluster_round` per round and partition, driven by :func:`cluster_rounds`). Partition
   ``p`` owns the keys of filter part ``p`` (:class:`Owners`). Round 0: every dedup worker
   sends each forest edge (graph, member, root) to the member's owner. Round ``r`` partition
   ``p`` merges what every partition sent it in round ``r - 1`` (:func:`merge_rows`, groups
   may be split) and runs a small-star (odd ``r``) or large-star (even ``r``) step, sending the
   new edges on as sorted runs per destination (:class:`RoutedRunWriter`). When the input of a
   large-star round is a star forest in every partition, each non-root is dropped (exact when
   the exact-links graph, run alongside as graph 0, drops it too) and each partition writes
   its drop decisions. Memory: the merge buffers and one run of outgoing edges (plus, in the
   last round, the partition's removed keys); never the link set.
4. **Read back** (:class:`DropDecisions`, tokenize part ``p``): only part ``p``'s sorted
   removed keys, looked up per batch with ``searchsorted``.

The kept set is today's whatever the number of workers: the earliest document (smallest key)
of each connected component, components taken over the same links.

``bucket-QQQQQ.bin``::

    b"CRCBKT01"  u32 segments (bands + 1)  u32 0
    segments x (u64 byte offset, u64 rows)
    segment b < bands: rows of (band key, doc key) u64, sorted by (key, doc)
    segment bands:     rows of (hash hi, hash lo, doc key) u64, sorted (the exact hashes)

``round-RRR/part-PPPPP/to-JJJJJ.bin`` (an edge file)::

    b"CRCEDG01"  u32 1  u32 3   (u64 byte offset, u64 rows)
    rows of (graph, u, v) u64, sorted, no repeats: graph 0 = exact links, 1 = all links
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crucible.trainer.data import private_tmp
from crucible.trainer.data.minhash import cluster_roots

MAGIC = b"CRCBKT01"
_HEAD = struct.Struct("<8sII")
RUN_DOCS = 1 << 17  # documents buffered before a sorted run is spilled (~20 MB at 14 bands)
MERGE_BUDGET_ROWS = 1 << 19  # rows buffered over all runs being merged (~8-12 MB)
REASON_EXACT = 1
REASON_NEAR = 2
EDGE_MAGIC = b"CRCEDG01"
ROUND_RUN_ROWS = 1 << 19  # edge rows buffered before a sorted run is spilled (12 MB)
GRAPH_EXACT = 0  # the exact links alone
GRAPH_ALL = 1  # exact and near links
SMALL_STAR, LARGE_STAR = "small-star", "large-star"
DECISIONS = "decisions.npy"
DONE = "_DONE"
CLAIM = "_CLAIM"
CLAIM_STALE_SECONDS = 60.0  # a claimed partition not done after this long is computed by another worker
MAX_ROUNDS = 400  # far above O(log^2 n) for any corpus; a safeguard against a bug looping


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

    def __init__(self, path: Path, segments: int, magic: bytes = MAGIC, width: int = 0) -> None:
        self.path, self.tmp = path, _tmp(path)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.table = np.zeros((segments, 2), np.uint64)
        self.f.write(_HEAD.pack(magic, segments, width) + self.table.tobytes())
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


# -- 3. connected components over the link set, partitioned by document key ----------------------


class Owners:
    """Which partition owns a document key: the filter part whose key range holds it.

    ``ranges[p]`` is part ``p``'s ``(first, last)`` key (None for a part with no documents); the
    ranges are disjoint, so every document key has exactly one owner.
    """

    def __init__(self, ranges: list[tuple[int, int] | None]) -> None:
        self.count = len(ranges)
        present = [(int(r[0]), p) for p, r in enumerate(ranges) if r is not None]
        present.sort()
        self.starts = np.array([s for s, _ in present], np.uint64)
        self.parts = np.array([p for _, p in present] or [0], np.int64)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.starts):
            return np.zeros(len(keys), np.int64)
        i = np.searchsorted(self.starts, np.asarray(keys, np.uint64), side="right") - 1
        return self.parts[np.maximum(i, 0)]


def read_edge_file(path: Path) -> Segment:
    """The one segment of rows (graph, u, v) in an edge file (``to-JJJJJ.bin``)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise ValueError(f"{path}: truncated edge file header")
        magic, count, width = _HEAD.unpack(head)
        if magic != EDGE_MAGIC or count != 1:
            raise ValueError(f"{path}: not an edge file (magic {magic!r}, {count} segments)")
        off, rows = np.frombuffer(f.read(16), dtype=np.uint64)
    return Segment(path, int(off), int(rows), width)


def _count_le(buf: np.ndarray, row: np.ndarray) -> int:
    """How many rows of the sorted ``buf`` are <= ``row`` (lexicographically)."""
    lo, hi = 0, len(buf)
    for c in range(buf.shape[1]):
        col = buf[lo:hi, c]
        below = int(np.searchsorted(col, row[c], side="left"))
        upto = int(np.searchsorted(col, row[c], side="right"))
        if c == buf.shape[1] - 1:
            return lo + upto
        lo, hi = lo + below, lo + upto
        if lo == hi:
            break
    return lo


def merge_rows(segments: list[Segment], budget_rows: int = MERGE_BUDGET_ROWS) -> Iterator[np.ndarray]:
    """Sorted chunks (whole rows, lexicographic) of the union of sorted ``segments``.

    Unlike :func:`merge_segments` a group of equal first columns may be split between chunks,
    so memory is about ``budget_rows`` rows however large a group grows (a cluster's root
    ends up linked to every member).
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
        bufs[i] = segments[i].load(pos[i], stop)
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
        # Every unread row of an active run is >= its last buffered row: every buffered row up to
        # the smallest of those is final. The run holding it empties and is refilled.
        threshold = np.array(min(tuple(int(x) for x in bufs[i][-1]) for i in active), np.uint64)
        out = []
        for i, buf in enumerate(bufs):
            cut = _count_le(buf, threshold)
            if cut:
                out.append(buf[:cut])
                bufs[i] = buf[cut:]
        if out:
            yield _sorted_rows(np.concatenate(out))
        for i in active:
            if not len(bufs[i]):
                refill(i)


class RoutedRunWriter:
    """Rows (graph, u, v) addressed to ``destinations`` partitions, written as one sorted file
    without repeats per destination, ``directory/to-JJJJJ.bin`` (all of them, empty ones too).
    Every ``run_rows`` rows the buffer is sorted and spilled as one run per destination
    (``directory/.spill-…/``); :meth:`close` merges the runs. Memory: one run's rows."""

    def __init__(self, directory: Path, destinations: int, run_rows: int = ROUND_RUN_ROWS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.destinations, self.run_rows = destinations, run_rows
        self.spill = private_tmp(self.directory / "spill").with_suffix("")  # a folder: no .tmp suffix
        self.runs = 0
        self._rows: list[np.ndarray] = []
        self._dest: list[np.ndarray] = []
        self._buffered = 0
        self.written = 0

    def add(self, rows: np.ndarray, dest: np.ndarray) -> None:
        if not len(rows):
            return
        self._rows.append(np.asarray(rows, np.uint64))
        self._dest.append(np.asarray(dest, np.int64))
        self._buffered += len(rows)
        if self._buffered >= self.run_rows:
            self._write_run(self.spill / f"run-{self.runs:05d}")
            self.runs += 1

    def _write_run(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self._rows:
            rows = np.concatenate(self._rows)
            dest = np.concatenate(self._dest)
            order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0], dest))
            rows, dest = rows[order], dest[order]
            keep = np.ones(len(rows), bool)
            keep[1:] = (dest[1:] != dest[:-1]) | np.any(rows[1:] != rows[:-1], axis=1)
            rows, dest = rows[keep], dest[keep]
        else:
            rows, dest = np.zeros((0, 3), np.uint64), np.zeros(0, np.int64)
        bounds = np.searchsorted(dest, np.arange(self.destinations + 1))
        for j in range(self.destinations):
            _write_edges(directory / f"to-{j:05d}.bin", [rows[bounds[j] : bounds[j + 1]]])
        self._rows, self._dest, self._buffered = [], [], 0

    def close(self) -> int:
        """Write every ``to-JJJJJ.bin``; returns the rows written (repeats removed)."""
        if not self.runs:
            self._write_run(self.directory)
        else:
            if self._buffered:
                self._write_run(self.spill / f"run-{self.runs:05d}")
                self.runs += 1
            for j in range(self.destinations):
                name = f"to-{j:05d}.bin"
                runs = [read_edge_file(self.spill / f"run-{r:05d}" / name) for r in range(self.runs)]
                _write_edges(self.directory / name, _unique_chunks(merge_rows(runs)))
            shutil.rmtree(self.spill, ignore_errors=True)
        self.written = sum(read_edge_file(self.directory / f"to-{j:05d}.bin").rows for j in range(self.destinations))
        return self.written


def _write_edges(path: Path, chunks: Iterable[np.ndarray]) -> None:
    writer = _SegmentedWriter(path, 1, EDGE_MAGIC, width=3)
    writer.begin(0)
    for rows in chunks:
        writer.write(rows)
    writer.close()


def _unique_chunks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Sorted chunks without repeated rows (a repeat may straddle two chunks)."""
    last: np.ndarray | None = None
    for rows in chunks:
        if not len(rows):
            continue
        keep = np.ones(len(rows), bool)
        keep[1:] = np.any(rows[1:] != rows[:-1], axis=1)
        if last is not None:
            keep[0] = bool(np.any(rows[0] != last))
        last = rows[-1].copy()
        yield rows[keep]


def route_links(links: BucketLinks, owners: Owners, directory: Path, run_rows: int = ROUND_RUN_ROWS) -> int:
    """Round 0: a dedup worker's forests as edges (graph, member, root), root < member, each sent to
    the owner of its member (the orientation a small-star round reads)."""
    writer = RoutedRunWriter(directory, owners.count, run_rows)
    for graph, root, member in ((GRAPH_EXACT, links.exact_root, links.exact_member),
                                (GRAPH_ALL, links.all_root, links.all_member)):
        rows = np.stack([np.full(len(member), graph, np.uint64), member, root], axis=1)
        writer.add(rows, owners(member))
    return writer.close()


def round_kind(r: int) -> str:
    """Round 1, 3, 5 ... are small-star rounds, 2, 4, 6 ... large-star rounds (which test convergence)."""
    return SMALL_STAR if r % 2 else LARGE_STAR


def _groups(rows: np.ndarray, carry: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(new-group flag per row, index of the row's group start, rows of a group continued from the
    previous chunk) for sorted rows (graph, u, v) grouped by (graph, u)."""
    n = len(rows)
    new = np.ones(n, bool)
    new[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
    if carry is not None and int(rows[0, 0]) == carry[0] and int(rows[0, 1]) == carry[1]:
        new[0] = False
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    first_new = np.flatnonzero(new)
    continued = int(first_new[0]) if len(first_new) else n
    return new, start, continued


def cluster_round(r: int, inputs: list[Path], owners: Owners, directory: Path,
                  budget_rows: int = MERGE_BUDGET_ROWS, run_rows: int = ROUND_RUN_ROWS) -> dict[str, Any]:
    """One partition's part of round ``r`` of the alternating star contraction (Kiveris et al.,
    "Connected Components in MapReduce and Beyond", 2014), over the edges sent to it.

    Edges are rows (graph, u, v): graph 0 is the exact links, graph 1 all links; a partition
    holds the rows whose ``u`` it owns, sorted. A **small-star** round reads each edge once, at
    its larger end (u > v): with m the smallest of u's smaller neighbours, every such neighbour
    and u itself is linked to m. A **large-star** round reads each edge at both ends: with m the
    smallest of u and its neighbours, every neighbour larger than u is linked to m. Neither adds
    edges nor changes the components; alternated, they turn every component into a star around
    its smallest key. The input of a large-star round is a star forest exactly when no node has
    a smaller neighbour and another neighbour besides: then every node with a smaller neighbour
    is removed, its neighbour being its component's smallest key, and the partition writes its
    drop decisions (``decisions.npy``, rows (key, reason), sorted).
    """
    kind = round_kind(r)
    writer = RoutedRunWriter(directory, owners.count, run_rows)
    carry: tuple[int, int] | None = None
    carry_m = 0
    carry_lower = False
    star = True
    rows_in = 0
    removed: list[np.ndarray] = []
    exact: list[np.ndarray] = []
    for rows in _unique_chunks(merge_rows([read_edge_file(p) for p in inputs], budget_rows)):
        rows_in += len(rows)
        g, u, v = rows[:, 0], rows[:, 1], rows[:, 2]
        new, start, continued = _groups(rows, carry)
        if kind == SMALL_STAR:
            # every v < u; the group's first row holds m = its smallest v
            m = v[start]
            m[:continued] = carry_m
            x = np.where(new, u, v)  # the first row links u to m, the others link v to m
            out = np.concatenate([np.stack([g, x, m], 1), np.stack([g, m, x], 1)])
            writer.add(out, owners(out[:, 1]))
        else:
            lower_first = new & (v < u)
            lower = lower_first[start]
            lower[:continued] = carry_lower
            m = np.where(lower, v[start], u[start])
            m[:continued] = carry_m
            if star and bool(np.any(~new & lower)):
                star = False  # u has a smaller neighbour and another one
            up = v > u
            out = np.stack([g[up], v[up], m[up]], 1)
            writer.add(out, owners(out[:, 1]))
            carry_lower = bool(lower[-1])
            if star:
                exact.append(u[lower_first & (g == GRAPH_EXACT)])
                removed.append(u[lower_first & (g == GRAPH_ALL)])
        carry, carry_m = (int(g[-1]), int(u[-1])), int(m[-1])
    summary: dict[str, Any] = {"round": r, "kind": kind, "rowsIn": rows_in, "rowsOut": writer.close()}
    if kind == LARGE_STAR:
        summary["star"] = star
        if star:
            gone = np.concatenate(removed) if removed else np.zeros(0, np.uint64)
            same = np.concatenate(exact) if exact else np.zeros(0, np.uint64)
            reasons = np.where(np.isin(gone, same, assume_unique=True), REASON_EXACT, REASON_NEAR).astype(np.uint64)
            save_decisions(directory / DECISIONS, np.stack([gone, reasons], axis=1))
            summary["removed"], summary["exact"] = len(gone), int((reasons == REASON_EXACT).sum())
    return summary


class ClusterFiles(Protocol):
    """Where the rounds live: :class:`crucible.trainer.data.pipeline.workspace.Workspace` or :class:`LocalFiles`."""

    def path(self, rel: str) -> Path: ...
    def publish(self, rel: str) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def fetch(self, rel: str) -> Path: ...
    def write_json(self, rel: str, data: Any) -> Any: ...
    def read_json(self, rel: str) -> Any: ...


class LocalFiles:
    """:class:`ClusterFiles` on a local folder (tests, the benchmark)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self, rel: str) -> None:
        pass

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def fetch(self, rel: str) -> Path:
        return self.root / rel

    def write_json(self, rel: str, data: Any) -> None:
        p = self.path(rel)
        tmp = _tmp(p)
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, p)

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())


def round_dir(prefix: str, r: int, part: int) -> str:
    return f"{prefix}/round-{r:03d}/part-{part:05d}"


def publish_round(files: ClusterFiles, prefix: str, r: int, part: int, destinations: int,
                  summary: dict[str, Any]) -> None:
    """Upload one partition's round output and mark it done (the marker last)."""
    rel = round_dir(prefix, r, part)
    for j in range(destinations):
        files.publish(f"{rel}/to-{j:05d}.bin")
    if summary.get("star"):
        files.publish(f"{rel}/{DECISIONS}")
    files.write_json(f"{rel}/{DONE}", summary)


def run_round(files: ClusterFiles, prefix: str, r: int, part: int, owners: Owners,
              budget_rows: int = MERGE_BUDGET_ROWS, run_rows: int = ROUND_RUN_ROWS) -> dict[str, Any]:
    """Partition ``part``'s share of round ``r`` (round ``r - 1`` complete), published."""
    inputs = [files.fetch(f"{round_dir(prefix, r - 1, p)}/to-{part:05d}.bin") for p in range(owners.count)]
    rel = round_dir(prefix, r, part)
    summary = cluster_round(r, inputs, owners, files.path(f"{rel}/{DONE}").parent, budget_rows, run_rows)
    publish_round(files, prefix, r, part, owners.count, summary)
    return summary


def _claim_live(files: ClusterFiles, rel: str, stale: float) -> bool:
    """A claim younger than ``stale`` seconds whose process, when on this host, still runs."""
    try:
        claim = files.read_json(rel)
        age = time.time() - float(claim["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return True  # being written: count it
    if age >= stale:
        return False
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return False  # killed here: a rerun on this host takes it over at once
        except (PermissionError, ValueError, KeyError):
            pass
    return True


def cluster_rounds(files: ClusterFiles, prefix: str, owners: Owners, me: int = 0, *,
                   budget_rows: int = MERGE_BUDGET_ROWS, run_rows: int = ROUND_RUN_ROWS,
                   stale_seconds: float = CLAIM_STALE_SECONDS, poll_seconds: float = 0.2,
                   max_rounds: int = MAX_ROUNDS) -> dict[str, Any]:
    """Every round until the large-star input is a star forest everywhere; returns ``prefix/_DONE``
    ({"round", "removed", "exact"}: the drop decisions are ``round_dir(prefix, round, p)/decisions.npy``).

    Round 0 (every partition's ``to-*.bin``, from :func:`route_links`) must be complete. Worker
    ``me`` computes its own partition of each round, then every partition nobody has claimed (or
    whose claim is older than ``stale_seconds``, its worker presumably gone), then waits for the
    rest: workers running at once share the rounds, a worker alone does them all, one partition
    at a time. Each partition's output is a function of the round before, so two workers
    computing one write the same bytes.
    """
    done_rel = f"{prefix}/{DONE}"
    r = 1
    stale = stale_seconds
    while True:
        if files.exists(done_rel):
            result: dict[str, Any] = files.read_json(done_rel)
            return result
        if r > max_rounds:
            raise RuntimeError(f"dedup clustering did not converge in {max_rounds} rounds")
        order = [me] + [j for j in range(owners.count) if j != me]
        pending = list(order)
        while pending:
            progressed = False
            for j in list(pending):
                rel = round_dir(prefix, r, j)
                if files.exists(f"{rel}/{DONE}"):
                    pending.remove(j)
                    continue
                if j != me and files.exists(f"{rel}/{CLAIM}") and _claim_live(files, f"{rel}/{CLAIM}", stale):
                    continue
                files.write_json(f"{rel}/{CLAIM}", {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
                started = time.perf_counter()
                run_round(files, prefix, r, j, owners, budget_rows, run_rows)
                stale = max(stale, 4 * (time.perf_counter() - started))
                pending.remove(j)
                progressed = True
            if pending and not progressed:
                time.sleep(poll_seconds)
        if round_kind(r) == LARGE_STAR:
            summaries = [files.read_json(f"{round_dir(prefix, r, j)}/{DONE}") for j in range(owners.count)]
            if all(s["star"] for s in summaries):
                result = {"round": r, "removed": sum(s["removed"] for s in summaries),
                          "exact": sum(s["exact"] for s in summaries)}
                files.write_json(done_rel, result)
                return result
        r += 1


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
