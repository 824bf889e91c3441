"""What every importer produces: rated chat records, or a reason a record cannot be one.

Pure functions, no I/O. Each format module (openwebui, langfuse, jsonl) turns a file into a list
of `Item`s, one per record in the file, in file order: an `ImportRecord`, an `Unrated` (a
well-formed record that carries no rating under the rule: skipped, counted by reason) or a
`RecordError` (malformed: reported with where it is, never written).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SOURCES = ("openwebui", "langfuse", "jsonl")
ROLES = ("system", "developer", "user", "assistant", "tool")
SOURCE_ID_MAX = 300  # interactions.source_id; longer ids are stored as their sha256

# Category names a rating may be given as (Langfuse categorical scores, JSONL ratings).
_UP_WORDS = {"up", "thumbs_up", "thumbsup", "good", "positive", "like", "true", "yes"}
_DOWN_WORDS = {"down", "thumbs_down", "thumbsdown", "bad", "negative", "dislike", "false", "no"}


class FileRefused(ValueError):
    """The file as a whole cannot be read in this format: nothing is imported."""


class Malformed(ValueError):
    """One record cannot be imported; the message names the field and why."""


@dataclass(frozen=True)
class RatingRule:
    """How a numeric or boolean rating becomes up/down: value >= up_min is up, value <= down_max
    is down, anything between is no rating (skipped). Booleans count as 1 and 0.

    The defaults fit thumbs given as 1/0 (Langfuse's user-feedback example) or 1/-1 (Open
    WebUI); a 1-5 star scale would use up_min=4, down_max=2.
    """

    up_min: float = 1.0
    down_max: float = 0.0
    score_name: str = "user-feedback"  # Langfuse: the score that holds the rating

    def __post_init__(self) -> None:
        for name in ("up_min", "down_max"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.down_max >= self.up_min:
            raise ValueError(f"down_max ({self.down_max}) must be below up_min ({self.up_min})")
        if not self.score_name.strip():
            raise ValueError("score_name must not be empty")

    def as_dict(self) -> dict[str, Any]:
        return {"up_min": self.up_min, "down_max": self.down_max, "score_name": self.score_name}

    def rate(self, value: Any, what: str = "rating") -> str | None:
        """'up', 'down', or None (between the thresholds); Malformed for anything else."""
        if isinstance(value, bool):
            value = 1.0 if value else 0.0
        if isinstance(value, str):
            word = value.strip().lower().replace("-", "_").replace(" ", "_")
            if word in _UP_WORDS:
                return "up"
            if word in _DOWN_WORDS:
                return "down"
            try:
                value = float(word)
            except ValueError:
                raise Malformed(f"{what}: {value!r} is not up/down, a boolean or a number") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Malformed(f"{what}: {value!r} is not up/down, a boolean or a number")
        if value >= self.up_min:
            return "up"
        if value <= self.down_max:
            return "down"
        return None


@dataclass(frozen=True)
class ImportRecord:
    """One rated answer, ready to store as an interaction with its feedback."""

    source_id: str  # the record's id at the source (or a hash of its content)
    messages: list[dict[str, Any]]  # the conversation up to the answer (OpenAI messages)
    response_text: str
    rating: str  # "up" | "down"
    correction: str | None = None
    comment: str | None = None
    rater_id: str = ""
    user: str | None = None
    created_at: datetime | None = None  # when it happened at the source
    params: dict[str, Any] = field(default_factory=dict)  # request fields the template needs (tools)
    response_tool_calls: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Unrated:
    """A well-formed record with no rating under the rule: skipped, counted by reason."""

    reason: str  # a short code, e.g. "no_rating"
    detail: str = ""


@dataclass(frozen=True)
class RecordError:
    """A malformed record: reported with where it is, never written."""

    reason: str


@dataclass(frozen=True)
class Item:
    where: str  # "line 7", "item 3 (id 9f2...)"
    value: ImportRecord | Unrated | RecordError


@dataclass
class ParsedFile:
    source: str
    items: list[Item]
    sha256: str
    size: int

    @property
    def records(self) -> list[tuple[str, ImportRecord]]:
        return [(i.where, i.value) for i in self.items if isinstance(i.value, ImportRecord)]

    def counts(self) -> dict[str, int]:
        return {"total": len(self.items),
                "records": sum(isinstance(i.value, ImportRecord) for i in self.items),
                "unrated": sum(isinstance(i.value, Unrated) for i in self.items),
                "errors": sum(isinstance(i.value, RecordError) for i in self.items)}


# ---------------------------------------------------------------------------------------------
# Shared checks


def text_of(content: Any, what: str) -> str:
    """A message's text: a string, or OpenAI's content parts when every part is text."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for n, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise Malformed(f"{what}[{n}]: a {kind!s} part; only text can be trained on")
        return "".join(parts)
    raise Malformed(f"{what}: expected text, got {type(content).__name__}")


def tool_calls_of(value: Any, what: str) -> list[dict[str, Any]] | None:
    """OpenAI tool_calls, checked for the fields a chat template renders; None when absent."""
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise Malformed(f"{what}: expected a list of tool calls")
    calls = []
    for n, call in enumerate(value):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Malformed(f"{what}[{n}]: needs function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"id": str(call.get("id") or f"call_{n}"), "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def chat_messages(value: Any, what: str = "messages") -> list[dict[str, Any]]:
    """OpenAI chat messages, normalized to role + text content (+ tool fields); Malformed otherwise."""
    if not isinstance(value, list) or not value:
        raise Malformed(f"{what}: expected a non-empty list of chat messages")
    out = []
    for n, m in enumerate(value):
        where = f"{what}[{n}]"
        if not isinstance(m, Mapping):
            raise Malformed(f"{where}: expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise Malformed(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": text_of(m.get("content"), f"{where}.content")}
        if role == "assistant" and (calls := tool_calls_of(m.get("tool_calls"), f"{where}.tool_calls")):
            msg["tool_calls"] = calls
        if role == "tool":
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = str(m["tool_call_id"])
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def check_prompt(messages: list[dict[str, Any]], what: str = "messages") -> None:
    """The conversation an answer follows must ask something: a user turn, and it ends with the
    user (or a tool result), never with the model's own turn."""
    if not any(m["role"] == "user" for m in messages):
        raise Malformed(f"{what}: no user message before the answer")
    if messages[-1]["role"] not in ("user", "tool"):
        raise Malformed(f"{what}: the conversation before the answer ends with a "
                        f"{messages[-1]['role']} message, not the user's")


def answer_of(message: Mapping[str, Any], what: str) -> tuple[str, list[dict[str, Any]] | None]:
    """(text, tool_calls) of an assistant answer; Malformed when it says nothing."""
    text = text_of(message.get("content"), f"{what}.content")
    calls = tool_calls_of(message.get("tool_calls"), f"{what}.tool_calls")
    if not text.strip() and not calls:
        raise Malformed(f"{what}: the answer is empty")
    return text, calls


def optional_text(value: Any, what: str) -> str | None:
    """A free-text field (correction, comment): None when absent or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed(f"{what}: expected text, got {type(value).__name__}")
    return value if value.strip() else None


def timestamp(value: Any, what: str) -> datetime | None:
    """ISO 8601 (naive: UTC) or a Unix time in seconds or milliseconds; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise Malformed(f"{what}: expected a time, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise Malformed(f"{what}: {value!r} is not a time")
        seconds = value / 1000 if abs(value) > 1e11 else value  # milliseconds past ~5138 AD
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise Malformed(f"{what}: {value!r} is out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Malformed(f"{what}: {value!r} is not an ISO 8601 time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise Malformed(f"{what}: expected a time, got {type(value).__name__}")


def source_id(value: Any, what: str = "id") -> str | None:
    """A record's id at the source as text (long ones as their sha256); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"{what}: expected a string or integer id, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        return None
    if len(text) > SOURCE_ID_MAX:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def content_id(*parts: Any) -> str:
    """An id for a record that has none: the sha256 of its content, so the same record imported
    again is recognized."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_json_or_lines(data: bytes, fmt: str) -> tuple[Any | None, list[tuple[int, Any]]]:
    """A JSON document, or (when the whole file is not one) JSON lines: (doc, []) or
    (None, [(line number, parsed value or the JSONDecodeError), ...]) with blank lines left out."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileRefused(f"the {fmt} file is not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        raise FileRefused(f"the {fmt} file is empty")
    try:
        return json.loads(text), []
    except json.JSONDecodeError as whole:
        lines = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                lines.append((n, exc))
        if any(not isinstance(v, json.JSONDecodeError) for _, v in lines):
            return None, lines
        raise FileRefused(f"the {fmt} file is neither JSON nor JSON lines: {whole.msg} "
                          f"(line {whole.lineno}, column {whole.colno})") from whole
