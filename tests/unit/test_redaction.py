"""PII/secret redaction: every kind redacted, look-alikes left alone, the Presidio adapter wired right."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import string
import sys
import types
from dataclasses import dataclass

import pytest

from workers.redaction import (
    NullRedactor,
    PresidioRedactor,
    Redactor,
    RedactorUnavailable,
    RegexRedactor,
    get_redactor,
    iban_valid,
    luhn_valid,
)

FW_KEY = "fw_3kT9xYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456-_ab"  # the shape service.security issues
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx7\nq9Zk2\n-----END RSA PRIVATE KEY-----"

POSITIVES = [
    # (case id, text, sensitive span, placeholder that must replace it)
    ("email", "write to jane.doe+news@mail.example.org today", "jane.doe+news@mail.example.org", "[EMAIL]"),
    ("email-end-of-sentence", "Mail bob@example.com.", "bob@example.com", "[EMAIL]"),
    ("phone-intl-spaced", "call +44 20 7946 0958 now", "+44 20 7946 0958", "[PHONE]"),
    ("phone-intl-compact", "ring +4915112345678 please", "+4915112345678", "[PHONE]"),
    ("phone-intl-trunk", "office +49 (0)30 1234 5678", "+49 (0)30 1234 5678", "[PHONE]"),
    ("phone-us-parens", "cell (415) 555-0132.", "(415) 555-0132", "[PHONE]"),
    ("phone-us-dashes", "cell 415-555-0132", "415-555-0132", "[PHONE]"),
    ("phone-us-dots", "cell 415.555.0132", "415.555.0132", "[PHONE]"),
    ("phone-us-country", "cell 1-415-555-0132", "1-415-555-0132", "[PHONE]"),
    ("phone-us-plus1", "cell +1 415 555 0132", "+1 415 555 0132", "[PHONE]"),
    ("card-spaced", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", "[CARD]"),
    ("card-dashed", "card 4111-1111-1111-1111", "4111-1111-1111-1111", "[CARD]"),
    ("card-contiguous", "mc 5500005555555559", "5500005555555559", "[CARD]"),
    ("card-amex", "amex 3782 822463 10005", "3782 822463 10005", "[CARD]"),
    ("card-after-short-number", "item 12 4111 1111 1111 1111", "4111 1111 1111 1111", "[CARD]"),
    ("openai-key", "key sk-proj-A1b2C3d4E5f6G7h8I9j0K", "sk-proj-A1b2C3d4E5f6G7h8I9j0K", "[SECRET]"),
    ("flywheel-key", f"use {FW_KEY} for the gateway", FW_KEY, "[SECRET]"),
    ("github-token", "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "ghp_a1B2c3D4e5F6", "[SECRET]"),
    ("aws-access-key", "id AKIAIOSFODNN7EXAMPLE ok", "AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
    ("stripe", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "[SECRET]"),
    ("slack", "xoxb-123456789012-abcdefABCDEF", "xoxb-123456789012", "[SECRET]"),
    ("bearer", "Authorization: Bearer abc123.def456-ghi", "abc123.def456-ghi", "Bearer [SECRET]"),
    ("basic-auth", "Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA==", "[SECRET]"),
    ("jwt", f"token {JWT}", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "[SECRET]"),
    (
        "hex-secret",
        "secret " + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "9f86d0818",
        "[SECRET]",
    ),
    ("aws-secret-base64", "aws wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "[SECRET]"),
    ("password-assignment", "password=hunter2!x", "hunter2!x", "password=[SECRET]"),
    ("api-key-quoted", 'config api_key: "q8w7e6r5t4"', "q8w7e6r5t4", 'api_key: "[SECRET]"'),
    ("pem-private-key", f"here:\n{PEM}\nthanks", "MIIEowIBAAKCAQEAx7", "[SECRET]"),
    ("ipv4", "server at 192.168.10.20.", "192.168.10.20", "[IP]"),
    ("ssn", "ssn 123-45-6789", "123-45-6789", "[SSN]"),
    ("iban", "pay GB82 WEST 1234 5698 7654 32 now", "GB82 WEST 1234 5698 7654 32", "[IBAN]"),
]

NEGATIVES = [
    # (case id, text that must come back unchanged)
    ("order-number-fails-luhn", "Order 1234 5678 9012 3456 has shipped"),
    ("card-typo-fails-luhn", "Invoice 4111 1111 1111 1112"),
    ("long-id-fails-luhn", "tracking 10000000000000 and 12345678901234"),
    ("dates", "Meeting on 2024-01-15 at 10:30, or 15/01/2024, or 01.02.2024"),
    ("versions", "Python 3.11.4, CUDA 12.1, torch 2.11.0"),
    ("plain-numbers", "The answer is 42, pi is 3.14159265358979, price $1,299.99 for 3 items"),
    ("bare-ten-digits", "order 4155550132"),  # phones need separators: bare runs are usually ids
    ("isbn", "ISBN 978-0-306-40615-7"),
    ("english-bearer", "the bearer of bad news, and bearer instruments."),
    ("token-talk", "use the token embeddings; max tokens 256"),
    ("identifier", "TransformerEncoderLayer with 12 heads in module_v2"),
    ("uuid", "interaction 550e8400-e29b-41d4-a716-446655440000"),
    ("at-without-domain", "ping @alice or user@localhost"),
    ("short-password-word", "password: abc"),
    ("url-path", "see github.com/huggingface/transformers/blob/main/src/Module1/File.py"),
]


@pytest.mark.parametrize(("case", "text", "span", "placeholder"), POSITIVES, ids=[p[0] for p in POSITIVES])
def test_regex_redacts_each_kind(case: str, text: str, span: str, placeholder: str) -> None:
    out = RegexRedactor().redact(text)
    assert span not in out, out
    assert placeholder in out, out


@pytest.mark.parametrize(("case", "text"), NEGATIVES, ids=[n[0] for n in NEGATIVES])
def test_regex_leaves_lookalikes_alone(case: str, text: str) -> None:
    assert RegexRedactor().redact(text) == text


def test_negative_fixtures_really_fail_the_checksums() -> None:
    # Guards the negatives above: they must be near-misses, not trivially different shapes.
    assert not luhn_valid("1234567890123456")
    assert not luhn_valid("4111111111111112")
    assert luhn_valid("4111111111111111")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert RegexRedactor().redact("pay GB82 WEST 1234 5698 7654 33") == "pay GB82 WEST 1234 5698 7654 33"


def test_secret_with_digits_is_not_half_eaten_by_number_rules() -> None:
    # Secrets run first: a key full of digit runs must become one placeholder, not fragments.
    assert RegexRedactor().redact("key sk-1234567890123456789012345") == "key [SECRET]"


def test_adjacent_phone_numbers_are_both_redacted() -> None:
    # A greedy match over two numbers (19 digits) must still redact, not be rejected as too long.
    out = RegexRedactor().redact("+33 86 8880 8885 415-555-0132 and +44 20 7946 0958 +44 20 7946 0959")
    assert out == "[PHONE] and [PHONE] [PHONE]"


def test_card_followed_by_a_phone_is_still_a_card() -> None:
    # The optional fifth card group grabs "415"; the sixteen digits alone must still be judged.
    out = RegexRedactor().redact("card 4111 1111 1111 1111 415-555-0132")
    assert out == "card [CARD] [PHONE]"


def test_surrounding_text_is_preserved() -> None:
    out = RegexRedactor().redact("Hi Ann, mail ann@example.com or call (415) 555-0132. Thanks!")
    assert out == "Hi Ann, mail [EMAIL] or call [PHONE]. Thanks!"


def test_redaction_is_idempotent() -> None:
    r = RegexRedactor()
    text = " ".join(p[1] for p in POSITIVES)
    once = r.redact(text)
    assert r.redact(once) == once


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always satisfies Luhn")


def _random_pii(rng: random.Random) -> list[str]:
    """One of each kind, randomly generated and formatted."""
    card = _luhn_complete(rng.choice(["4", "51", "37"]), 16, rng)
    sep = rng.choice(["", " ", "-"])
    card_fmt = sep.join(card[i : i + 4] for i in range(0, 16, 4))
    local = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 10)))
    email = f"{local}.{rng.randint(0, 99)}@{rng.choice(['example.com', 'mail.co.uk', 'corp.io'])}"
    area, mid, last = rng.randint(200, 999), rng.randint(200, 999), rng.randint(0, 9999)
    us = rng.choice([f"({area}) {mid}-{last:04d}", f"{area}-{mid}-{last:04d}", f"{area}.{mid}.{last:04d}"])
    intl = (
        f"+{rng.choice(['44', '49', '33', '61'])} {rng.randint(10, 99)} {rng.randint(1000, 9999)} {last:04d}"
    )
    alphabet = string.ascii_letters + string.digits
    key = rng.choice(["sk-", "fw_", "ghp_", "hf_"]) + "".join(rng.choice(alphabet) for _ in range(36))
    aws = "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    return [card_fmt, email, us, intl, key, aws]


@pytest.mark.parametrize("seed", range(300))
def test_random_pii_in_random_text_never_survives(seed: int) -> None:
    rng = random.Random(seed)
    pii = _random_pii(rng)
    words = ["please", "the", "answer", "is", "here", "and", "call", "me", "at", "or", "use"]
    parts = [rng.choice(words) for _ in range(12)]
    for p in pii:
        parts.insert(rng.randrange(len(parts) + 1), p)
    text = " ".join(parts) + rng.choice([".", "!", "", "\n"])
    out = RegexRedactor().redact(text)
    for p in pii:
        assert p not in out, (p, out)
    # Every filler word survives: redaction must not eat ordinary words next to PII.
    assert [w for w in out.replace(".", " ").replace("!", " ").split() if w in words] == [
        w for w in parts if w in words
    ]


def test_rules_can_be_skipped() -> None:
    out = RegexRedactor(skip={"ipv4"}).redact("host 10.0.0.1 mail a@b.io")
    assert out == "host 10.0.0.1 mail [EMAIL]"


def test_get_redactor_by_name() -> None:
    assert isinstance(get_redactor("regex"), RegexRedactor)
    assert isinstance(get_redactor(" Regex "), RegexRedactor)
    none = get_redactor("none")
    assert isinstance(none, NullRedactor)
    assert none.redact("a@b.io") == "a@b.io"
    assert isinstance(get_redactor("regex"), Redactor)  # satisfies the protocol
    with pytest.raises(ValueError, match="unknown redactor"):
        get_redactor("magic")


@pytest.mark.skipif(
    importlib.util.find_spec("presidio_analyzer") is not None, reason="presidio is installed here"
)
def test_presidio_missing_gives_a_clear_error() -> None:
    with pytest.raises(RedactorUnavailable, match="pip install presidio-analyzer presidio-anonymizer"):
        get_redactor("presidio")


@dataclass
class _FakeResult:
    entity_type: str
    start: int
    end: int
    score: float = 0.9


def _fake_presidio(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Install stand-ins for presidio's public API; record how the adapter calls it."""
    calls: dict[str, list] = {"analyze": [], "anonymize": [], "engines": []}

    class AnalyzerEngine:
        def __init__(self) -> None:
            calls["engines"].append("analyzer")

        def analyze(self, text, language, entities=None, score_threshold=None, **_):
            calls["analyze"].append({"text": text, "language": language, "score_threshold": score_threshold})
            i = text.find("John Smith")
            return [_FakeResult("PERSON", i, i + len("John Smith"))] if i >= 0 else []

    class OperatorConfig:
        def __init__(self, operator_name, params=None) -> None:
            self.operator_name, self.params = operator_name, params or {}

    class EngineResult:
        def __init__(self, text: str) -> None:
            self.text = text

    class AnonymizerEngine:
        def __init__(self) -> None:
            calls["engines"].append("anonymizer")

        def anonymize(self, text, analyzer_results, operators=None):
            calls["anonymize"].append(operators)
            for r in sorted(analyzer_results, key=lambda r: -r.start):
                op = operators.get(r.entity_type, operators["DEFAULT"])
                assert op.operator_name == "replace"
                text = text[: r.start] + op.params["new_value"] + text[r.end :]
            return EngineResult(text)

    analyzer = types.ModuleType("presidio_analyzer")
    analyzer.__spec__ = importlib.machinery.ModuleSpec("presidio_analyzer", None)
    analyzer.AnalyzerEngine = AnalyzerEngine
    anonymizer = types.ModuleType("presidio_anonymizer")
    anonymizer.__spec__ = importlib.machinery.ModuleSpec("presidio_anonymizer", None)
    anonymizer.AnonymizerEngine = AnonymizerEngine
    entities = types.ModuleType("presidio_anonymizer.entities")
    entities.__spec__ = importlib.machinery.ModuleSpec("presidio_anonymizer.entities", None)
    entities.OperatorConfig = OperatorConfig
    monkeypatch.setitem(sys.modules, "presidio_analyzer", analyzer)
    monkeypatch.setitem(sys.modules, "presidio_anonymizer", anonymizer)
    monkeypatch.setitem(sys.modules, "presidio_anonymizer.entities", entities)
    return calls


def test_presidio_adapter_uses_public_api_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_presidio(monkeypatch)
    red = get_redactor("presidio")
    assert calls["engines"] == []  # the spaCy-loading engines are built on first use only
    out = red.redact("I am John Smith, mail john@example.com")
    assert out == "I am [PERSON], mail [EMAIL]"
    # The regex pass ran first: presidio never saw the raw email.
    assert "john@example.com" not in calls["analyze"][0]["text"]
    assert calls["analyze"][0]["language"] == "en"
    assert calls["anonymize"][0]["DEFAULT"].params["new_value"] == "[PII]"
    red.redact("John Smith again")
    assert calls["engines"] == ["analyzer", "anonymizer"]  # built once, reused


def test_presidio_adapter_skips_engines_when_nothing_found(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_presidio(monkeypatch)
    red = PresidioRedactor(also_regex=False)
    assert red.redact("nothing personal") == "nothing personal"
    assert red.redact("   ") == "   "
    assert len(calls["analyze"]) == 1 and calls["anonymize"] == []
