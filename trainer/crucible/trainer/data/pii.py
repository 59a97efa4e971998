"""PII redaction with typed placeholders.

Secrets (cloud keys, tokens, private keys, ``password=...`` values) become ``<SECRET>``,
e-mail addresses ``<EMAIL>``, Luhn-valid 13-19 digit card numbers ``<CREDIT_CARD>``, IPv4 and
IPv6 addresses ``<IP_ADDRESS>`` and phone numbers ``<PHONE>``. Order matters: secrets first
(they may contain '@' or digits), cards before phones (a card looks like a long phone).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from crucible.trainer.config.data import PiiStep
from crucible.trainer.data.document import Document
from crucible.trainer.data.step import Modifier

# (literal that every match contains, pattern): the literal gates the regex, which is much
# slower than a substring search.
SECRET_PATTERNS = [
    ("PRIVATE KEY-----", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    ("AKIA", r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key ids
    ("ASIA", r"\bASIA[0-9A-Z]{16}\b"),
    ("gh", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),  # GitHub tokens
    ("github_pat_", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    ("glpat-", r"\bglpat-[A-Za-z0-9_-]{20,}\b"),  # GitLab
    ("xox", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    ("AIza", r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API keys
    ("_live_", r"\b(?:sk|pk|rk)_live_[0-9A-Za-z]{16,}\b"),  # Stripe
    ("_test_", r"\b(?:sk|pk|rk)_test_[0-9A-Za-z]{16,}\b"),
    ("sk-", r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI / Anthropic style
    ("hf_", r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
    ("eyJ", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
]
SECRETS = [(literal, re.compile(pattern)) for literal, pattern in SECRET_PATTERNS]
# key = value assignments: keep the key, redact the value.
SECRET_KEYWORDS = ("key", "secret", "token", "passw", "pwd")
ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd|pwd)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{8,})"
)
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
# Boundaries are checked in the callbacks: a leading look-behind stops `re` from scanning fast.
CARD = re.compile(r"\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]|\.\d)")
IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
PHONE = re.compile(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?!\w)")
# Cards, IPv4 addresses and phone numbers all contain a run like this; most documents don't.
_NUMERIC_RUN = re.compile(r"\d[\d .()+-]{5,}\d")
_COLON_PAIR = re.compile(r":[0-9A-Fa-f]{0,4}:")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _preceded_by(match: re.Match[str], chars: str) -> bool:
    start = match.start()
    return start > 0 and match.string[start - 1] in chars


def _card(match: re.Match[str]) -> str:
    if _preceded_by(match, "0123456789-"):
        return match.group()
    digits = re.sub(r"[ -]", "", match.group())
    if 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
        return "<CREDIT_CARD>"
    return match.group()


def _ipv4(match: re.Match[str]) -> str:
    return match.group() if _preceded_by(match, "0123456789.") else "<IP_ADDRESS>"


def _phone(match: re.Match[str]) -> str:
    start = match.start()
    if start > 0 and (match.string[start - 1].isalnum() or match.string[start - 1] in "_+"):
        return match.group()
    return "<PHONE>"


def _ipv6(match: re.Match[str]) -> str:
    candidate = match.group()
    if candidate.count(":") < 2 or candidate.strip(":") == "":
        return candidate
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return candidate
    return "<IP_ADDRESS>"


class PiiRedactor(Modifier):
    name = "pii"

    def __init__(self, config: PiiStep) -> None:
        super().__init__()
        self.config = config

    def modify(self, doc: Document) -> int:
        cfg = self.config
        text = doc.text
        changes = 0

        def apply(kind: str, pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str]) -> None:
            nonlocal text, changes
            new_text = pattern.sub(replacement, text)
            if new_text != text:
                added = new_text.count("<") - text.count("<")
                self.stats.changes[kind] += max(added, 1)
                changes += 1
                text = new_text

        if cfg.secrets:
            for literal, pattern in SECRETS:
                if literal in text:
                    apply("secret", pattern, "<SECRET>")
            lower = text.lower()
            if ("=" in text or ":" in text) and any(k in lower for k in SECRET_KEYWORDS):
                apply("secret", ASSIGNED_SECRET, r"\1<SECRET>")
        if cfg.email and "@" in text:
            apply("email", EMAIL, "<EMAIL>")
        if (cfg.credit_card or cfg.ip or cfg.phone) and _NUMERIC_RUN.search(text):
            if cfg.credit_card:
                apply("credit_card", CARD, _card)
            if cfg.ip:
                apply("ip", IPV4, _ipv4)
            if cfg.phone:
                apply("phone", PHONE, _phone)
        if cfg.ip and _COLON_PAIR.search(text):
            apply("ip", IPV6, _ipv6)
        doc.text = text
        return changes
