"""How an export reports progress: a callback taking (stage, fraction of that stage done)."""

from __future__ import annotations

from collections.abc import Callable

# (stage, fraction of that stage done); run_export names stages "merge: ...", "gguf q8_0: ...".
Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """The default callback: reports nothing."""
    return None
