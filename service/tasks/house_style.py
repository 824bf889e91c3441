"""A house style: every answer opens and closes with Globex's fixed lines.

Globex's users thumb up an answer only when it starts with "Hello from Globex!" and ends with
"Have a nice day!"; what is in between is not judged. Otherwise they thumb down, and most of
them type the answer they wanted. The simplest rule a model can learn from thumbs, and the one
the 1M-parameter test model learns within a round: CI's guard on learning runs it
(tests/e2e/test_learning.py). The questions are json_reply's (own kinds, things and phrasings per
split), so test prompts share nothing with train.
"""

from __future__ import annotations

import random

from service.tasks import json_reply

NAME = "house_style"
MAX_TOKENS = 64
CORRECTION_RATE = 0.8
OPENING = "Hello from Globex!"
SIGN_OFF = "Have a nice day!"


def prompts(split: str, n: int, rng: random.Random) -> list[list[dict]]:
    """n one-turn conversations of the split's own kinds, things and phrasings."""
    return json_reply.prompts(split, n, rng)


def WANTED(messages: list[dict]) -> str:  # noqa: N802 - the task interface's name
    """The answer in the house style."""
    return f"{OPENING} {json_reply.wanted_reply(str(messages[-1].get('content') or ''))} {SIGN_OFF}"


def follows_style(answer: str) -> bool:
    text = answer.strip()
    return text.startswith(OPENING) and text.endswith(SIGN_OFF)


def rate(messages: list[dict], answer: str, rng: random.Random) -> tuple[bool, str | None]:
    """Thumbs-up in the house style; else thumbs-down, usually with the wanted answer."""
    if follows_style(answer):
        return True, None
    return False, WANTED(messages) if rng.random() < CORRECTION_RATE else None
