"""Character classes and the word/sentence splitter that the quality rules share.

The quality rules are defined, as published and as datatrove implements them, over the
words of spaCy's English tokenizer (``spacy.blank("en")``, no model download) and over
spaCy's rule-based sentencizer. :class:`WordSplitter` gives exactly those tokens, but fast:
spaCy tokenizes every whitespace-delimited chunk on its own, so a chunk made only of
letters that is not one of the tokenizer's special cases ("cannot", "dont", ...) is its own
token and never reaches spaCy; every other chunk goes through spaCy once and is cached.
Each document is split once and the words are shared by every rule (see
:meth:`Document.words`).

``PUNCTUATION`` and ``TERMINAL_PUNCTUATION`` are datatrove's sets (Apache-2.0), copied so
that the rules agree with it character for character.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

PUNCTUATION = '!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„\';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_."}►»\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x7f\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\x99\x9a\x9b\x9c\x9d\x9e\x9f'
TERMINAL_PUNCTUATION = frozenset('!.?։؝؞؟۔܀܁܂߹࠷࠹࠽࠾।॥၊။።፧፨᙮᜵᜶។៕៖៙៚᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᭽᭾᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼⹓⹔。꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡𐩖𐩗𐽕𐽖𐽗𐽘𐽙𐾆𐾇𐾈𐾉𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑥄𑥆𑩂𑩃𑪛𑪜𑱁𑱂𑻷𑻸\U00011f43\U00011f44𖩮𖩯𖫵𖬷𖬸𖭄𖺘𛲟𝪈')
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
TERMINAL_PUNCTUATION_TUPLE = tuple(sorted(TERMINAL_PUNCTUATION))

# spaCy's Sentencizer.default_punct_chars: a token made of exactly one of these ends a sentence.
SENTENCE_END_CHARS = frozenset('!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？𐩖𐩗𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。')

_WHITESPACE_RUN = re.compile(r"\s+")
_CACHE_LIMIT = 500_000


def is_punct(token: str) -> bool:
    """spaCy's ``Token.is_punct``: every character is in a Unicode punctuation category."""
    return all(unicodedata.category(ch).startswith("P") for ch in token)


class WordSplitter:
    """spaCy English tokens (``spacy.blank("en")``) of a text, cached per whitespace chunk.

    Raises :class:`ImportError` naming the extra when spaCy is missing: the quality rules are
    defined over these tokens, and a silently different tokenizer would silently change what
    is kept.
    """

    def __init__(self) -> None:
        try:
            import spacy
        except ImportError as exc:  # pragma: no cover - spacy ships with the trainer extra
            raise ImportError(
                "the quality step needs spaCy's English tokenizer (no model download): "
                "pip install 'crucible[trainer]' or 'spacy>=3.7'"
            ) from exc
        self._nlp: Any = spacy.blank("en")
        self._special: frozenset[str] = frozenset(getattr(self._nlp.tokenizer, "rules", {}) or {})
        self._chunks: dict[str, tuple[str, ...]] = {}
        self._punct: dict[str, bool] = {}

    def chunk_tokens(self, chunk: str) -> tuple[str, ...]:
        """Tokens of one whitespace-free chunk."""
        if chunk.isalpha() and chunk not in self._special:
            return (chunk,)
        tokens = self._chunks.get(chunk)
        if tokens is None:
            with self._nlp.memory_zone():
                tokens = tuple(t.text for t in self._nlp.tokenizer(chunk))
            if len(self._chunks) >= _CACHE_LIMIT:
                self._chunks.clear()
            self._chunks[chunk] = tokens
        return tokens

    def words(self, text: str) -> list[str]:
        """Non-whitespace tokens, as datatrove's ``split_into_words`` returns them."""
        special = self._special
        cache = self._chunks
        chunks = text.split()
        missing = [c for c in chunks if not (c.isalpha() and c not in special) and c not in cache]
        if missing:
            self._tokenize_batch(list(dict.fromkeys(missing)))
        out: list[str] = []
        append, extend = out.append, out.extend
        for chunk in chunks:
            if chunk.isalpha() and chunk not in special:
                append(chunk)
            else:
                tokens = cache.get(chunk)
                extend(tokens if tokens is not None else self.chunk_tokens(chunk))
        return out

    def _tokenize_batch(self, chunks: list[str]) -> None:
        """Tokenize many chunks with one spaCy call (each whitespace-separated span is
        tokenized on its own, so joining them with spaces changes nothing) and cache them."""
        if len(self._chunks) + len(chunks) >= _CACHE_LIMIT:
            self._chunks.clear()
        starts = []
        pos = 0
        for c in chunks:
            starts.append(pos)
            pos += len(c) + 1
        with self._nlp.memory_zone():
            doc = self._nlp.tokenizer(" ".join(chunks))
            tokens = [(t.idx, t.text) for t in doc]
        i = 0
        for chunk, start in zip(chunks, starts, strict=True):
            end = start + len(chunk)
            mine = []
            while i < len(tokens) and tokens[i][0] < end:
                if tokens[i][0] >= start:
                    mine.append(tokens[i][1])
                i += 1
            self._chunks[chunk] = tuple(mine)

    def count_sentences(self, line: str) -> int:
        """Sentences of spaCy's Sentencizer in a stripped, non-empty line."""
        if not line:
            return 0
        missing = [c for c in line.split() if not c.isalpha() and c not in self._chunks]
        if missing:
            self._tokenize_batch(list(dict.fromkeys(missing)))
        count, seen_end = 1, False
        pos = 0
        for match in _WHITESPACE_RUN.finditer(line):
            count, seen_end = self._scan(line[pos : match.start()], count, seen_end)
            # spaCy attaches one trailing space to a token; any other run is a token itself.
            if match.group() != " " and seen_end:
                count += 1
                seen_end = False
            pos = match.end()
        count, seen_end = self._scan(line[pos:], count, seen_end)
        return count

    def sentences(self, text: str) -> list[str]:
        """The text cut after each spaCy-sentencizer sentence, as datatrove's
        ``split_into_sentences`` cuts it: pieces cover the whole text (whitespace stays with
        the next piece, the last runs to the end), so ``"".join(pieces) == text``."""
        chunks = text.split()
        missing = [c for c in chunks if not c.isalpha() and c not in self._chunks]
        if missing:
            self._tokenize_batch(list(dict.fromkeys(missing)))
        bounds: list[int] = []
        seen_end = False
        last_end = 0
        pos = 0

        def visit(token: str, offset: int, is_space: bool) -> None:
            nonlocal seen_end, last_end
            in_end = not is_space and token in SENTENCE_END_CHARS
            if seen_end and not in_end and (is_space or not self._is_punct(token)):
                bounds.append(last_end)  # the previous sentence ends with the previous token
                seen_end = False
            elif in_end:
                seen_end = True
            last_end = offset + len(token)

        for match in _WHITESPACE_RUN.finditer(text):
            chunk_start, run = match.start(), match.group()
            self._visit_chunk(text[pos:chunk_start], pos, visit)
            if chunk_start == 0:
                visit(run, 0, True)  # leading whitespace is one token
            elif run != " ":
                skip = 1 if run[0] == " " else 0  # one space belongs to the previous token
                visit(run[skip:], chunk_start + skip, True)
            pos = match.end()
        self._visit_chunk(text[pos:], pos, visit)
        return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]

    def _visit_chunk(self, chunk: str, offset: int, visit: Any) -> None:
        if not chunk:
            return
        for token in self.chunk_tokens(chunk):
            visit(token, offset, False)
            offset += len(token)

    def _scan(self, chunk: str, count: int, seen_end: bool) -> tuple[int, bool]:
        if not chunk:
            return count, seen_end
        for token in self.chunk_tokens(chunk):
            in_end = token in SENTENCE_END_CHARS
            if seen_end and not in_end and not self._is_punct(token):
                count += 1
                seen_end = False
            elif in_end:
                seen_end = True
        return count, seen_end

    def _is_punct(self, token: str) -> bool:
        cached = self._punct.get(token)
        if cached is None:
            cached = self._punct[token] = is_punct(token)
        return cached


_SPLITTER: WordSplitter | None = None


def word_splitter() -> WordSplitter:
    """The process-wide splitter (spaCy is loaded once)."""
    global _SPLITTER
    if _SPLITTER is None:
        _SPLITTER = WordSplitter()
    return _SPLITTER


