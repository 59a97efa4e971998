"""Gopher repetition rules (Rae et al. 2021, table A1), with datatrove's semantics and defaults.

Duplicated paragraphs and lines (by count and by characters), the character share of the
most frequent 2/3/4-gram, and the character share of duplicated 5..10-grams.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter

import numpy as np

from crucible.trainer.config.data import GopherRepetition
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import KEEP, Filter
from crucible.trainer.data.text import WordSplitter, word_splitter

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them), first occurrences not counted."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_chars += len(item)
            dup_items += 1
        else:
            seen.add(item)
    return dup_items, dup_chars


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent space-joined n-gram (0 without n-grams)."""
    if len(words) < n:
        return 0
    counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = max(counts.items(), key=lambda kv: kv[1])  # first maximum, as most_common(1)
    return len(gram) * count


def duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters in repeated n-grams, skipping past each repeat (datatrove's find_all_duplicate)."""
    n_words = len(words)
    seen: set[str] = set()
    repeated = idx = 0
    while idx < n_words - n + 1:
        gram = "".join(words[idx : idx + n])
        if gram in seen:
            repeated += len(gram)
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return repeated


_BASE = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)


class NgramHashes:
    """64-bit hashes of every word n-gram of one document, for all n at once.

    ``joined(n)`` identifies ``"".join(words[i:i+n])`` (datatrove's duplicate n-grams compare
    the concatenation) and ``spaced(n)`` identifies ``" ".join(words[i:i+n])`` (its top
    n-grams). Equal strings always hash equal; different strings collide with probability
    about 2**-64 per pair, so the results equal datatrove's except with that probability.
    """

    def __init__(self, words: list[str]) -> None:
        self.n_words = len(words)
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # char offset of each word in "".join
        codes = np.frombuffer("".join(words).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        n_chars = len(codes)
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(n_chars + 1, _BASE, dtype=np.uint64), dtype=np.uint64)
            powers = np.concatenate([[np.uint64(1)], powers[:-1]])
            # prefix[i] = sum_{k<i} (c_k + 1) * BASE^(n_chars - 1 - k): a substring's hash is a
            # difference scaled back by its end position.
            weighted = (codes.astype(np.uint64) + np.uint64(1)) * powers[:n_chars][::-1]
            self.prefix = np.concatenate([[np.uint64(0)], np.cumsum(weighted, dtype=np.uint64)])
            self.powers = powers
            self.n_chars = n_chars
            self.word_hash = self._substring(self.offsets[:-1], self.offsets[1:])

    def _substring(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Hashes of the character ranges [start, end) of ``"".join(words)``.

        raw = sum (c_k + 1) BASE^(N-1-k) over the range; multiplying by BASE^start brings every
        range to the scale of a range starting at 0, so equal strings hash equal anywhere.
        """
        with np.errstate(over="ignore"):
            raw = (self.prefix[end] - self.prefix[start]) * self.powers[start]
            return raw * _MIX + (end - start).astype(np.uint64)

    def joined(self, n: int) -> np.ndarray:
        m = self.n_words - n + 1
        if m <= 0:
            return np.zeros(0, np.uint64)
        return self._substring(self.offsets[:m], self.offsets[n : n + m])

    def spaced(self, n: int) -> np.ndarray:
        m = self.n_words - n + 1
        if m <= 0:
            return np.zeros(0, np.uint64)
        with np.errstate(over="ignore"):
            acc = self.word_hash[:m].copy()
            for k in range(1, n):
                acc = acc * _MIX + self.word_hash[k : k + m]
        return acc

    def top_chars(self, n: int) -> int:
        """:func:`top_ngram_chars` from hashes."""
        grams = self.spaced(n)
        if len(grams) == 0:
            return 0
        _, first, counts = np.unique(grams, return_index=True, return_counts=True)
        best = counts.max()
        i = int(first[counts == best].min())  # the earliest of the most frequent, as most_common(1)
        length = int(self.offsets[i + n] - self.offsets[i]) + n - 1
        return length * int(best)

    def duplicated_chars(self, n: int) -> int:
        """:func:`duplicated_ngram_chars` from hashes, jumping from repeat to repeat.

        The greedy scan visits every position except the ``n - 1`` after each repeat, so a
        position repeats iff an earlier occurrence of its n-gram was not skipped. Only
        positions with an earlier occurrence are examined; text without repeats costs no loop.
        """
        grams = self.joined(n)
        m = len(grams)
        if m == 0:
            return 0
        values, inverse = np.unique(grams, return_inverse=True)
        if len(values) == m:
            return 0
        order = np.argsort(inverse, kind="stable")  # positions grouped by n-gram, ascending
        grouped = inverse[order]
        first_of_group = np.concatenate([[True], grouped[1:] != grouped[:-1]])
        group_start = np.searchsorted(grouped, np.arange(len(values)))
        candidates = np.sort(order[~first_of_group]).tolist()  # positions with an earlier occurrence
        order_l, start_l, inverse_l = order.tolist(), group_start.tolist(), inverse.tolist()
        offsets = self.offsets
        skipped: set[int] = set()
        repeated = idx = k = 0
        while k < len(candidates):
            i = candidates[k]
            if i < idx:
                k = bisect.bisect_left(candidates, idx, k)
                continue
            j = start_l[inverse_l[i]]
            seen = False
            while order_l[j] < i:
                if order_l[j] not in skipped:
                    seen = True
                    break
                j += 1
            if seen:
                repeated += int(offsets[i + n] - offsets[i])
                skipped.update(range(i + 1, i + n))
                idx = i + n
                k = bisect.bisect_left(candidates, idx, k)
            else:
                k += 1
        return repeated


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetition, splitter: WordSplitter | None = None) -> None:
        super().__init__()
        self.config = config
        self.splitter = splitter or word_splitter()
        self.top_n_grams = sorted((int(n), frac) for n, frac in config.top_n_grams.items())
        self.dup_n_grams = sorted((int(n), frac) for n, frac in config.dup_n_grams.items())

    def filter(self, doc: Document) -> str | None:
        cfg = self.config
        text = doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup_items, dup_chars = find_duplicates(paragraphs)
        if cfg.dup_para_frac and dup_items / len(paragraphs) > cfg.dup_para_frac:
            return "dup_para_frac"
        if cfg.dup_para_char_frac and dup_chars / len(text) > cfg.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        dup_items, dup_chars = find_duplicates(lines)
        if cfg.dup_line_frac and dup_items / len(lines) > cfg.dup_line_frac:
            return "dup_line_frac"
        if cfg.dup_line_char_frac and dup_chars / len(text) > cfg.dup_line_char_frac:
            return "dup_line_char_frac"
        words = doc.words(self.splitter)
        if not words:
            return KEEP
        hashes = NgramHashes(words)
        for n, frac in self.top_n_grams:
            chars = hashes.top_chars(n)
            if chars and chars / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if hashes.duplicated_chars(n) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return KEEP
