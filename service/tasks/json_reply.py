"""A format rule: an app's backend parses every answer as one JSON object.

Globex's app shows the bot's answers in its own widgets, so its users (the app's testers) thumb
up an answer only when the whole answer is one JSON object with exactly two keys: "reply", a
non-empty string, and "lang", which is "en". Anything around the object (a preamble, a code
fence, a second paragraph) breaks the parser and gets a thumbs-down; most of those come with the
answer the tester wanted typed in. The content of the reply is not judged: this task measures a
format learnt, the support-desk task a house style with the question's own words in it.

Train, dev and test ask different kinds of facts about different things in different phrasings
(capitals of other countries, other arithmetic, other words), so a test score measures the
format carried over to new questions, not answers remembered.
"""

from __future__ import annotations

import json
import random
import re

NAME = "json_reply"
MAX_TOKENS = 64
CORRECTION_RATE = 0.8
KEYS = ("reply", "lang")

_CAPITALS = {
    "train": {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
              "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi"},
    "dev": {"Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago"},
    "test": {"Brazil": "Brasília", "India": "New Delhi", "Greece": "Athens",
             "Mexico": "Mexico City", "Sweden": "Stockholm", "Australia": "Canberra"},
}
_OPPOSITES = {
    "train": {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
              "wet": "dry"},
    "dev": {"light": "dark", "loud": "quiet"},
    "test": {"early": "late", "full": "empty", "open": "closed", "young": "old",
             "strong": "weak"},
}
# Each split asks its own arithmetic with its own numbers.
_ARITHMETIC = {
    "train": ("plus", lambda a, b: a + b, range(1, 10)),
    "dev": ("minus", lambda a, b: a - b, range(10, 20)),
    "test": ("times", lambda a, b: a * b, range(2, 13)),
}
_PHRASINGS = {
    "train": {"capital": ["What is the capital of {x}?", "Name the capital city of {x}."],
              "math": ["What is {a} {op} {b}?", "Compute {a} {op} {b}."],
              "opposite": ["What is the opposite of {w}?", "Give me the opposite of '{w}'."]},
    "dev": {"capital": ["Which city is the capital of {x}?"],
            "math": ["Quick one: {a} {op} {b}?"],
            "opposite": ["Opposite of {w}?"]},
    "test": {"capital": ["I need the capital of {x}, please.", "{x}: which city is its capital?"],
             "math": ["How much is {a} {op} {b}?", "Could you work out {a} {op} {b} for me?"],
             "opposite": ["Which word means the reverse of {w}?",
                          "Tell me a word meaning the opposite of {w}."]},
}


def _item(split: str, rng: random.Random) -> tuple[str, str]:
    """(question, the reply a tester wants) of one kind drawn for this split."""
    kind = rng.choice(sorted(_PHRASINGS[split]))
    phrasing = rng.choice(_PHRASINGS[split][kind])
    if kind == "capital":
        country, city = rng.choice(sorted(_CAPITALS[split].items()))
        return phrasing.format(x=country), f"The capital of {country} is {city}."
    if kind == "opposite":
        word, opposite = rng.choice(sorted(_OPPOSITES[split].items()))
        return phrasing.format(w=word), f"The opposite of {word} is {opposite}."
    op, fn, numbers = _ARITHMETIC[split]
    a, b = rng.choice(numbers), rng.choice(numbers)
    return phrasing.format(a=a, op=op, b=b), f"{a} {op} {b} is {fn(a, b)}."


def prompts(split: str, n: int, rng: random.Random) -> list[list[dict]]:
    """n one-turn conversations of the split's own kinds, things and phrasings."""
    if split not in _PHRASINGS:
        raise ValueError(f"split must be one of train, dev, test, not {split!r}")
    return [[{"role": "user", "content": _item(split, rng)[0]}] for _ in range(n)]


def wanted_reply(question: str) -> str:
    """The reply a tester wants to this question (the fact asked for)."""
    for split in _PHRASINGS:
        for country, city in _CAPITALS[split].items():
            if re.search(rf"\b{re.escape(country)}\b", question):
                return f"The capital of {country} is {city}."
        for word, opposite in _OPPOSITES[split].items():
            asks = "opposite" in question.lower() or "reverse" in question.lower()
            if asks and re.search(rf"\b{re.escape(word)}\b", question):
                return f"The opposite of {word} is {opposite}."
        op, fn, _ = _ARITHMETIC[split]
        m = re.search(rf"(-?\d+) {op} (-?\d+)", question)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            return f"{a} {op} {b} is {fn(a, b)}."
    return "Sorry, I cannot answer that."


def WANTED(messages: list[dict]) -> str:  # noqa: N802 - the task interface's name
    """The answer Globex's testers want: the reply as the app's JSON object."""
    reply = wanted_reply(str(messages[-1].get("content") or ""))
    return json.dumps({"reply": reply, "lang": "en"}, ensure_ascii=False)


def follows_format(answer: str) -> bool:
    """The whole answer is one JSON object with a non-empty "reply" and "lang": "en"."""
    try:
        value = json.loads(answer.strip())
    except ValueError:
        return False
    return (isinstance(value, dict) and tuple(sorted(value)) == tuple(sorted(KEYS))
            and isinstance(value["reply"], str) and value["reply"].strip() != ""
            and value["lang"] == "en")


def rate(messages: list[dict], answer: str, rng: random.Random) -> tuple[bool, str | None]:
    """Thumbs-up for the app's format; else thumbs-down, usually with the wanted answer."""
    if follows_format(answer):
        return True, None
    return False, WANTED(messages) if rng.random() < CORRECTION_RATE else None
