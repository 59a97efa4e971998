"""A generated corpus with known defects, for tests, the benchmark and the quickstart.

:func:`generate_corpus` returns records ``{"id", "text", "kind", ...}`` where ``kind`` says
what the document is: ``clean`` English prose, ``exact_dup`` / ``near_dup`` copies of an
earlier clean document (``of`` names it, ``jaccard`` is the planted word-5-gram Jaccard
similarity), ``pii`` (clean prose with e-mails, phones, IPs, a Luhn-valid card and an API
key), ``spam`` (repetitive), ``foreign`` (French, German or Spanish), ``short``, ``toxic``,
``boilerplate`` (curly brackets / lorem ipsum). Everything is a function of the seed.
"""

from __future__ import annotations

import random
from typing import Any


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    "system model river city garden teacher student market engine window problem answer season "
    "village library report station network forest doctor village kitchen mountain council "
    "project budget museum harbor bridge company festival vaccine climate signal journey "
    "history picture process theory method result sample farmer artist engineer lawyer "
    "planet ocean island valley desert field office building computer printer program "
    "language country region province hospital school college church theatre stadium"
)
VERBS = _words(
    "builds describes explains improves supports changes follows protects measures reaches "
    "shows carries receives produces studies opens closes prepares collects reviews "
    "publishes announces discovers develops reduces increases requires includes"
)
ADJECTIVES = _words(
    "large small ancient modern quiet busy careful bright dark early late public private "
    "local national useful simple complex important common rare strong gentle narrow wide"
)
ADVERBS = _words("quickly slowly carefully often rarely usually clearly finally recently nearly")
PREPOSITIONS = _words("near under over across behind beside through around beyond inside")
CONNECTORS = ("and", "but", "because", "while", "although", "so that", "after", "before")
NAMES = _words("Alice Bob Carol David Erin Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent Walter")

FOREIGN = {
    "fr": _words(
        "le la les un une des et est dans pour avec sur pas plus que qui nous vous ils elles "
        "maison ville jardin rivière école travail famille enfant gouvernement histoire "
        "toujours aujourd'hui beaucoup très bien petit grand nouveau vieux belle pendant "
        "depuis parce comme avoir être faire dire pouvoir aller voir savoir vouloir"
    ),
    "de": _words(
        "der die das und ist nicht mit von zu auf für sich dem den des ein eine einer auch "
        "Haus Stadt Garten Fluss Schule Arbeit Familie Kind Regierung Geschichte immer heute "
        "sehr gut klein groß neu alt schön während seit weil wie haben sein werden können "
        "gehen sehen wissen wollen müssen über unter zwischen"
    ),
    "es": _words(
        "el la los las un una y es en para con sobre no más que quien nosotros ellos "
        "casa ciudad jardín río escuela trabajo familia niño gobierno historia siempre hoy "
        "mucho muy bien pequeño grande nuevo viejo hermosa durante desde porque como tener "
        "ser hacer decir poder ir ver saber querer también pero cuando donde"
    ),
}


def _sentence(rng: random.Random) -> str:
    def phrase() -> str:
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"

    parts = [
        phrase().capitalize() if rng.random() < 0.7 else rng.choice(NAMES),
        rng.choice(VERBS),
        phrase(),
        f"of the {rng.choice(NOUNS)}",
    ]
    if rng.random() < 0.5:
        parts.append(f"{rng.choice(PREPOSITIONS)} {phrase()}")
    if rng.random() < 0.4:
        parts.append(f"{rng.choice(CONNECTORS)} {phrase()} {rng.choice(VERBS)} {rng.choice(ADVERBS)}")
    if rng.random() < 0.3:
        parts.append(f"with {rng.randint(2, 900)} {rng.choice(NOUNS)}s")
    if rng.random() < 0.15:
        parts.insert(2, f"({rng.choice(ADVERBS)})")
    text = " ".join(parts)
    if rng.random() < 0.2:
        text = text.replace(" the ", ", the ", 1)
    return text + rng.choice(".....!?")


def english_document(rng: random.Random, sentences: tuple[int, int] = (8, 30)) -> str:
    n = rng.randint(*sentences)
    paragraphs: list[str] = []
    current: list[str] = []
    for _ in range(n):
        current.append(_sentence(rng))
        if len(current) >= rng.randint(2, 5):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) if rng.random() < 0.6 else "\n".join(paragraphs)


def foreign_document(rng: random.Random, lang: str) -> str:
    words = FOREIGN[lang]
    sentences = []
    for _ in range(rng.randint(8, 20)):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 16)))
        sentences.append(sentence.capitalize() + ".")
    return " ".join(sentences)


def luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it Luhn-valid."""
    for check in "0123456789":
        digits = prefix + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def pii_document(rng: random.Random) -> tuple[str, dict[str, int]]:
    base = english_document(rng, (8, 16)).split("\n")
    card = luhn_complete("4" + "".join(rng.choice("0123456789") for _ in range(14)))
    card_text = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    inserts = [
        f"Write to {rng.choice(NAMES).lower()}.{rng.randint(1, 99)}@example.org for the details.",
        f"Call the office at (555) {rng.randint(200, 999)}-{rng.randint(1000, 9999)} before noon.",
        f"The server answered from 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)} during the test.",
        f"The router also listens on 2001:db8::{rng.randint(1, 9999):x} for the new clients.",
        f"Payment went through with card {card_text} yesterday.",
        "The leaked key AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        + " was rotated.",
    ]
    for ins in inserts:
        base.insert(rng.randint(0, len(base)), ins)
    return "\n".join(base), {"email": 1, "phone": 1, "ip": 2, "credit_card": 1, "secret": 1}


def spam_document(rng: random.Random) -> str:
    line = f"Buy {rng.choice(NOUNS)} now at the best price of the {rng.choice(NOUNS)} and save big today!"
    return "\n".join([line] * rng.randint(10, 30))


def toxic_document(rng: random.Random) -> str:
    words = english_document(rng, (6, 10)).split(" ")
    for _ in range(max(3, len(words) // 12)):
        words.insert(rng.randint(0, len(words)), rng.choice(["fuck", "shit", "bitch", "asshole"]))
    return " ".join(words)


def boilerplate_document(rng: random.Random) -> str:
    doc = english_document(rng, (8, 14))
    return doc + ("\nfunction main() { return the value of the thing; }." if rng.random() < 0.5 else
                  "\nLorem ipsum dolor sit amet, consectetur adipiscing elit sed do eiusmod.")


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of the simplified text, as the MinHash step sees them."""
    from crucible.trainer.data.minhash import simplify

    words = simplify(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def near_duplicate(rng: random.Random, text: str, target: float) -> str:
    """A copy of ``text`` with words replaced until its 5-gram Jaccard is about ``target``."""
    words = text.split(" ")
    # Each replaced word breaks ~5 shingles: J ≈ (S - 5k) / (S + 5k) -> k ≈ S (1 - J) / (5 (1 + J)).
    k = max(1, round(len(words) * (1 - target) / (5 * (1 + target))))
    positions = rng.sample(range(len(words)), min(k, len(words)))
    for p in positions:
        words[p] = rng.choice((*NOUNS, *ADJECTIVES))
    return " ".join(words)


def generate_corpus(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """``n`` records; ``mix`` gives the share of each kind (the rest is clean English)."""
    rng = random.Random(seed)
    shares = mix or {
        "exact_dup": 0.06, "near_dup": 0.10, "pii": 0.05, "spam": 0.04, "foreign": 0.06,
        "short": 0.04, "toxic": 0.03, "boilerplate": 0.03,
    }
    records: list[dict[str, Any]] = []
    clean: list[int] = []
    for i in range(n):
        roll, acc, kind = rng.random(), 0.0, "clean"
        for name, share in shares.items():
            acc += share
            if roll < acc:
                kind = name
                break
        if kind in ("exact_dup", "near_dup") and not clean:
            kind = "clean"
        rec: dict[str, Any] = {"id": f"doc-{seed}-{i:07d}", "kind": kind}
        if kind == "clean":
            rec["text"] = english_document(rng)
            clean.append(i)
        elif kind == "exact_dup":
            j = rng.choice(clean)
            rec.update(text=records[j]["text"], of=records[j]["id"], jaccard=1.0)
        elif kind == "near_dup":
            j = rng.choice(clean)
            target = rng.choice([0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
            rec["text"] = near_duplicate(rng, records[j]["text"], target)
            rec.update(of=records[j]["id"], jaccard=round(jaccard(rec["text"], records[j]["text"]), 4))
        elif kind == "pii":
            rec["text"], rec["pii"] = pii_document(rng)
        elif kind == "spam":
            rec["text"] = spam_document(rng)
        elif kind == "foreign":
            rec["lang"] = rng.choice(sorted(FOREIGN))
            rec["text"] = foreign_document(rng, rec["lang"])
        elif kind == "short":
            rec["text"] = _sentence(rng)
        elif kind == "toxic":
            rec["text"] = toxic_document(rng)
        else:
            rec["text"] = boilerplate_document(rng)
        records.append(rec)
    return records
