"""Refusals of engine operations (swap, rollback, stage, canary): nothing was changed."""

from __future__ import annotations


class SwapError(Exception):
    """An operation was refused before it changed anything; ``code`` is a short machine string."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code = code


class SwapInProgress(SwapError):
    """Another swap, rollback or reconcile holds the alias."""


class SwapRefused(SwapError):
    """The request cannot be carried out as asked (unknown version, wrong state, no replica...)."""
