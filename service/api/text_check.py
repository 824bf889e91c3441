"""Refuse JSON bodies holding text that is not Unicode: lone UTF-16 surrogates (`"\\ud800"`).

JSON may escape a surrogate half on its own and Python decodes it into a str that cannot be
encoded, so it would fail later wherever the text goes (Postgres, Redis, a log line) as a 500,
sometimes for other callers sharing a batch. Checked once at the door, for every route: the
body is scanned for the escape (cheap) and parsed only when one is there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

# A \uD800-\uDFFF escape: a surrogate half (a valid pair is decoded into one character).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE = re.compile("[\ud800-\udfff]")


def invalid_text(body: bytes) -> tuple[str, str] | None:
    """(field path, reason) of the first string or key that is not valid Unicode, or None."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None  # not JSON: the route's own parsing says so
    return _walk(doc, ())


def _walk(value: Any, path: tuple[str, ...]) -> tuple[str, str] | None:
    if isinstance(value, str):
        return _check(value, path)
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = value.items()
    else:
        return None
    for key, item in items:
        if isinstance(value, dict) and (bad := _check(key, path + (_safe(key),), key=True)):
            return bad
        if bad := _walk(item, path + (_safe(key),)):
            return bad
    return None


def _check(text: str, path: tuple[str, ...], key: bool = False) -> tuple[str, str] | None:
    m = _LONE.search(text)
    if m is None:
        return None
    what = "a key" if key else "the text"
    return (".".join(path) or "body",
            f"{what} is not valid Unicode: a lone surrogate U+{ord(m.group()):04X} at character "
            f"{m.start()} (send UTF-8, or escape a character outside the BMP as a surrogate pair)")


def _safe(key: str) -> str:
    """A key as it may appear in an error message (its bad halves replaced)."""
    return key.encode("utf-8", "replace").decode("utf-8")
