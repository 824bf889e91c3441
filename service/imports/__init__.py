"""Ratings collected elsewhere, imported into an alias's feedback buffer.

`parse_file` (pure) reads an Open WebUI, Langfuse or JSONL export into records; `store` writes
them, each record's interaction and feedback in one savepoint, and counts them toward the
alias's trigger like live feedback. The CLI (`flywheel import`) and the API
(`POST /v1/adapters/{alias}/imports`) share both.
"""

from __future__ import annotations

from service.imports import jsonl, langfuse, openwebui
from service.imports.records import (
    SOURCES,
    FileRefused,
    ImportRecord,
    Item,
    ParsedFile,
    RatingRule,
    RecordError,
    Unrated,
    file_sha256,
    load_json_or_lines,
)

__all__ = ["SOURCES", "FileRefused", "ImportRecord", "Item", "ParsedFile", "RatingRule",
           "RecordError", "Unrated", "parse_file"]

_NAMES = {"openwebui": "Open WebUI", "langfuse": "Langfuse", "jsonl": "JSONL"}


def parse_file(source: str, data: bytes, rule: RatingRule | None = None) -> ParsedFile:
    """Every record of the file, each an ImportRecord, Unrated or RecordError; FileRefused when
    the file as a whole is not this format (nothing to import)."""
    if source not in SOURCES:
        raise FileRefused(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    rule = rule or RatingRule()
    doc, lines = load_json_or_lines(data, _NAMES[source])
    if source == "openwebui":
        items = openwebui.parse(doc, lines)
    elif source == "langfuse":
        items = langfuse.parse(doc, lines, rule)
    else:
        items = jsonl.parse(doc, lines, rule)
    if not items:
        raise FileRefused(f"the {_NAMES[source]} file holds no records")
    errors = [i.value for i in items if isinstance(i.value, RecordError)]
    if len(errors) == len(items):
        # Not one record reads as this format: most likely the wrong source was named.
        raise FileRefused(f"none of the {len(items)} records reads as {_NAMES[source]}; the "
                          f"first, {items[0].where}: {errors[0].reason}")
    return ParsedFile(source=source, items=items, sha256=file_sha256(data), size=len(data))
