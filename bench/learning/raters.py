"""Who rates: honest users, and the adversaries a poisoned run mixes in.

An honest rater applies the task's rule (`task.rate`). A random rater thumbs up or down by a coin
flip and types nothing. An inverted rater applies the rule and posts the opposite: it thumbs up
the answers the users do not want (and SFT trains on thumbs-up answers, so these are the poison)
and thumbs down the ones they want, without a correction.
"""

from __future__ import annotations

import random

from service.tasks import Task

HONEST, RANDOM, INVERTED = "honest", "random", "inverted"
RATERS = 8  # rater ids user0..user7, as a product's users would post them


def assign(n: int, *, random_share: float, inverted_share: float, rng: random.Random) -> list[str]:
    """The kind of each of n raters: the given shares of random and inverted ones, placed by rng."""
    if not (0 <= random_share <= 1 and 0 <= inverted_share <= 1 and random_share + inverted_share <= 1):
        raise ValueError("random and inverted shares must be in [0, 1] and sum to at most 1")
    n_random, n_inverted = round(n * random_share), round(n * inverted_share)
    kinds = [RANDOM] * n_random + [INVERTED] * n_inverted + [HONEST] * (n - n_random - n_inverted)
    rng.shuffle(kinds)
    return kinds


def rate_as(kind: str, task: Task, messages: list[dict], answer: str,
            rng: random.Random) -> tuple[bool, str | None]:
    """(thumbs_up, correction) that a rater of this kind posts for this answer."""
    if kind == HONEST:
        return task.rate(messages, answer, rng)
    if kind == RANDOM:
        return rng.random() < 0.5, None
    if kind == INVERTED:
        up, _ = task.rate(messages, answer, rng)
        return not up, None
    raise ValueError(f"unknown rater kind {kind!r}")
