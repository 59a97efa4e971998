"""normalize, language, PII and toxicity steps: must-pass and must-drop documents, exact reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible.trainer.config.data import LanguageStep, NormalizeStep, PiiStep, ToxicityStep
from crucible.trainer.data.language import LanguageFilter
from crucible.trainer.data.normalize import Normalizer
from crucible.trainer.data.pii import PiiRedactor, luhn_valid
from crucible.trainer.data.synthetic import FOREIGN, foreign_document, luhn_complete
from crucible.trainer.data.toxicity import ToxicityFilter, WordListError, shipped_languages

from .conftest import PROSE, make_doc

NORMALIZE = [
    ("e\u0301t\u00e9", "été"),  # combining accent composed (NFC)
    ("a\r\nb\rc", "a\nb\nc"),
    ("tab\there  and   spaces ", "tab here and spaces"),
    ("zero\u200bwidth\ufeff bom\x00\x07", "zerowidth bom"),
    ("one\n\n\n\n\ntwo", "one\n\ntwo"),
    ("line  \n  next", "line\nnext"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE)
def test_normalize(raw: str, expected: str) -> None:
    doc = make_doc(raw)
    assert Normalizer(NormalizeStep()).process(doc) is None
    assert doc.text == expected


def test_normalize_nfkc_and_empty_result() -> None:
    doc = make_doc("ﬁne ＡＢＣ")
    Normalizer(NormalizeStep(form="NFKC")).process(doc)
    assert doc.text == "fine ABC"
    assert Normalizer(NormalizeStep()).process(make_doc("\u200b \x00 \n")) == "empty_after_normalize"


def test_language_keeps_english_and_names_other_languages() -> None:
    import random

    step = LanguageFilter(LanguageStep())
    english = make_doc(PROSE)
    assert step.filter(english) is None
    assert english.meta["language"] == "en" and english.meta["languageScore"] > 0.9
    rng = random.Random(1)
    for lang in sorted(FOREIGN):
        assert step.filter(make_doc(foreign_document(rng, lang))) == f"language_{lang}"


def test_language_score_threshold_and_language_list() -> None:
    strict = LanguageFilter(LanguageStep(min_score=0.8))
    assert strict.filter(make_doc("The cat is here.")) == "language_score_below_threshold"  # en, 0.74
    assert strict.filter(make_doc("The committee reviewed the budget.")) is None  # en, 0.95
    french_ok = LanguageFilter(LanguageStep(languages=["en", "fr"]))
    import random

    assert french_ok.filter(make_doc(foreign_document(random.Random(2), "fr"))) is None


CARD = luhn_complete("453201511283036")
PII = [
    ("Mail jane.doe+news@mail.example.co.uk today.", "Mail <EMAIL> today.", "email"),
    ("Call +1 415-555-0132 now.", "Call <PHONE> now.", "phone"),
    ("Call (555) 867-5309 now.", "Call <PHONE> now.", "phone"),
    ("Host 10.0.0.12 is up.", "Host <IP_ADDRESS> is up.", "ip"),
    ("Host 2001:db8::8a2e:370:7334 is up.", "Host <IP_ADDRESS> is up.", "ip"),
    ("Host fe80::1 is up.", "Host <IP_ADDRESS> is up.", "ip"),
    (f"Card {CARD} ok.", "Card <CREDIT_CARD> ok.", "credit_card"),
    (f"Card {CARD[:4]} {CARD[4:8]} {CARD[8:12]} {CARD[12:]} ok.", "Card <CREDIT_CARD> ok.", "credit_card"),
    ("key AKIAIOSFODNN7EXAMPLE leaked", "key <SECRET> leaked", "secret"),
    ("token ghp_" + "a" * 36 + " leaked", "token <SECRET> leaked", "secret"),
    ("slack xoxb-1234567890-abcdefghij here", "slack <SECRET> here", "secret"),
    ('password = "hunter2hunter2"', 'password = "<SECRET>"', "secret"),
    ("api_key: sk-" + "A1b2" * 8, "api_key: <SECRET>", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "<SECRET>", "secret"),
]
NOT_PII = [
    "Version 1.2.3 was released in 2024, see section 4.5.",
    "The invoice number 4532015112830367 has a bad check digit.",
    "The meeting is at 10:30 and lasts 45 minutes.",
    "We sold 1,234,567 units at $19.99 each.",
    "Email is a@b, not an address.",
    "Ratio 3:2:1 of the mix.",
]


@pytest.mark.parametrize(("raw", "expected", "kind"), PII)
def test_pii_replaced_with_typed_placeholder(raw: str, expected: str, kind: str) -> None:
    step = PiiRedactor(PiiStep())
    doc = make_doc(raw)
    assert step.process(doc) is None
    assert doc.text == expected
    assert step.stats.changes[kind] == 1


@pytest.mark.parametrize("raw", NOT_PII)
def test_pii_leaves_lookalikes_alone(raw: str) -> None:
    if "4532015112830367" in raw:
        assert not luhn_valid("4532015112830367")
    doc = make_doc(raw)
    PiiRedactor(PiiStep()).process(doc)
    assert doc.text == raw


def test_pii_kinds_can_be_turned_off() -> None:
    doc = make_doc("Mail bob@example.com or call (555) 867-5309.")
    PiiRedactor(PiiStep(email=False)).process(doc)
    assert doc.text == "Mail bob@example.com or call <PHONE>."


def test_toxicity_drops_above_ratio_and_keeps_clean() -> None:
    step = ToxicityFilter(ToxicityStep())
    assert "en" in shipped_languages()
    assert step.filter(make_doc(PROSE)) is None
    assert step.filter(make_doc(PROSE + " fuck shit fucking bitch")) == "toxic_words"
    # one listed word in ~110 is under the 1 % default
    assert step.filter(make_doc(PROSE + " shit")) is None
    assert step.filter(make_doc("son of a bitch " * 3 + PROSE)) == "toxic_words"  # phrases count too


def test_toxicity_uses_document_language_and_custom_lists(tmp_path: Path) -> None:
    custom = tmp_path / "en.txt"
    custom.write_text("# custom\nbudget\ncommittee\n")
    step = ToxicityFilter(ToxicityStep(wordlists={"en": str(custom)}, max_ratio=0.01))
    assert step.filter(make_doc(PROSE)) == "toxic_words"
    german = make_doc("Das ist scheiße und scheisse.", language="de")
    assert ToxicityFilter(ToxicityStep()).filter(german) == "toxic_words"
    assert ToxicityFilter(ToxicityStep()).filter(make_doc("shit happens", language="xx")) is None


def test_toxicity_unreadable_list_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(WordListError, match=r"steps\.toxicity\.wordlists\.en: cannot read"):
        ToxicityFilter(ToxicityStep(wordlists={"en": str(tmp_path / "missing.txt")}))
