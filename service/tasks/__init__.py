"""Simulated products as plug-ins: what users ask, and how they rate what they get.

A task is a Python module (or file) that defines:

- ``NAME: str``
- ``prompts(split, n, rng) -> list[list[dict]]``: ``n`` chat conversations (OpenAI message dicts)
  for ``split`` in "train", "dev", "test"; the task keeps test prompts disjoint from train ones in
  content and phrasing;
- ``rate(messages, answer, rng) -> (thumbs_up, correction or None)``;
- optionally ``WANTED(messages) -> str``, the answer users want (for oracle baselines only), and
  ``MAX_TOKENS``, the answer length the task needs.

The demo and the learning benchmark play a task through the public API only: workers never
import a task, so nothing of its hidden rule can reach training except through ratings.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

SPLITS = ("train", "dev", "test")
Messages = list[dict]


class TaskError(ValueError):
    """A task module that does not define what a task needs."""


@dataclass(frozen=True)
class Task:
    name: str
    prompts: Callable[[str, int, random.Random], list[Messages]]
    rate: Callable[[Messages, str, random.Random], tuple[bool, str | None]]
    wanted: Callable[[Messages], str] | None = None
    max_tokens: int = 64

    @classmethod
    def from_module(cls, module: ModuleType) -> Task:
        missing = [n for n in ("NAME", "prompts", "rate") if not hasattr(module, n)]
        if missing:
            raise TaskError(f"task {module.__name__} does not define {', '.join(missing)}")
        return cls(name=str(module.NAME), prompts=module.prompts, rate=module.rate,
                   wanted=getattr(module, "WANTED", None),
                   max_tokens=int(getattr(module, "MAX_TOKENS", 64)))


def load_task(spec: str) -> Task:
    """A task from a file path, a module name, or a short name of a shipped task."""
    path = Path(spec)
    if path.suffix == ".py":
        if not path.is_file():
            raise TaskError(f"task file {spec!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"flywheel_task_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise TaskError(f"task file {spec!r} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return Task.from_module(module)
    name = spec if "." in spec else f"service.tasks.{spec}"
    try:
        return Task.from_module(importlib.import_module(name))
    except ModuleNotFoundError as exc:
        raise TaskError(f"no task module {spec!r}: {exc}") from exc
