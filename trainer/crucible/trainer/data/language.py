"""Language identification with py3langid (its model ships inside the wheel: no download)."""

from __future__ import annotations

from typing import Any

from crucible.trainer.config.data import LanguageStep
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import KEEP, Filter

# py3langid walks its DFA byte by byte in Python, so cost grows with length, while the answer
# for a document stops changing after a few hundred words: the first 2000 characters decide.
MAX_CHARS = 2000


def load_identifier() -> Any:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:  # pragma: no cover - part of the trainer extra
        raise ImportError("the language step needs py3langid: pip install 'crucible[trainer]'") from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter(Filter):
    """Keeps documents in ``languages`` identified with at least ``minScore`` confidence.

    Sets ``doc.meta["language"]`` and ``["languageScore"]`` for later steps (toxicity lists).
    """

    name = "language"

    def __init__(self, config: LanguageStep) -> None:
        super().__init__()
        self.languages = frozenset(config.languages)
        self.min_score = config.min_score
        self.identifier = load_identifier()

    def filter(self, doc: Document) -> str | None:
        lang, score = self.identifier.classify(doc.text[:MAX_CHARS])
        doc.meta["language"] = lang
        doc.meta["languageScore"] = round(float(score), 4)
        if lang not in self.languages:
            return f"language_{lang}"
        if score < self.min_score:
            return "language_score_below_threshold"
        return KEEP
