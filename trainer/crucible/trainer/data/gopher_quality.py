"""Gopher quality rules (Rae et al. 2021, table A1), with datatrove's semantics and defaults."""

from __future__ import annotations

from crucible.trainer.config.data import GopherQuality
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import KEEP, Filter
from crucible.trainer.data.text import PUNCTUATION_SET, WordSplitter, word_splitter

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_PUNCT_CHARS = "".join(sorted(PUNCTUATION_SET))


def _has_alpha(word: str) -> bool:
    return word.isalpha() or any(c.isalpha() for c in word)


class GopherQualityFilter(Filter):
    name = "gopher_quality"

    def __init__(self, config: GopherQuality, splitter: WordSplitter | None = None) -> None:
        super().__init__()
        self.config = config
        self.splitter = splitter or word_splitter()

    def filter(self, doc: Document) -> str | None:
        cfg = self.config
        text = doc.text
        words = doc.words(self.splitter)
        n_words = len(words)
        # A word made only of punctuation is a symbol, not a word (x.strip(chars) == "" iff all in chars).
        lengths = [len(w) for w in words if w.strip(_PUNCT_CHARS)]
        n_non_symbol = len(lengths)
        if (cfg.min_doc_words and n_non_symbol < cfg.min_doc_words) or n_non_symbol == 0:
            return "gopher_short_doc"
        if cfg.max_doc_words and n_non_symbol > cfg.max_doc_words:
            return "gopher_long_doc"
        avg = sum(lengths) / n_non_symbol
        if cfg.min_avg_word_length and avg < cfg.min_avg_word_length:
            return "gopher_below_avg_word_length"
        if cfg.max_avg_word_length and avg > cfg.max_avg_word_length:
            return "gopher_above_avg_word_length"
        if cfg.max_symbol_word_ratio and text.count("#") / n_words > cfg.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if cfg.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if cfg.max_bullet_lines_ratio and (
            sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > cfg.max_bullet_lines_ratio
        ):
            return "gopher_too_many_bullets"
        if cfg.max_ellipsis_lines_ratio and (
            sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > cfg.max_ellipsis_lines_ratio
        ):
            return "gopher_too_many_end_ellipsis"
        if cfg.max_non_alpha_words_ratio and (
            sum(_has_alpha(w) for w in words) / n_words < cfg.max_non_alpha_words_ratio
        ):
            return "gopher_below_alpha_threshold"
        if cfg.min_stop_words and len(STOP_WORDS.intersection(words)) < cfg.min_stop_words:
            return "gopher_too_few_stop_words"
        return KEEP
