"""The gate's look at what users would see: the candidate's and the serving version's greedy
answers to held-out prompts that a user corrected, each compared with the correction.

Likelihoods (preference accuracy, NLL) say how the candidate scores text; they can rise for
a candidate whose answers got better, and stay flat for one whose answers got worse. This
says which version's answer is closer to what the user typed, prompt by prompt.
"""

from __future__ import annotations

import difflib
import re

_WORDS = re.compile(r"\w+|[^\w\s]")


def similarity(answer: str, wanted: str) -> float:
    """How close an answer is to the wanted one: the ratio of matching words and punctuation
    in order (difflib), 1.0 for identical text and 0.0 for nothing in common."""
    a, b = _WORDS.findall(answer.lower()), _WORDS.findall(wanted.lower())
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def compare(rows: list[tuple[str, str, str]]) -> dict:
    """Wins, losses and ties of the candidate over (candidate answer, reference answer,
    correction) rows, and the win rate among the decided ones (None when none was decided)."""
    wins = losses = 0
    for cand, ref, wanted in rows:
        d = similarity(cand, wanted) - similarity(ref, wanted)
        if d > 1e-9:
            wins += 1
        elif d < -1e-9:
            losses += 1
    decided = wins + losses
    return {"answer_wins": wins, "answer_losses": losses, "answer_ties": len(rows) - decided,
            "n_answers": len(rows), "answer_win_rate": wins / decided if decided else None}
