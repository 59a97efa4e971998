"""FineWeb's own quality rules (Penedo et al. 2024) with datatrove's semantics and defaults."""

from __future__ import annotations

from crucible.trainer.config.data import FineWebQuality
from crucible.trainer.data.document import Document
from crucible.trainer.data.gopher_repetition import find_duplicates
from crucible.trainer.data.step import KEEP, Filter
from crucible.trainer.data.text import TERMINAL_PUNCTUATION_TUPLE, WordSplitter, word_splitter


class FineWebQualityFilter(Filter):
    name = "fineweb"

    def __init__(self, config: FineWebQuality, splitter: WordSplitter | None = None) -> None:
        super().__init__()
        self.config = config
        self.splitter = splitter or word_splitter()

    def filter(self, doc: Document) -> str | None:
        cfg = self.config
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return "empty"
        if sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION_TUPLE)) / len(lines) < cfg.line_punct_thr:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines) > cfg.short_line_thr:
            return "short_line_ratio"
        if find_duplicates(lines)[1] / len(text.replace("\n", "")) > cfg.char_duplicates_ratio:
            return "char_dup_ratio"
        words = doc.words(self.splitter)
        if not words or text.count("\n") / len(words) > cfg.new_line_ratio:
            return "list_ratio"
        return KEEP
