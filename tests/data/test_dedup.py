"""Bounded-memory dedup: sorted runs per bucket, block merge, forests, drop decisions per part."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from crucible.trainer.data.dedup import (
    DECISIONS,
    REASON_EXACT,
    REASON_NEAR,
    BucketRunWriter,
    DropDecisions,
    LocalFiles,
    Owners,
    Segment,
    _claim_live,
    cluster_rounds,
    link_bucket,
    merge_rows,
    merge_segments,
    round_dir,
    route_links,
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


def round_zero(tmp: Path, doc_keys: np.ndarray, keys: np.ndarray, present: np.ndarray, hashes: np.ndarray,
               parts: int, run_docs: int, budget: int) -> tuple[Owners, np.ndarray]:
    """The filter and dedup sides for ``parts`` workers: round 0 of the clustering under ``tmp/cluster``."""
    bands = keys.shape[1]
    bounds = np.linspace(0, len(doc_keys), parts + 1).astype(int)
    for p in range(parts):
        w = BucketRunWriter(tmp / f"part-{p}", parts, bands, exact=True, run_docs=run_docs)
        for s in range(bounds[p], bounds[p + 1], 97):  # odd batches
            e = min(s + 97, bounds[p + 1])
            w.add(doc_keys[s:e], keys[s:e], present[s:e], hashes[s:e])
        w.close()
        assert not list((tmp / f"part-{p}").glob(".spill-*")), "spilled runs are removed after the merge"
    ranges: list[tuple[int, int] | None] = [
        (int(doc_keys[bounds[p]]), int(doc_keys[bounds[p + 1] - 1])) if bounds[p + 1] > bounds[p] else None
        for p in range(parts)]
    owners = Owners(ranges)
    for q in range(parts):
        links = link_bucket([tmp / f"part-{p}" / f"bucket-{q:05d}.bin" for p in range(parts)], bands, budget)
        route_links(links, owners, LocalFiles(tmp).path(f"{round_dir('cluster', 0, q)}/x").parent, run_rows=budget)
    return owners, bounds


def streamed(tmp: Path, doc_keys: np.ndarray, keys: np.ndarray, present: np.ndarray, hashes: np.ndarray,
             parts: int, run_docs: int, budget: int) -> tuple[set[int], set[int]]:
    owners, bounds = round_zero(tmp, doc_keys, keys, present, hashes, parts, run_docs, budget)
    files = LocalFiles(tmp)
    # worker 0 alone computes every partition of every round, one at a time, with tiny buffers
    result = cluster_rounds(files, "cluster", owners, me=min(1, parts - 1), budget_rows=budget, run_rows=budget)
    exact: set[int] = set()
    near: set[int] = set()
    for p in range(parts):
        decisions = DropDecisions(tmp / round_dir("cluster", result["round"], p) / DECISIONS)
        codes = decisions.reasons(doc_keys[bounds[p] : bounds[p + 1]])
        part_keys = doc_keys[bounds[p] : bounds[p + 1]]
        exact |= set(part_keys[codes == REASON_EXACT].tolist())
        near |= set(part_keys[codes == REASON_NEAR].tolist())
    assert result["removed"] == len(exact) + len(near) and result["exact"] == len(exact)
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


def chained(n: int, bands: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Adversarial components: long paths whose consecutive documents lie in different parts and
    whose keys zigzag or are shuffled (label propagation would need their length in rounds), a
    star of 300 near copies of one document, and an exact-copy chain bridged by near links."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**63, size=(n, bands), dtype=np.uint64)
    hashes = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    idx = np.arange(n)
    zigzag = np.ravel(np.stack([idx[: n // 4], idx[::-1][: n // 4]], 1))[: n // 3]  # 0, n-1, 1, n-2, ...
    rest = np.setdiff1d(idx, zigzag)
    shuffled = rng.permutation(rest)[: n // 3]
    for path in (zigzag, shuffled):
        for i, (a, b) in enumerate(itertools.pairwise(path)):
            keys[b, i % bands] = keys[a, i % bands]  # a and b share one band; b's next link uses another
    others = np.setdiff1d(rest, shuffled)
    hub, spokes = others[0], others[1:301]
    keys[spokes, bands - 1] = keys[hub, bands - 1]
    tail = others[301:341]
    hashes[tail[::2]] = hashes[tail[0]]  # exact copies, joined to the rest only by near links
    keys[tail[1::2], 0] = keys[tail[::2], 0]
    present = np.ones(n, bool)
    doc_keys = (idx.astype(np.uint64) // np.uint64(1000) << np.uint64(32)) | (idx.astype(np.uint64) % np.uint64(1000))
    return doc_keys, keys, present, hashes


@pytest.mark.parametrize("parts", [1, 2, 5, 8])
def test_adversarial_chains_across_partitions_keep_the_earliest_document(tmp_path: Path, parts: int) -> None:
    data = chained(3000, 4, seed=parts)
    exact, near = in_memory(*data)
    assert len(near) > 1900  # the two paths (999 removed each) and the star
    assert streamed(tmp_path, *data, parts=parts, run_docs=400, budget=256) == (exact, near)


def test_row_merge_splits_large_groups_and_sorts_the_union(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    segments, everything = [], []
    for i in range(4):
        rows = np.stack([rng.integers(0, 2, 900), np.full(900, 7), rng.integers(0, 10**6, 900)], 1).astype(np.uint64)
        rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
        path = tmp_path / f"e{i}.bin"
        path.write_bytes(b"x" * 24 + rows.tobytes())
        segments.append(Segment(path, 24, len(rows), 3))
        everything.append(rows)
    chunks = list(merge_rows(segments, budget_rows=256))
    merged = np.concatenate(chunks)
    assert max(len(c) for c in chunks) <= 4 * 256 < int((merged[:, 0] == 0).sum())  # the (0, 7) group is split
    ref = np.concatenate(everything)
    assert np.array_equal(merged, ref[np.lexsort((ref[:, 2], ref[:, 1], ref[:, 0]))])


def decisions_of(root: Path, parts: int) -> tuple[bytes, ...]:
    final = json.loads((root / "cluster" / "_DONE").read_text())["round"]
    return tuple((root / round_dir("cluster", final, p) / DECISIONS).read_bytes() for p in range(parts))


@pytest.fixture(scope="module")
def four_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Owners, tuple[bytes, ...]]:
    """Round 0 of the adversarial corpus on 4 parts, and the decisions of one worker doing every round."""
    root = tmp_path_factory.mktemp("four")
    owners, _ = round_zero(root / "zero", *chained(3000, 4, seed=3), parts=4, run_docs=400, budget=256)
    shutil.copytree(root / "zero", root / "alone")
    cluster_rounds(LocalFiles(root / "alone"), "cluster", owners, 0, budget_rows=256, run_rows=256)
    return root, owners, decisions_of(root / "alone", 4)


def test_workers_running_at_once_share_the_rounds_and_agree(
    tmp_path: Path, four_parts: tuple[Path, Owners, tuple[bytes, ...]]
) -> None:
    root, owners, alone = four_parts
    shutil.copytree(root / "zero", tmp_path / "w")
    results: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda me=me: results.append(cluster_rounds(
        LocalFiles(tmp_path / "w"), "cluster", owners, me, budget_rows=256, run_rows=256, poll_seconds=0.01)))
        for me in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert decisions_of(tmp_path / "w", 4) == alone


def test_sigkill_inside_the_rounds_then_rerun_is_byte_identical(
    tmp_path: Path, four_parts: tuple[Path, Owners, tuple[bytes, ...]]
) -> None:
    root, owners, alone = four_parts
    work = tmp_path / "k"
    shutil.copytree(root / "zero", work)
    ranges = [(int(s), 0) for s in owners.starts]
    code = ("import sys; from pathlib import Path; from crucible.trainer.data.dedup import *; "
            f"cluster_rounds(LocalFiles(Path({str(work)!r})), 'cluster', Owners({ranges!r}), 0, "
            "budget_rows=256, run_rows=256)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while not (work / "cluster" / "round-005").exists() and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, "the rounds finished before they could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (work / "cluster" / "_DONE").exists()
    claims = [c.relative_to(work).as_posix() for c in (work / "cluster").rglob("_CLAIM")]
    assert claims and not any(_claim_live(LocalFiles(work), c, 3600) for c in claims)  # a dead worker's are not waited for
    cluster_rounds(LocalFiles(work), "cluster", owners, 1, budget_rows=256, run_rows=256)
    assert decisions_of(work, 4) == alone
