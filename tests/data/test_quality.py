"""Each quality rule: documents that must pass and must drop, with the exact reason; and
agreement with datatrove's implementation of the same rules."""

from __future__ import annotations

from typing import Any

import pytest

from crucible.trainer.config.data import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from crucible.trainer.data.c4 import C4QualityFilter
from crucible.trainer.data.fineweb import FineWebQualityFilter
from crucible.trainer.data.gopher_quality import GopherQualityFilter
from crucible.trainer.data.gopher_repetition import GopherRepetitionFilter
from crucible.trainer.data.step import Filter

from .conftest import PROSE, make_doc

SENTENCES = [s.strip() + "." for s in PROSE.split(".") if s.strip()]
PROSE_LINES = "\n".join(SENTENCES)
OTHER = (
    "Farmers in the valley started the harvest early this year because of the dry summer. "
    "Prices at the market have stayed stable and the cooperative expects a good season."
)


def _lines(n: int, fmt: str) -> str:
    return "\n".join(fmt.format(i=i) for i in range(n))


GOPHER_QUALITY: list[tuple[str, str | None, dict[str, Any]]] = [
    ("prose", PROSE, {}),
    ("short", "The cat sat on the mat with the hat.", {}),
    ("long", PROSE, {"max_doc_words": 60}),
    ("tiny_words", " ".join(["to be or it is an ox"] * 10), {}),
    ("huge_words", " ".join(["internationalization of the telecommunications infrastructure"] * 12), {}),
    ("hashes", PROSE + " #news" * 20, {}),
    ("ellipsis", PROSE + " wait..." * 15, {}),
    ("bullets", _lines(10, "- the {i} cat and the dog went to the market of the town"), {}),
    ("end_ellipsis", "\n".join(s[:-1] + "…" if i % 2 else s for i, s in enumerate(SENTENCES * 2)), {}),
    ("numbers", PROSE + " 12345" * 120, {}),
    ("no_stop_words", " ".join(["Quick brown foxes jump over lazy dogs daily."] * 8), {}),
]
GOPHER_QUALITY_REASONS = {
    "prose": None,
    "short": "gopher_short_doc",
    "long": "gopher_long_doc",
    "tiny_words": "gopher_below_avg_word_length",
    "huge_words": "gopher_above_avg_word_length",
    "hashes": "gopher_too_many_hashes",
    "ellipsis": "gopher_too_many_ellipsis",
    "bullets": "gopher_too_many_bullets",
    "end_ellipsis": "gopher_too_many_end_ellipsis",
    "numbers": "gopher_below_alpha_threshold",
    "no_stop_words": "gopher_too_few_stop_words",
}


@pytest.mark.parametrize(("name", "text", "overrides"), GOPHER_QUALITY, ids=[c[0] for c in GOPHER_QUALITY])
def test_gopher_quality(name: str, text: str, overrides: dict[str, Any]) -> None:
    f = GopherQualityFilter(GopherQuality(**overrides))
    assert f.filter(make_doc(text)) == GOPHER_QUALITY_REASONS[name]


GOPHER_REPETITION = [
    ("prose", PROSE + "\n\n" + OTHER, None),
    ("dup_paragraphs", "\n\n".join([PROSE, PROSE, PROSE, OTHER]), "dup_para_frac"),
    ("dup_paragraph_chars", "\n\n".join([PROSE, "Short one.", "Another short.", "A third.", PROSE]), "dup_para_char_frac"),
    ("dup_lines", "\n".join(["Click here to subscribe."] * 5 + [PROSE]), "dup_line_frac"),
    ("dup_line_chars", "\n".join([PROSE, "Short a.", "Short b.", "Short c.", PROSE]), "dup_line_char_frac"),
    ("top_2_gram", " ".join(f"the cat saw bird {i}." for i in range(40)), "top_2_gram"),
    ("dup_5_grams", PROSE + " " + PROSE[:260], "duplicated_5_n_grams"),
    ("empty", "", "empty"),
]


@pytest.mark.parametrize(("name", "text", "reason"), GOPHER_REPETITION, ids=[c[0] for c in GOPHER_REPETITION])
def test_gopher_repetition(name: str, text: str, reason: str | None) -> None:
    assert GopherRepetitionFilter(GopherRepetition()).filter(make_doc(text)) == reason


C4_CASES = [
    ("prose", PROSE_LINES, None),
    ("few_sentences", "\n".join(SENTENCES[:3]), "too_few_sentences"),
    ("lorem", PROSE_LINES + "\nLorem ipsum dolor sit amet, consectetur.", "lorem_ipsum"),
    ("curly", PROSE_LINES + "\nThe code reads if x { return y }.", "curly_bracket"),
]


@pytest.mark.parametrize(("name", "text", "reason"), C4_CASES, ids=[c[0] for c in C4_CASES])
def test_c4(name: str, text: str, reason: str | None) -> None:
    assert C4QualityFilter(C4Quality()).filter(make_doc(text)) == reason


def test_c4_removes_lines_and_citations() -> None:
    text = "\n".join([
        *SENTENCES[:5],
        "Please enable JavaScript to view the comments.",
        "This site uses cookies to improve your experience.",
        "A menu line without punctuation",
        "Too short.",
        "The bridge opened in 1932 after six years of work.[1]",
    ])
    doc = make_doc(text)
    f = C4QualityFilter(C4Quality())
    assert f.filter(doc) is None
    assert doc.text.splitlines() == [*SENTENCES[:5], "The bridge opened in 1932 after six years of work."]
    assert f.stats.changes["line_javascript"] == 1
    assert f.stats.changes["line_policy"] == 1


FINEWEB = [
    ("prose", PROSE_LINES, None),
    ("no_punctuation", _lines(10, "the quick brown fox number {i} jumps over the lazy dog again"), "line_punct_ratio"),
    ("short_lines", _lines(10, "Yes it is {i}.") + "\n" + PROSE, "short_line_ratio"),
    ("duplicate_lines", PROSE_LINES + "\n" + SENTENCES[0], "char_dup_ratio"),
    ("list", "\n\n".join(f"Antidisestablishmentarianism{i} supercalifragilistic!" for i in range(10)), "list_ratio"),
    ("empty", "\n\n", "empty"),
]


@pytest.mark.parametrize(("name", "text", "reason"), FINEWEB, ids=[c[0] for c in FINEWEB])
def test_fineweb(name: str, text: str, reason: str | None) -> None:
    assert FineWebQualityFilter(FineWebQuality()).filter(make_doc(text)) == reason


def test_base_class_counts_drops_per_reason_and_source() -> None:
    f = FineWebQualityFilter(FineWebQuality())
    docs = [make_doc(PROSE_LINES, "a", "s1"), make_doc("\n", "b", "s2"), make_doc(FINEWEB[1][1], "c", "s1")]
    seen: list[tuple[str, str, str]] = []
    f.drop_sink = lambda doc, step, reason: seen.append((doc.id, step, reason))
    kept = [d.id for d in f.run(docs)]
    assert kept == ["a"]
    assert f.stats.documents_in == 3 and f.stats.documents_out == 1
    assert dict(f.stats.dropped) == {"empty": 1, "line_punct_ratio": 1}
    assert f.stats_json()["droppedBySource"] == {"s1": {"line_punct_ratio": 1}, "s2": {"empty": 1}}
    assert seen == [("b", "fineweb", "empty"), ("c", "fineweb", "line_punct_ratio")]


def _datatrove_chain() -> list[Any]:
    filters = pytest.importorskip("datatrove.pipeline.filters")
    return [filters.GopherRepetitionFilter(), filters.GopherQualityFilter(), filters.C4QualityFilter(),
            filters.FineWebQualityFilter()]


def _ours() -> list[Filter]:
    return [GopherRepetitionFilter(GopherRepetition()), GopherQualityFilter(GopherQuality()),
            C4QualityFilter(C4Quality()), FineWebQualityFilter(FineWebQuality())]


def test_same_decisions_and_reasons_as_datatrove(corpus_records: list[dict[str, Any]]) -> None:
    from datatrove.data import Document as DtDocument

    theirs, ours = _datatrove_chain(), _ours()
    texts = [r["text"] for r in corpus_records] + [c[1] for c in GOPHER_REPETITION + C4_CASES + FINEWEB if c[1]]
    for text in texts:
        dt_doc, doc = DtDocument(text=text, id="x"), make_doc(text)
        dt_result: Any = True
        for f in theirs:
            dt_result = f.filter(dt_doc)
            if dt_result is not True:
                break
        our_result = None
        for g in ours:
            our_result = g.filter(doc)
            if our_result is not None:
                break
        assert (dt_result is True) == (our_result is None), text[:200]
        if our_result is None:
            assert doc.text == dt_doc.text  # C4 rewrote both the same way


def test_ngram_hashes_equal_the_reference_loops() -> None:
    """The vectorized repetition counts equal datatrove's loops, "".join collisions included."""
    import random

    from crucible.trainer.data.gopher_repetition import NgramHashes, duplicated_ngram_chars, top_ngram_chars

    rng = random.Random(0)
    for _ in range(400):
        vocab = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 60))]
        hashes = NgramHashes(words)
        for n in range(2, 5):
            assert hashes.top_chars(n) == top_ngram_chars(words, n), (words, n)
        for n in range(5, 11):
            assert hashes.duplicated_chars(n) == duplicated_ngram_chars(words, n), (words, n)


def test_c4_by_sentence_agrees_with_datatrove(corpus_records: list[dict[str, Any]]) -> None:
    filters = pytest.importorskip("datatrove.pipeline.filters")
    from datatrove.data import Document as DtDocument

    theirs = filters.C4QualityFilter(split_paragraph=False)
    ours = C4QualityFilter(C4Quality(split_paragraph=False))
    for rec in corpus_records[:200]:
        dt_doc, doc = DtDocument(text=rec["text"], id="x"), make_doc(rec["text"])
        dt_result, our_result = theirs.filter(dt_doc), ours.filter(doc)
        assert (dt_result is True) == (our_result is None), rec["id"]
        assert doc.text == dt_doc.text
