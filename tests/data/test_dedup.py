"""Bounded-memory dedup: sorted runs per bucket, block merge, forests, drop decisions per part."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from crucible.trainer.data.dedup import (
    REASON_EXACT,
    REASON_NEAR,
    BucketRunWriter,
    DropDecisions,
    Segment,
    cluster,
    link_bucket,
    merge_segments,
    save_decisions,
    save_links,
    split_decisions,
)
from crucible.trainer.data.minhash import bucket_pairs, exact_pairs, removed_by_clusters


def planted(n: int, bands: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Doc keys, band keys (n, bands), has-signature and exact hashes with planted duplicates."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**63, size=(n, bands), dtype=np.uint64)
    hashes = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    # near copies share some bands with an earlier document; exact copies share the hash
    src = rng.integers(0, n, size=n // 4)
    dst = rng.integers(0, n, size=n // 4)
    for s, d in zip(src, dst, strict=True):
        shared = rng.random(bands) < 0.5
        keys[d, shared] = keys[s, shared]
    ex_src, ex_dst = rng.integers(0, n, size=n // 10), rng.integers(0, n, size=n // 10)
    hashes[ex_dst] = hashes[ex_src]
    hashes[rng.integers(0, n, size=n // 50), 1] ^= np.uint64(1)  # same high word, different low word
    present = rng.random(n) > 0.02
    doc_keys = (np.arange(n, dtype=np.uint64) // np.uint64(1000) << np.uint64(32)) | (np.arange(n, dtype=np.uint64) % np.uint64(1000))
    return doc_keys, keys, present, hashes


def in_memory(doc_keys: np.ndarray, keys: np.ndarray, present: np.ndarray, hashes: np.ndarray) -> tuple[set[int], set[int]]:
    """What the pipeline did before: whole columns in memory (the reference)."""
    ea, eb = exact_pairs(hashes, doc_keys)
    na, nb = [], []
    for band in range(keys.shape[1]):
        a, b = bucket_pairs(keys[present, band], doc_keys[present])
        na.append(a)
        nb.append(b)
    exact = set(removed_by_clusters(ea, eb).tolist())
    every = set(removed_by_clusters(np.concatenate([ea, *na]), np.concatenate([eb, *nb])).tolist())
    return exact, every - exact


def streamed(tmp: Path, doc_keys: np.ndarray, keys: np.ndarray, present: np.ndarray, hashes: np.ndarray,
             parts: int, run_docs: int, budget: int) -> tuple[set[int], set[int]]:
    bands = keys.shape[1]
    bounds = np.linspace(0, len(doc_keys), parts + 1).astype(int)
    for p in range(parts):
        w = BucketRunWriter(tmp / f"part-{p}", parts, bands, exact=True, run_docs=run_docs)
        for s in range(bounds[p], bounds[p + 1], 97):  # odd batches
            e = min(s + 97, bounds[p + 1])
            w.add(doc_keys[s:e], keys[s:e], present[s:e], hashes[s:e])
        w.close()
        assert not list((tmp / f"part-{p}").glob(".spill-*")), "spilled runs are removed after the merge"
    for q in range(parts):
        links = link_bucket([tmp / f"part-{p}" / f"bucket-{q:05d}.bin" for p in range(parts)], bands, budget)
        save_links(tmp / f"links-{q}.npz", links)
    removed, reasons = cluster([tmp / f"links-{q}.npz" for q in range(parts)])
    ranges = [(int(doc_keys[bounds[p]]), int(doc_keys[bounds[p + 1] - 1])) for p in range(parts)]
    exact: set[int] = set()
    near: set[int] = set()
    for p, rows in enumerate(split_decisions(removed, reasons, ranges)):
        save_decisions(tmp / f"removed-{p}.npy", rows)
        decisions = DropDecisions(tmp / f"removed-{p}.npy")
        codes = decisions.reasons(doc_keys[bounds[p] : bounds[p + 1]])
        part_keys = doc_keys[bounds[p] : bounds[p + 1]]
        exact |= set(part_keys[codes == REASON_EXACT].tolist())
        near |= set(part_keys[codes == REASON_NEAR].tolist())
    return exact, near


@pytest.mark.parametrize(("parts", "run_docs", "budget"), [(1, 1 << 17, 1 << 19), (3, 500, 300), (7, 211, 256)])
def test_kept_set_equals_the_in_memory_clustering_for_any_worker_count(
    tmp_path: Path, parts: int, run_docs: int, budget: int
) -> None:
    data = planted(4000, 6, seed=parts)
    exact, near = in_memory(*data)
    assert len(exact) > 100 and len(near) > 300
    assert streamed(tmp_path, *data, parts=parts, run_docs=run_docs, budget=budget) == (exact, near)


def test_block_merge_never_splits_a_group_and_sorts_the_union(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    segments = []
    everything = []
    for i in range(5):
        rows = np.stack([rng.integers(0, 50, 700).astype(np.uint64), rng.integers(0, 10**6, 700).astype(np.uint64)], 1)
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        path = tmp_path / f"s{i}.bin"
        path.write_bytes(b"x" * 24 + rows.tobytes())
        segments.append(Segment(path, 24, len(rows), 2))
        everything.append(rows)
    chunks = list(merge_segments(segments, budget_rows=256))
    assert len(chunks) > 3
    merged = np.concatenate(chunks)
    ref = np.concatenate(everything)
    assert np.array_equal(merged, ref[np.lexsort((ref[:, 1], ref[:, 0]))])
    for a, b in itertools.pairwise(chunks):
        assert a[-1, 0] < b[0, 0]  # a key group lives in one chunk


def test_bucket_files_are_byte_identical_across_runs_and_spills(tmp_path: Path) -> None:
    doc_keys, keys, present, hashes = planted(1500, 4, seed=9)
    outs = []
    for name, run_docs in (("a", 10**6), ("b", 10**6), ("c", 128)):
        w = BucketRunWriter(tmp_path / name, 3, 4, exact=True, run_docs=run_docs)
        w.add(doc_keys, keys, present, hashes)
        outs.append([(tmp_path / name / n).read_bytes() for n in w.close()])
    assert outs[0] == outs[1] == outs[2]
