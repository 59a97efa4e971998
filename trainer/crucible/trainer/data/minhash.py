"""MinHash signatures, LSH band keys and clustering, vectorized with numpy.

Shingles are word ``ngram``-grams of the simplified text (lowercase, datatrove's punctuation
set turned into spaces, whitespace collapsed). Words are hashed for a whole batch at once with
a polynomial hash over the UTF-8 bytes (prefix sums in wrapping uint64 arithmetic, using the
inverse of the odd base), shingles combine word hashes, and the ``bands × rows`` permutations
are multiply-add-shift hashes evaluated as one (shingles × permutations) matrix per block,
reduced per document with ``np.minimum.reduceat``. Nothing is done per word in Python.

A document with fewer than ``ngram`` words has one shingle: all of its words. A document
with no words has no signature and is never a near duplicate.

Clustering: documents sharing a band key are candidate duplicates; every member of a bucket
is linked to the bucket's smallest document key, and a union-find (hook to the smaller root,
then pointer jumping) joins links across bands. Each cluster keeps its smallest key, so the
kept document is the earliest in input order whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crucible.trainer.config.data import MinHashConfig
from crucible.trainer.data.text import PUNCTUATION

_MASK64 = (1 << 64) - 1
_PUNCT_TO_SPACE = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)
BLOCK_SHINGLES = 4096  # (4096, 112) uint64 stays in cache


def splitmix64(state: int, count: int) -> np.ndarray:
    """``count`` reproducible 64-bit values from ``state`` (independent of numpy's RNG streams)."""
    out = np.empty(count, dtype=np.uint64)
    for i in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out[i] = z ^ (z >> 31)
    return out


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (wrapping uint64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def simplify(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TO_SPACE).split())


class _Powers:
    """Growing tables of BASE**k and BASE**-k modulo 2**64."""

    def __init__(self) -> None:
        self.pos = np.ones(1, dtype=np.uint64)
        self.neg = np.ones(1, dtype=np.uint64)

    def ensure(self, n: int) -> None:
        if len(self.pos) >= n:
            return
        size = max(n, 2 * len(self.pos))
        with np.errstate(over="ignore"):
            self.pos = np.cumprod(np.full(size, _BASE, dtype=np.uint64), dtype=np.uint64)
            self.pos = np.concatenate([np.ones(1, np.uint64), self.pos[:-1]])
            self.neg = np.cumprod(np.full(size, _BASE_INV, dtype=np.uint64), dtype=np.uint64)
            self.neg = np.concatenate([np.ones(1, np.uint64), self.neg[:-1]])


class MinHasher:
    def __init__(self, config: MinHashConfig) -> None:
        self.ngram = config.ngram
        self.bands = config.bands
        self.rows = config.rows
        perms = config.bands * config.rows
        seeds = splitmix64(config.seed * 0x2545F4914F6CDD1D + 1, 2 * perms + config.rows)
        self.mult = seeds[:perms] | np.uint64(1)  # (P,) odd multipliers
        self.add = seeds[perms : 2 * perms]  # (P,)
        self.row_mult = seeds[2 * perms :] | np.uint64(1)  # (R,)
        self._powers = _Powers()

    # -- words and shingles ------------------------------------------------------------------

    def _word_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash of every word (W,), document index of every word (W,)) for a batch."""
        joined = "\n".join(simplify(t) for t in texts).encode("utf-8")
        buf = np.frombuffer(joined, dtype=np.uint8)
        n = len(buf)
        if n == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        sep = (buf == 32) | (buf == 10)
        prev_sep = np.concatenate([[True], sep[:-1]])
        next_sep = np.concatenate([sep[1:], [True]])
        starts = np.flatnonzero(~sep & prev_sep)  # (W,)
        ends = np.flatnonzero(~sep & next_sep) + 1  # (W,) exclusive
        self._powers.ensure(n + 1)
        with np.errstate(over="ignore"):
            weighted = (buf.astype(np.uint64) + np.uint64(1)) * self._powers.neg[:n]
            prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(weighted, dtype=np.uint64)])
            # sum_{k=s}^{e-1} b_k BASE^(e-1-k) = (prefix[e] - prefix[s]) * BASE^(e-1)
            words = (prefix[ends] - prefix[starts]) * self._powers.pos[ends - 1]
            words = mix64(words ^ (ends - starts).astype(np.uint64))
        newlines = np.flatnonzero(buf == 10)
        return words, np.searchsorted(newlines, starts).astype(np.int64)

    def _shingles(self, words: np.ndarray, doc_of_word: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes (S,), document index of each (S,)), grouped by document in order."""
        n = self.ngram
        w = len(words)
        counts = np.bincount(doc_of_word, minlength=n_docs)
        with np.errstate(over="ignore"):
            if w >= n:
                valid = doc_of_word[: w - n + 1] == doc_of_word[n - 1 :]
                acc = words[: w - n + 1].copy()
                for k in range(1, n):
                    acc = acc * _SHINGLE_MULT + words[k : w - n + 1 + k]
                shingles, owners = mix64(acc[valid]), doc_of_word[: w - n + 1][valid]
            else:
                shingles, owners = np.zeros(0, np.uint64), np.zeros(0, np.int64)
            short = np.flatnonzero((counts > 0) & (counts < n))
            if len(short):
                first = np.concatenate([[0], np.cumsum(counts)])[short]
                extra = np.empty(len(short), dtype=np.uint64)
                for j, (d, start) in enumerate(zip(short, first, strict=True)):
                    acc1 = np.uint64(0)
                    for k in range(counts[d]):
                        acc1 = acc1 * _SHINGLE_MULT + words[start + k]
                    extra[j] = acc1
                shingles = np.concatenate([shingles, mix64(extra)])
                owners = np.concatenate([owners, short])
                order = np.argsort(owners, kind="stable")
                shingles, owners = shingles[order], owners[order]
        return shingles, owners

    # -- signatures -------------------------------------------------------------------------

    def band_keys(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(band keys (D, bands) uint64, has-signature mask (D,)) for a batch of texts."""
        n_docs = len(texts)
        keys = np.zeros((n_docs, self.bands), dtype=np.uint64)
        words, doc_of_word = self._word_hashes(texts)
        shingles, owners = self._shingles(words, doc_of_word, n_docs)
        has_sig = np.zeros(n_docs, dtype=bool)
        if len(shingles) == 0:
            return keys, has_sig
        docs_present, first_idx = np.unique(owners, return_index=True)
        has_sig[docs_present] = True
        bounds = np.concatenate([first_idx, [len(shingles)]])
        sig = np.empty((len(docs_present), len(self.mult)), dtype=np.uint32)  # (D', P)
        d0 = 0
        while d0 < len(docs_present):
            # as many whole documents as fit a block of shingles (at least one)
            limit = bounds[d0] + BLOCK_SHINGLES
            d1 = max(d0 + 1, int(np.searchsorted(bounds, limit, side="right")) - 1)
            d1 = min(d1, len(docs_present))
            block = shingles[bounds[d0] : bounds[d1]]
            with np.errstate(over="ignore"):
                hashed = np.multiply.outer(block, self.mult)  # (S, P)
                hashed += self.add
                hashed >>= np.uint64(32)
            sig[d0:d1] = np.minimum.reduceat(hashed, bounds[d0:d1] - bounds[d0], axis=0).astype(np.uint32)
            d0 = d1
        banded = sig.reshape(len(docs_present), self.bands, self.rows).astype(np.uint64)  # (D', B, R)
        with np.errstate(over="ignore"):
            combined = (banded * self.row_mult[None, None, :]).sum(axis=2, dtype=np.uint64)  # (D', B)
            combined = mix64(combined + np.arange(self.bands, dtype=np.uint64)[None, :])
        keys[docs_present] = combined
        return keys, has_sig


# -- clustering ----------------------------------------------------------------------------


def bucket_pairs(keys: np.ndarray, doc_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Links (smallest doc key of the bucket, other member) for every bucket with >1 member."""
    if len(keys) < 2:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    order = np.lexsort((doc_keys, keys))
    k, g = keys[order], doc_keys[order]
    new_bucket = np.concatenate([[True], k[1:] != k[:-1]])
    first = np.maximum.accumulate(np.where(new_bucket, np.arange(len(k)), 0))
    member = ~new_bucket
    return g[first[member]], g[member]


def exact_pairs(hashes: np.ndarray, doc_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`bucket_pairs` for (N, 2) uint64 128-bit hashes."""
    if len(hashes) < 2:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    order = np.lexsort((doc_keys, hashes[:, 1], hashes[:, 0]))
    h, g = hashes[order], doc_keys[order]
    new_bucket = np.concatenate([[True], np.any(h[1:] != h[:-1], axis=1)])
    first = np.maximum.accumulate(np.where(new_bucket, np.arange(len(h)), 0))
    member = ~new_bucket
    return g[first[member]], g[member]


def cluster_roots(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every linked doc key, sorted; the smallest key of its connected component)."""
    if len(a) == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    nodes = np.unique(np.concatenate([a, b]))
    ia = np.searchsorted(nodes, a)
    ib = np.searchsorted(nodes, b)
    parent = np.arange(len(nodes))
    while True:
        # hook every edge's larger root under its smaller one, then jump pointers to the roots
        ra, rb = parent[ia], parent[ib]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        if np.array_equal(lo, hi):
            break
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return nodes, nodes[parent]


def removed_by_clusters(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Doc keys that are not the smallest key of their connected component (sorted)."""
    nodes, roots = cluster_roots(a, b)
    return nodes[nodes != roots]
