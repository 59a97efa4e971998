"""The unit every step handles: one document's text plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crucible.trainer.data.text import WordSplitter


@dataclass(slots=True)
class Document:
    """A document in flight.

    ``key`` orders documents globally and deterministically: (input file index << 32) |
    record index. Dedup keeps the smallest key of a cluster, so the choice never depends
    on how many workers ran.
    """

    text: str
    id: str
    source: str
    domain: str
    key: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    _words: list[str] | None = None
    _words_of: str | None = None

    def words(self, splitter: WordSplitter) -> list[str]:
        """spaCy English words of the current text, computed once per text version."""
        if self._words is None or self._words_of is not self.text:
            self._words = splitter.words(self.text)
            self._words_of = self.text
        return self._words
