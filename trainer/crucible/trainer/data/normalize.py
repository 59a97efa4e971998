"""Unicode normalization (NFC/NFKC), control and zero-width characters, whitespace."""

from __future__ import annotations

import re
import unicodedata

from crucible.trainer.config.data import NormalizeStep
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import Modifier

# C0/C1 controls except tab and newline, plus invisible format characters that only hide text.
_REMOVED = [c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)] + list(range(0x7F, 0xA0))
_REMOVED += [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD]
_DELETE = dict.fromkeys(_REMOVED)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newline
_TRAILING = re.compile(r" *\n *")
_BLANK_RUNS = re.compile(r"\n{3,}")


class Normalizer(Modifier):
    """NFC (or NFKC), CRLF to LF, control characters removed, spaces collapsed, >2 blank lines cut."""

    name = "normalize"

    def __init__(self, config: NormalizeStep) -> None:
        super().__init__()
        self.form = config.form

    def modify(self, doc: Document) -> int:
        text = doc.text
        if not unicodedata.is_normalized(self.form, text):
            text = unicodedata.normalize(self.form, text)
        text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_DELETE)
        text = _SPACES.sub(" ", text)
        text = _TRAILING.sub("\n", text)
        text = _BLANK_RUNS.sub("\n\n", text).strip()
        changed = text != doc.text
        doc.text = text
        return int(changed)
