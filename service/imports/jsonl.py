"""OpenAI-format chat JSONL with a rating: the shape a team can produce from any log.

One JSON object per line (a JSON array of such objects is read the same way):

    {"id": "t-1", "messages": [{"role": "user", "content": "Where is my order?"},
                               {"role": "assistant", "content": "It ships tomorrow."}],
     "rating": "down", "correction": "It shipped today; tracking: ...",
     "created_at": "2026-11-30T12:00:00Z", "rater_id": "u42", "comment": "wrong date"}

- `messages`: OpenAI chat messages; the last one is the rated assistant answer, unless the
  answer is given separately as `response` (text, or an assistant message with `tool_calls`).
- `rating`: "up"/"down" (also thumbs_up/good/positive ... and their opposites), a boolean, or a
  number mapped by the rating rule (>= up_min: up, <= down_max: down, between: skipped).
  A record with a `correction` and no rating counts as a thumbs-down with that correction.
- optional: `correction`, `id` (without one, the record's content hash is its id), `created_at`
  (ISO 8601 or Unix seconds/milliseconds), `rater_id` (or `user`), `comment`, `tools` (the
  request's tool definitions, for answers that call tools).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from service.imports.records import (
    FileRefused,
    ImportRecord,
    Item,
    Malformed,
    RatingRule,
    RecordError,
    Unrated,
    answer_of,
    chat_messages,
    check_prompt,
    content_id,
    optional_text,
    source_id,
    timestamp,
)


def parse(doc: Any, lines: list[tuple[int, Any]], rule: RatingRule) -> list[Item]:
    """Items from a JSON document (an object, or an array of them) or from parsed lines."""
    if doc is not None:
        entries = [("line 1", doc)] if isinstance(doc, Mapping) else (
            [(f"item {n}", v) for n, v in enumerate(doc, start=1)] if isinstance(doc, list) else None)
        if entries is None:
            raise FileRefused("a jsonl file holds one JSON object per line (or an array of them), "
                              f"not a {type(doc).__name__}")
    else:
        entries = [(f"line {n}", v) for n, v in lines]
    return [Item(where, _one(value, rule)) for where, value in entries]


def _one(value: Any, rule: RatingRule) -> ImportRecord | Unrated | RecordError:
    if isinstance(value, json.JSONDecodeError):
        return RecordError(f"not valid JSON: {value.msg} (column {value.colno})")
    if not isinstance(value, Mapping):
        return RecordError(f"expected a JSON object, got {type(value).__name__}")
    try:
        return record(value, rule)
    except Malformed as exc:
        return RecordError(str(exc))


def record(r: Mapping[str, Any], rule: RatingRule) -> ImportRecord | Unrated:
    messages = chat_messages(r.get("messages"))
    if r.get("response") is not None:
        answer = r["response"]
        answer = answer if isinstance(answer, Mapping) else {"role": "assistant", "content": answer}
        text, calls = answer_of(answer, "response")
    else:
        if messages[-1]["role"] != "assistant":
            raise Malformed("messages: the last message is not the assistant's answer, and there "
                            "is no response")
        last = messages.pop()
        text, calls = answer_of(last, f"messages[{len(messages)}]")
    check_prompt(messages)
    correction = optional_text(r.get("correction"), "correction")
    raw = r.get("rating")
    rating: str | None
    if raw is None:
        if correction is None:
            raise Malformed("rating: missing (up/down, a boolean or a number)")
        rating = "down"
    else:
        rating = rule.rate(raw)
    if rating is None:
        return Unrated("no_rating", f"rating {raw!r} is between down_max and up_min")
    params: dict[str, Any] = {}
    if r.get("tools") is not None:
        if not isinstance(r["tools"], list):
            raise Malformed("tools: expected a list of tool definitions")
        params["tools"] = r["tools"]
    rater = r.get("rater_id", r.get("user"))
    if rater is not None and not isinstance(rater, (str, int)):
        raise Malformed("rater_id: expected a string")
    user = r.get("user")
    return ImportRecord(
        source_id=source_id(r.get("id")) or content_id(messages, text, calls, raw, correction),
        messages=messages, response_text=text, response_tool_calls=calls, rating=rating,
        correction=correction, comment=optional_text(r.get("comment"), "comment"),
        rater_id=str(rater or ""), user=str(user) if isinstance(user, (str, int)) else None,
        created_at=timestamp(r.get("created_at"), "created_at"), params=params)
