"""C4 rules (Raffel et al. 2020) as datatrove's C4QualityFilter applies them.

Line-level: lines with a word over ``maxWordLength`` characters, without terminal
punctuation, with fewer than ``minWordsPerLine`` words, mentioning javascript or cookie /
terms-of-use boilerplate are removed from the text. Document-level: lorem ipsum or a curly
bracket in a kept line drops it, and so do fewer than ``minNumSentences`` sentences left.
"""

from __future__ import annotations

import re

from crucible.trainer.config.data import C4Quality
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import KEEP, Filter
from crucible.trainer.data.text import WordSplitter, word_splitter

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4QualityFilter(Filter):
    name = "c4"

    def __init__(self, config: C4Quality, splitter: WordSplitter | None = None) -> None:
        super().__init__()
        self.config = config
        self.splitter = splitter or word_splitter()

    def filter(self, doc: Document) -> str | None:
        cfg = self.config
        lines = doc.text.splitlines() if cfg.split_paragraph else self._sentences(doc.text)
        num_sentences = 0
        kept: list[str] = []
        for raw in lines:
            line = raw.strip()
            words = line.split()
            if any(len(w) > cfg.max_word_length for w in words):
                self.stats.changes["line_too_long_word"] += 1
                continue
            if cfg.remove_citations and "[" in line:
                line = CITATION.sub("", line)
            if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                self.stats.changes["line_no_terminal_punct"] += 1
                continue
            if len(words) < cfg.min_words_per_line:
                self.stats.changes["line_too_few_words"] += 1
                continue
            lower = line.lower()
            if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if cfg.filter_javascript and "javascript" in lower:
                self.stats.changes["line_javascript"] += 1
                continue
            if cfg.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if cfg.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                self.stats.changes["line_policy"] += 1
                continue
            if cfg.min_num_sentences > 0:
                num_sentences += self.splitter.count_sentences(line) if cfg.split_paragraph else 1
            kept.append(line)
        if num_sentences < cfg.min_num_sentences:
            return "too_few_sentences"
        doc.text = ("\n" if cfg.split_paragraph else " ").join(kept).strip()
        return KEEP

    def _sentences(self, text: str) -> list[str]:
        """splitParagraph: false: spaCy-sentencizer pieces of the whole text, as datatrove cuts them."""
        return self.splitter.sentences(text)
