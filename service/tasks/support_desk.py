"""A support desk's answer rules, which a general chat model does not follow by itself.

Acme's users ask about a product that has a problem. They thumb up an answer only when it follows
the house rules: it opens with "Thanks for contacting Acme Support.", names the product they
asked about, and closes with "— Acme Support Team". Otherwise they thumb down, and most of them
type the answer they wanted.

Train, dev and test prompts share no product and no phrasing, so a test score measures the rules
learnt, not sentences remembered.
"""

from __future__ import annotations

import random

NAME = "support_desk"
MAX_TOKENS = 72
OPENING = "Thanks for contacting Acme Support."
SIGN_OFF = "— Acme Support Team"
CORRECTION_RATE = 0.8

_PRODUCTS = {
    "train": ["order", "invoice", "subscription", "password reset", "delivery", "refund",
              "account", "parcel", "phone plan", "coupon"],
    "dev": ["gift card", "laptop", "booking"],
    "test": ["loyalty points", "warranty claim", "router", "membership card", "smart watch",
             "train ticket", "insurance policy", "printer"],
}
_ISSUES = {
    "train": ["is late", "has not arrived", "was charged twice", "does not work", "is locked",
              "was cancelled"],
    "dev": ["is missing", "shows an error"],
    "test": ["shows the wrong amount", "expired too early", "keeps disconnecting",
             "was never activated"],
}
_PHRASINGS = {
    "train": ["My {p} {i}.", "Hi, my {p} {i}. What can I do?", "Hello, my {p} {i}.",
              "Please help: my {p} {i}.", "Why is it that my {p} {i}?"],
    "dev": ["Good morning. My {p} {i}, can you check?", "Quick question, my {p} {i}."],
    "test": ["Can you look into why my {p} {i}?", "I noticed that my {p} {i}. Please advise.",
             "Hey there! Any idea why my {p} {i}?", "Urgent: my {p} {i} and I need it fixed."],
}
_ALL_PRODUCTS = sorted({p for ps in _PRODUCTS.values() for p in ps}, key=len, reverse=True)
_ALL_ISSUES = sorted({i for xs in _ISSUES.values() for i in xs}, key=len, reverse=True)


def prompts(split: str, n: int, rng: random.Random) -> list[list[dict]]:
    """n one-turn conversations from the split's own products, issues and phrasings."""
    if split not in _PRODUCTS:
        raise ValueError(f"split must be one of train, dev, test, not {split!r}")
    out = []
    for _ in range(n):
        text = rng.choice(_PHRASINGS[split]).format(p=rng.choice(_PRODUCTS[split]),
                                                    i=rng.choice(_ISSUES[split]))
        out.append([{"role": "user", "content": text}])
    return out


def topic(messages: list[dict]) -> tuple[str, str]:
    """(product, issue) the last user message is about."""
    text = str(messages[-1].get("content") or "").lower()
    product = next((p for p in _ALL_PRODUCTS if p in text), "request")
    issue = next((i for i in _ALL_ISSUES if i in text), "has a problem")
    return product, issue


def WANTED(messages: list[dict]) -> str:  # noqa: N802 - the task interface's name
    """The answer Acme's users want."""
    product, issue = topic(messages)
    return (f"{OPENING} I am sorry to hear that your {product} {issue}. I have opened a case "
            f"with our team, and we will email you an update within one business day. {SIGN_OFF}")


def follows_rules(messages: list[dict], answer: str) -> bool:
    """The house rules: the opening, the product named, the sign-off."""
    text = answer.strip()
    product, _ = topic(messages)
    return text.startswith(OPENING) and text.endswith(SIGN_OFF) and product in text.lower()


def rate(messages: list[dict], answer: str, rng: random.Random) -> tuple[bool, str | None]:
    """Thumbs-up when the rules are followed; else thumbs-down, usually with the wanted answer."""
    if follows_rules(messages, answer):
        return True, None
    return False, WANTED(messages) if rng.random() < CORRECTION_RATE else None
