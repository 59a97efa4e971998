"""MinHash signatures, LSH buckets and the union-find that picks the kept document."""

from __future__ import annotations

import random

import numpy as np
import pytest

from crucible.trainer.config.data import MinHashConfig
from crucible.trainer.data.minhash import MinHasher, bucket_pairs, exact_pairs, removed_by_clusters
from crucible.trainer.data.synthetic import english_document, jaccard, near_duplicate


def _removed(texts: list[str], config: MinHashConfig | None = None) -> set[int]:
    hasher = MinHasher(config or MinHashConfig())
    keys, present = hasher.band_keys(texts)
    doc_keys = np.arange(len(texts), dtype=np.uint64)
    a_parts, b_parts = [], []
    for band in range(keys.shape[1]):
        a, b = bucket_pairs(keys[present, band], doc_keys[present])
        a_parts.append(a)
        b_parts.append(b)
    return set(removed_by_clusters(np.concatenate(a_parts), np.concatenate(b_parts)).tolist())


def test_near_duplicates_found_and_distinct_documents_kept() -> None:
    rng = random.Random(3)
    originals = [english_document(rng, (20, 30)) for _ in range(60)]
    close = [near_duplicate(rng, t, 0.95) for t in originals[:20]]
    far = [near_duplicate(rng, t, 0.3) for t in originals[20:40]]
    assert all(jaccard(c, o) > 0.85 for c, o in zip(close, originals[:20], strict=True))
    removed = _removed(originals + close + far)
    assert set(range(60, 80)) <= removed  # every close copy, never its original
    assert not removed & set(range(60))
    assert not removed & set(range(80, 100))


def test_signatures_independent_of_batching_and_position() -> None:
    rng = random.Random(4)
    texts = [english_document(rng) for _ in range(30)] + ["one two", "", "!!! ???"]
    hasher = MinHasher(MinHashConfig())
    whole, present = hasher.band_keys(texts)
    parts = [hasher.band_keys(texts[i : i + 7])[0] for i in range(0, len(texts), 7)]
    assert np.array_equal(whole, np.concatenate(parts))
    assert present.tolist() == [True] * 31 + [False, False]  # no words: no signature
    reversed_keys, _ = hasher.band_keys(texts[::-1])
    assert np.array_equal(reversed_keys[::-1], whole)


def test_text_is_simplified_before_shingling() -> None:
    hasher = MinHasher(MinHashConfig())
    text = english_document(random.Random(5))
    keys, _ = hasher.band_keys([text, text.upper().replace(".", " . ").replace("\n", "  ")])
    assert np.array_equal(keys[0], keys[1])


def test_seed_and_shape_follow_the_config() -> None:
    texts = [english_document(random.Random(6))]
    a, _ = MinHasher(MinHashConfig(seed=1)).band_keys(texts)
    b, _ = MinHasher(MinHashConfig(seed=2)).band_keys(texts)
    c, _ = MinHasher(MinHashConfig(bands=20, rows=5)).band_keys(texts)
    assert a.shape == (1, 14) and c.shape == (1, 20)
    assert not np.array_equal(a, b)


def test_short_documents_are_one_shingle() -> None:
    removed = _removed(["alpha beta gamma", "alpha beta gamma", "alpha beta delta"])
    assert removed == {1}


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], set()),
        ([(0, 1)], {1}),
        ([(1, 2), (0, 1)], {1, 2}),  # a chain collapses to its smallest key
        ([(5, 9), (3, 9), (7, 8)], {5, 9, 8}),
        ([(2, 3), (0, 4), (3, 4)], {2, 3, 4}),
    ],
)
def test_union_find_keeps_smallest_key(pairs: list[tuple[int, int]], expected: set[int]) -> None:
    a = np.array([p[0] for p in pairs], dtype=np.uint64)
    b = np.array([p[1] for p in pairs], dtype=np.uint64)
    assert set(removed_by_clusters(a, b).tolist()) == expected


def test_bucket_and_exact_pairs_link_to_smallest_member() -> None:
    keys = np.array([7, 3, 7, 7, 3, 1], dtype=np.uint64)
    docs = np.array([50, 40, 10, 30, 20, 60], dtype=np.uint64)
    a, b = bucket_pairs(keys, docs)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(10, 30), (10, 50), (20, 40)]
    hashes = np.array([[1, 2], [1, 3], [1, 2]], dtype=np.uint64)
    a, b = exact_pairs(hashes, np.array([9, 8, 7], dtype=np.uint64))
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(7, 9)]
