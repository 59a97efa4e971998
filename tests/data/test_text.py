"""The word splitter gives spaCy's English tokens and sentence counts, as datatrove sees them."""

from __future__ import annotations

import pytest

from crucible.trainer.data.text import word_splitter

CASES = [
    "Hello world. This is it!  And then... more? Yes.",
    'He said "no." Then (maybe) e.g. U.S. well-known $100 100% cannot dont.',
    "a.\tb. c",
    "Mr. Smith went to Washington. Ok!? Fine",
    "x. . y",
    "It's 10km away, isn't it? I'd say 3.5 miles—roughly.",
    "Emails like bob@example.com and URLs https://example.org/a?b=c stay whole.",
    "Ünïcödé wörds, naïve café; 東京 and emoji 🙂 too.",
    "Lists:\n- one\n- two\n\n# heading ### more",
    "",
]


@pytest.mark.parametrize("text", CASES)
def test_words_match_datatrove(text: str) -> None:
    text_mod = pytest.importorskip("datatrove.utils.text")
    assert word_splitter().words(text) == text_mod.split_into_words(text)


@pytest.mark.parametrize("line", [c.strip() for c in CASES if c.strip() and "\n" not in c])
def test_sentence_counts_match_datatrove(line: str) -> None:
    text_mod = pytest.importorskip("datatrove.utils.text")
    assert word_splitter().count_sentences(line) == len(text_mod.split_into_sentences(line))


def test_generated_corpus_words_match_datatrove(corpus_records: list[dict]) -> None:
    text_mod = pytest.importorskip("datatrove.utils.text")
    splitter = word_splitter()
    for rec in corpus_records[:150]:
        assert splitter.words(rec["text"]) == text_mod.split_into_words(rec["text"]), rec["id"]


@pytest.mark.parametrize("text", [*CASES, "  a. b", "a.  \n  b. c", "   ", "a. \t b", "A.\n\n\nB."])
def test_sentence_pieces_match_datatrove(text: str) -> None:
    text_mod = pytest.importorskip("datatrove.utils.text")
    assert word_splitter().sentences(text) == text_mod.split_into_sentences(text)
