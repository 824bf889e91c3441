"""Langfuse traces with their scores.

Read: what `GET /api/public/traces/{traceId}` returns (TraceWithFullDetails in the public API's
fern definition, langfuse/langfuse fern/apis/server/definition/commons.yml) and what a trace's
"Download JSON" button saves: the trace with its `observations` and `scores` as objects. A file
may hold one such trace, a JSON array of them, JSON lines of them, `{"data": [...]}` (a page of
the traces API with full details), or `{"traces": [...], "scores": [...]}` where the scores (from
`GET /api/public/scores`) are matched to their trace by `traceId`.

    {"id": "<trace id>", "timestamp": "2026-11-30T12:00:00.000Z", "userId": "u42",
     "input": ..., "output": ...,
     "observations": [{"id": "...", "type": "GENERATION", "startTime": "...",
                       "input": [{"role": "user", "content": "..."}],
                       "output": {"role": "assistant", "content": "..."}}],
     "scores": [{"id": "...", "traceId": "...", "name": "user-feedback", "value": 1,
                 "dataType": "NUMERIC" | "BOOLEAN" | "CATEGORICAL", "stringValue": "...",
                 "comment": "...", "authorUserId": "...", "observationId": null,
                 "timestamp": "..."},
                {"name": "output", "dataType": "CORRECTION", "stringValue": "<corrected output>"}]}

The rating is the trace's score named by the rule (`user-feedback` by default, Langfuse's own
user-feedback example: 1 positive, 0 negative), mapped to up/down by the rule's thresholds; a
categorical score by its label (good/bad, up/down, ...) unless a config gives it a number. The
newest score of that name wins. A "corrected output" (a score with dataType CORRECTION,
docs: observability/features/corrections) is the correction; with no rating it counts as a
thumbs-down with that correction.

The conversation is the input of the generation the score points at (observationId), else of
the trace's last GENERATION whose input is a list of chat messages, else the trace's own
input/output (a string input is one user message).
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
    source_id,
    timestamp,
)


def parse(doc: Any, lines: list[tuple[int, Any]], rule: RatingRule) -> list[Item]:
    extra: dict[str, list[Any]] = {}
    if doc is None:
        entries = [(f"line {n}", v) for n, v in lines]
    elif isinstance(doc, list):
        entries = [(f"trace {n}", v) for n, v in enumerate(doc, start=1)]
    elif isinstance(doc, Mapping) and isinstance(doc.get("traces"), list):
        entries = [(f"trace {n}", v) for n, v in enumerate(doc["traces"], start=1)]
        scores = doc.get("scores", [])
        scores = scores.get("data", []) if isinstance(scores, Mapping) else scores
        if not isinstance(scores, list):
            raise FileRefused("scores: expected a list of score objects")
        for s in scores:
            if isinstance(s, Mapping) and s.get("traceId"):
                extra.setdefault(str(s["traceId"]), []).append(s)
    elif isinstance(doc, Mapping) and isinstance(doc.get("data"), list):
        entries = [(f"trace {n}", v) for n, v in enumerate(doc["data"], start=1)]
    elif isinstance(doc, Mapping) and "id" in doc and ("input" in doc or "observations" in doc):
        entries = [("trace 1", doc)]
    else:
        raise FileRefused("not a Langfuse trace export: expected traces with their scores (a "
                          "trace's Download JSON, GET /api/public/traces/{id}, an array of those, "
                          "or {\"traces\": [...], \"scores\": [...]})")
    items = []
    for where, value in entries:
        if isinstance(value, Mapping) and value.get("id"):
            where = f"{where} (id {str(value['id'])[:60]})"
        items.append(Item(where, _one(value, rule, extra)))
    return items


def _one(value: Any, rule: RatingRule, extra: dict[str, list[Any]]
         ) -> ImportRecord | Unrated | RecordError:
    if isinstance(value, json.JSONDecodeError):
        return RecordError(f"not valid JSON: {value.msg} (column {value.colno})")
    if not isinstance(value, Mapping):
        return RecordError(f"expected a trace object, got {type(value).__name__}")
    try:
        return record(value, rule, extra.get(str(value.get("id")), []))
    except Malformed as exc:
        return RecordError(str(exc))


def _scores(trace: Mapping[str, Any], extra: list[Any]) -> list[Mapping[str, Any]]:
    own = trace.get("scores") or []
    if not isinstance(own, list):
        raise Malformed("scores: expected a list")
    if any(isinstance(s, str) for s in own) and not extra:
        raise Malformed("scores: only score ids (the traces list API); export each trace with "
                        "its scores (GET /api/public/traces/{id} or Download JSON), or add them "
                        "as {\"traces\": [...], \"scores\": [...]}")
    found = [s for s in own if isinstance(s, Mapping)] + [s for s in extra if isinstance(s, Mapping)]
    # The same score may come embedded and in the scores list: keep one of each id.
    unique: dict[str, Mapping[str, Any]] = {}
    for n, s in enumerate(found):
        unique.setdefault(str(s.get("id") or f"#{n}"), s)
    return list(unique.values())


def _newest(scores: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    def when(s: Mapping[str, Any]) -> str:
        return str(s.get("timestamp") or s.get("updatedAt") or s.get("createdAt") or "")

    return max(scores, key=when)


def _score_rating(score: Mapping[str, Any], rule: RatingRule) -> str | None:
    kind = str(score.get("dataType") or "").upper()
    what = f"score {score.get('name')!r}"
    if kind == "CATEGORICAL" and score.get("value") is None:
        return rule.rate(score.get("stringValue"), f"{what} stringValue")
    value = score.get("value")
    if value is None and isinstance(score.get("stringValue"), str):
        value = score["stringValue"]
    return rule.rate(value, f"{what} value")


def _correction(scores: list[Mapping[str, Any]]) -> str | None:
    found = [s for s in scores if str(s.get("dataType") or "").upper() == "CORRECTION"]
    if not found:
        return None
    s = _newest(found)
    value = s.get("stringValue") if s.get("stringValue") is not None else s.get("value")
    if isinstance(value, str):
        try:  # a correction saved in the UI's JSON mode may be the whole assistant message
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, Mapping) and isinstance(parsed.get("content"), str):
            value = parsed["content"]
    if not isinstance(value, str):
        raise Malformed(f"score {s.get('name')!r} (CORRECTION): the corrected output is not text")
    return value if value.strip() else None


def _conversation(value: Any, what: str) -> list[dict[str, Any]] | None:
    """Chat messages from an input: a message list, {"messages": [...]}, or a plain string."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if isinstance(value, Mapping) and isinstance(value.get("messages"), list):
        return chat_messages(value["messages"], f"{what}.messages")
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m for m in value):
        return chat_messages(value, what)
    return None


def _answer(value: Any, what: str) -> tuple[str, list[dict[str, Any]] | None] | None:
    """The answer in an output: text, an assistant message, OpenAI's choices, or a message list."""
    if isinstance(value, str):
        return answer_of({"content": value}, what)
    if isinstance(value, Mapping):
        if isinstance(value.get("choices"), list) and value["choices"]:
            message = value["choices"][0].get("message") if isinstance(value["choices"][0], Mapping) else None
            if isinstance(message, Mapping):
                return answer_of(message, f"{what}.choices[0].message")
        if "content" in value or "tool_calls" in value:
            return answer_of(value, what)
        if isinstance(value.get("output"), str):
            return answer_of({"content": value["output"]}, f"{what}.output")
    if isinstance(value, list) and value and isinstance(value[-1], Mapping) \
            and value[-1].get("role") == "assistant":
        return answer_of(value[-1], f"{what}[{len(value) - 1}]")
    return None


def _exchange(trace: Mapping[str, Any], observation_id: Any
              ) -> tuple[list[dict[str, Any]], str, list[dict[str, Any]] | None]:
    """(prompt messages, answer text, tool calls) of the rated exchange."""
    observations = trace.get("observations") or []
    if not isinstance(observations, list):
        raise Malformed("observations: expected a list")
    generations = [o for o in observations if isinstance(o, Mapping)
                   and str(o.get("type") or "").upper() == "GENERATION"]
    chosen = None
    if observation_id:
        chosen = next((o for o in generations if str(o.get("id")) == str(observation_id)), None)
    if chosen is None:
        with_chat = [o for o in generations if _safe_conversation(o.get("input"))]
        chosen = max(with_chat, key=lambda o: str(o.get("startTime") or ""), default=None)
    if chosen is not None:
        where = f"observation {chosen.get('id')}"
        messages = _conversation(chosen.get("input"), f"{where}.input")
        answer = _answer(chosen.get("output"), f"{where}.output")
        if messages and answer:
            return messages, *answer
    messages = _conversation(trace.get("input"), "input")
    if not messages:
        raise Malformed("input: no chat messages (a list of {role, content}, {\"messages\": "
                        "[...]} or text) in the trace or any of its generations")
    answer = _answer(trace.get("output"), "output")
    if answer is None:
        raise Malformed("output: no answer text (a string, an assistant message or OpenAI "
                        "choices) in the trace or any of its generations")
    return messages, *answer


def _safe_conversation(value: Any) -> bool:
    try:
        return bool(_conversation(value, "input")) and not isinstance(value, str)
    except Malformed:
        return False


def record(trace: Mapping[str, Any], rule: RatingRule, extra: list[Any]) -> ImportRecord | Unrated:
    ident = source_id(trace.get("id"))
    if ident is None:
        raise Malformed("id: missing (the trace id is what makes a second import a no-op)")
    scores = _scores(trace, extra)
    named = [s for s in scores if s.get("name") == rule.score_name
             and str(s.get("dataType") or "").upper() != "CORRECTION"]
    correction = _correction(scores)
    rating_score = _newest(named) if named else None
    if rating_score is not None:
        rating = _score_rating(rating_score, rule)
        if rating is None:
            return Unrated("no_rating", f"score {rule.score_name!r} = {rating_score.get('value')!r} "
                                        "is between down_max and up_min")
    elif correction is not None:
        rating = "down"
    else:
        return Unrated("no_rating", f"no {rule.score_name!r} score and no corrected output")
    messages, text, calls = _exchange(trace, (rating_score or {}).get("observationId"))
    if messages[-1]["role"] == "assistant" and messages[-1]["content"] == text:
        messages = messages[:-1]  # an input that already ends with this answer
    check_prompt(messages)
    comment = (rating_score or {}).get("comment")
    comment = comment if isinstance(comment, str) and comment.strip() else None
    rater = (rating_score or {}).get("authorUserId") or trace.get("userId") or ""
    return ImportRecord(
        source_id=ident, messages=messages, response_text=text, response_tool_calls=calls,
        rating=rating, correction=correction,
        comment=comment,
        rater_id=str(rater), user=str(trace["userId"]) if trace.get("userId") else None,
        created_at=timestamp(trace.get("timestamp"), "timestamp"))
