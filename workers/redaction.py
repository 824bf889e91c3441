"""PII and secret redaction for training data: a small protocol, a regex default, a Presidio adapter."""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
SECRET = "[SECRET]"
IP = "[IP]"
SSN = "[SSN]"
IBAN = "[IBAN]"
PII = "[PII]"


class RedactorUnavailable(RuntimeError):
    """A redactor backend is configured but its optional dependency is missing."""


@runtime_checkable
class Redactor(Protocol):
    """Anything that turns text into text with personal data and secrets replaced."""

    def redact(self, text: str) -> str:
        """Return `text` with sensitive spans replaced by typed placeholders."""
        ...


class NullRedactor:
    """Redacts nothing: for data that is already clean or synthetic."""

    name = "none"

    def redact(self, text: str) -> str:
        """Return the text unchanged."""
        return text


# ---------------------------------------------------------------------------------------------
# Validators used by the regex rules (a match that fails validation is left as it was).


def luhn_valid(digits: str) -> bool:
    """True when a digit string passes the Luhn checksum used by payment cards."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """True when a string is an IBAN with a correct ISO 13616 mod-97 check."""
    s = re.sub(r"[\s-]", "", candidate).upper()
    if not (15 <= len(s) <= 34) or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = "".join(str(int(ch, 36)) for ch in rearranged)
    except ValueError:
        return False
    return int(number) % 97 == 1


def shannon_entropy(s: str) -> float:
    """Bits per character of `s` under its own symbol frequencies."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _credential_like(token: str) -> bool:
    """A token with a digit, a URL-safe symbol, or mixed case (not a plain word)."""
    return (
        any(c.isdigit() for c in token)
        or any(c in "-._~+/=" for c in token)
        or (any(c.isupper() for c in token) and any(c.islower() for c in token) and not token.istitle())
    )


def _card(m: re.Match[str]) -> str:
    """[CARD] when the digits pass Luhn; the text unchanged otherwise."""
    text = m.group(0)
    if luhn_valid(_digits(text)):
        return CARD
    # 4-4-4-4 followed by a short unrelated number ("... 1111 415-555-0132"): the optional fifth
    # group took "415". Judge the sixteen digits alone.
    if m.group(1) and len(_digits(text)) > 16 and luhn_valid(_digits(text[:19])):
        return CARD + text[19:]
    return text


def _char_class(c: str) -> str:
    return "u" if c.isupper() else "l" if c.islower() else "d"


def _looks_random(token: str) -> bool:
    """Heuristic for unprefixed secrets: long hex, or base64 mixing all classes in short runs.

    Random base64 switches between upper/lower/digit every ~1.6 characters; words, paths and
    CamelCase identifiers run for 3+ characters per class. Erring towards redaction is deliberate:
    a lost identifier costs little, a leaked key a lot.
    """
    body = re.sub(r"[^A-Za-z0-9]", "", token)
    has_digit = any(c.isdigit() for c in body)
    if re.fullmatch(r"[0-9a-fA-F]+", token.rstrip("=")):
        # Long hex with letters and digits: hashes, tokens, hex-encoded keys.
        return has_digit and any(c.isalpha() for c in body)
    if not (has_digit and any(c.isupper() for c in body) and any(c.islower() for c in body)):
        return False
    runs = sum(1 for a, b in itertools.pairwise(body) if _char_class(a) != _char_class(b)) + 1
    return len(body) / runs <= 3.0 and shannon_entropy(body) >= 3.5


# ---------------------------------------------------------------------------------------------
# Rules. Order matters: secrets first (they contain digit runs that would otherwise be half-eaten
# by card/phone rules), then emails, then number-shaped PII.

Replacement = str | Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class RegexRule:
    """One pattern, what it becomes, and an optional validator on the matched text."""

    kind: str
    pattern: re.Pattern[str]
    replacement: Replacement
    validate: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        if self.pattern.fullmatch(""):
            raise ValueError(f"rule {self.kind!r} matches the empty string")

    def apply(self, text: str) -> str:
        """Replace every (validated) match of this rule in `text`."""
        out: list[str] = []
        pos = 0
        while (m := self.pattern.search(text, pos)) is not None:
            if self.validate is not None and not self.validate(m.group(0)):
                # Rescan from the next character: a valid match may start inside a rejected one.
                out.append(text[pos : m.start() + 1])
                pos = m.start() + 1
                continue
            out.append(text[pos : m.start()])
            out.append(self.replacement(m) if callable(self.replacement) else m.expand(self.replacement))
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)


_TOKEN_CHARS = r"A-Za-z0-9_\-"

DEFAULT_RULES: tuple[RegexRule, ...] = (
    RegexRule(
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
        SECRET,
    ),
    RegexRule("jwt", re.compile(rf"\beyJ[{_TOKEN_CHARS}]{{8,}}(?:\.[{_TOKEN_CHARS}]+){{0,2}}"), SECRET),
    RegexRule(
        "api_key",
        re.compile(
            r"\b(?:"
            r"(?:sk|pk|rk)-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_\-]{16,}"  # OpenAI / Anthropic style
            r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
            r"|fw_[A-Za-z0-9_\-]{16,}"  # Flywheel's own API keys
            r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
            r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
            r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
            r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
            r"|AIza[0-9A-Za-z_\-]{35}"  # Google
            r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}"  # AWS access key ids
            r")(?![A-Za-z0-9_\-])"
        ),
        SECRET,
    ),
    RegexRule(
        "bearer",
        re.compile(r"(?i)\b(bearer|authorization:\s*basic)(\s+)([A-Za-z0-9\-._~+/]{7,}[A-Za-z0-9\-_~+/]=*)"),
        rf"\1\2{SECRET}",
        # "the bearer instruments" is English; a credential has a digit, a symbol or mixed case.
        validate=lambda s: _credential_like(s.split()[-1]),
    ),
    RegexRule(
        "assigned_secret",
        # `password: hunter22`, `api_key="..."`: keep the name so the sentence still reads.
        re.compile(
            r"(?i)\b((?:[a-z0-9]+[_-])*(?:password|passwd|pwd|passphrase|secret|api[_-]?key|apikey"
            r"|access[_-]?key|access[_-]?token|auth[_-]?token|token|client[_-]?secret|private[_-]?key))"
            r"(\s*[:=]\s*)([\"']?)([^\s\"',;]{6,})\3"
        ),
        rf"\1\2\3{SECRET}\3",
    ),
    RegexRule(
        "email",
        re.compile(
            r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"
        ),
        EMAIL,
    ),
    RegexRule(
        "high_entropy",
        re.compile(r"(?<![A-Za-z0-9+/=_\-])[A-Za-z0-9+/_\-]{32,}={0,2}(?![A-Za-z0-9+/=_\-])"),
        SECRET,
        validate=_looks_random,
    ),
    RegexRule(
        "iban",
        re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b"),
        IBAN,
        validate=iban_valid,
    ),
    RegexRule(
        "card",
        # Contiguous 13-19 digits, or the printed groupings (4-4-4-4[-3], Amex 4-6-5, Diners 4-6-4).
        re.compile(
            r"(?<![\d\-.+])(?:\d{13,19}"
            r"|\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?"
            r"|\d{4}([ \-])\d{6}\2\d{4,5})(?![\d\-]\d|\d)"
        ),
        lambda m: _card(m),
    ),
    RegexRule(
        "ssn", re.compile(r"(?<![\d\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d\-])"), SSN
    ),
    RegexRule(
        "phone_intl",
        re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(\d{1,4}\))?(?:[ .\-]?\d{1,5}){1,6}(?![\w])"),
        PHONE,
        # Fewer than 8 digits is a price or a score. No upper bound: more than E.164's 15 is two
        # numbers written side by side, and one placeholder over both leaks neither.
        validate=lambda s: len(_digits(s)) >= 8,
    ),
    RegexRule(
        "phone_us",
        # Needs separators or parentheses: a bare 10-digit run is as likely an order number.
        re.compile(r"(?<![\w+\-.])(?:1[ .\-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|\.\d)"),
        PHONE,
    ),
    RegexRule(
        "ipv4",
        re.compile(
            r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
        ),
        IP,
    ),
)


class RegexRedactor:
    """Default redactor: regular expressions plus checksums (Luhn, IBAN mod-97) against false hits.

    Catches emails, phone numbers (international `+..` and formatted US), payment cards, IBANs,
    US SSNs, IPv4 addresses and secrets (vendor-prefixed API keys, `Bearer` tokens, JWTs,
    `password=...` assignments, PEM private keys, long hex/base64 blobs). It does not find names
    or addresses: use `PresidioRedactor` for those.
    """

    name = "regex"

    def __init__(self, rules: Iterable[RegexRule] = DEFAULT_RULES, *, skip: Iterable[str] = ()) -> None:
        skipped = set(skip)
        self.rules: tuple[RegexRule, ...] = tuple(r for r in rules if r.kind not in skipped)

    def redact(self, text: str) -> str:
        """Apply every rule in order."""
        for rule in self.rules:
            text = rule.apply(text)
        return text


# Presidio entity -> our placeholder; anything else becomes [PII].
PRESIDIO_PLACEHOLDERS: Mapping[str, str] = {
    "EMAIL_ADDRESS": EMAIL,
    "PHONE_NUMBER": PHONE,
    "CREDIT_CARD": CARD,
    "IP_ADDRESS": IP,
    "US_SSN": SSN,
    "IBAN_CODE": IBAN,
    "PERSON": "[PERSON]",
    "LOCATION": "[LOCATION]",
    "URL": "[URL]",
    "CRYPTO": SECRET,
    "US_BANK_NUMBER": "[ACCOUNT]",
    "US_PASSPORT": "[ID]",
    "US_DRIVER_LICENSE": "[ID]",
}


@dataclass
class PresidioRedactor:
    """Adapter over presidio-analyzer + presidio-anonymizer (optional dependencies, imported lazily).

    Presidio adds NER-based entities (names, locations) that regexes cannot find. It does not know
    vendor API keys, so by default the regex redactor runs first and Presidio sees its output.
    """

    language: str = "en"
    entities: list[str] | None = None
    score_threshold: float = 0.5
    placeholders: Mapping[str, str] = field(default_factory=lambda: dict(PRESIDIO_PLACEHOLDERS))
    also_regex: bool = True
    name: str = "presidio"
    _analyzer: Any = field(default=None, init=False, repr=False)
    _anonymizer: Any = field(default=None, init=False, repr=False)
    _operators: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Fail at configuration time, not halfway through a training run.
        missing = [
            m for m in ("presidio_analyzer", "presidio_anonymizer") if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise RedactorUnavailable(
                "redactor 'presidio' needs the optional packages presidio-analyzer and presidio-anonymizer "
                f"(missing: {', '.join(missing)}); install them with "
                "`pip install presidio-analyzer presidio-anonymizer` plus a spaCy model "
                "(`python -m spacy download en_core_web_lg`), or use redactor 'regex'"
            )
        self._regex = RegexRedactor() if self.also_regex else None

    def _engines(self) -> tuple[Any, Any, dict[str, Any]]:
        """Build the engines on first use: the analyzer loads a spaCy model (seconds, ~GB)."""
        if self._analyzer is None:
            from presidio_analyzer import AnalyzerEngine
            from presidio_anonymizer import AnonymizerEngine
            from presidio_anonymizer.entities import OperatorConfig

            ops = {k: OperatorConfig("replace", {"new_value": v}) for k, v in self.placeholders.items()}
            ops["DEFAULT"] = OperatorConfig("replace", {"new_value": PII})
            self._analyzer, self._anonymizer, self._operators = AnalyzerEngine(), AnonymizerEngine(), ops
        assert self._operators is not None
        return self._analyzer, self._anonymizer, self._operators

    def redact(self, text: str) -> str:
        """Regex pass (unless disabled), then Presidio analyze + replace."""
        if self._regex is not None:
            text = self._regex.redact(text)
        if not text.strip():
            return text
        analyzer, anonymizer, operators = self._engines()
        results = analyzer.analyze(
            text=text, language=self.language, entities=self.entities, score_threshold=self.score_threshold
        )
        if not results:
            return text
        return anonymizer.anonymize(text=text, analyzer_results=results, operators=operators).text


REDACTORS = ("regex", "presidio", "none")


def get_redactor(name: str) -> Redactor:
    """The redactor configured by name: "regex" (default), "presidio" or "none"."""
    key = (name or "regex").strip().lower()
    if key == "regex":
        return RegexRedactor()
    if key == "presidio":
        return PresidioRedactor()
    if key == "none":
        return NullRedactor()
    raise ValueError(f"unknown redactor {name!r}; expected one of {', '.join(REDACTORS)}")
