"""Word-list toxicity filter: drops a document whose share of listed words exceeds ``maxRatio``.

Lists are one entry per line (``#`` comments allowed); an entry with spaces is a phrase.
The lists shipped in ``wordlists/<lang>.txt`` are used unless the spec names its own files.
The document's language comes from the language step (``en`` when it did not run).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from crucible.trainer.config.data import ToxicityStep
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import KEEP, Filter
from crucible.trainer.stage_io import SpecError

_WORDS = re.compile(r"\w+(?:['’]\w+)*")


class WordListError(SpecError):
    """A configured word list cannot be read; the message names the spec field."""


class WordList:
    def __init__(self, words: frozenset[str], phrases: re.Pattern[str] | None) -> None:
        self.words = words
        self.phrases = phrases

    @classmethod
    def parse(cls, text: str) -> WordList:
        entries = [ln.strip().lower() for ln in text.splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
        words = frozenset(e for e in entries if " " not in e)
        phrases = [e for e in entries if " " in e]
        pattern = (
            re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b")
            if phrases
            else None
        )
        return cls(words, pattern)


def shipped_languages() -> list[str]:
    root = resources.files("crucible.trainer.data") / "wordlists"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".txt"))


def load_wordlists(config: ToxicityStep) -> dict[str, WordList]:
    """language -> list; a configured file that cannot be read is a spec error naming the field."""
    lists: dict[str, WordList] = {}
    root = resources.files("crucible.trainer.data") / "wordlists"
    for lang in shipped_languages():
        lists[lang] = WordList.parse((root / f"{lang}.txt").read_text(encoding="utf-8"))
    for lang, path in config.wordlists.items():
        try:
            lists[lang] = WordList.parse(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise WordListError(
                f"steps.toxicity.wordlists.{lang}: cannot read {path!r} ({exc}); give a UTF-8 file "
                "with one word or phrase per line"
            ) from exc
    return lists


class ToxicityFilter(Filter):
    name = "toxicity"

    def __init__(self, config: ToxicityStep) -> None:
        super().__init__()
        self.max_ratio = config.max_ratio
        self.lists = load_wordlists(config)

    def filter(self, doc: Document) -> str | None:
        wordlist = self.lists.get(str(doc.meta.get("language", "en")))
        if wordlist is None:
            return KEEP
        lower = doc.text.lower()
        words = _WORDS.findall(lower)
        if not words:
            return KEEP
        listed = wordlist.words
        hits = sum(1 for w in words if w in listed)
        if wordlist.phrases is not None:
            hits += sum(len(m.split()) for m in wordlist.phrases.findall(lower))
        if hits / len(words) > self.max_ratio:
            return "toxic_words"
        return KEEP
