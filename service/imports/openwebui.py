"""Open WebUI's feedback export: Admin Panel → Evaluations → Feedbacks → Export, or
`GET /api/v1/evaluations/feedbacks/all/export` with an admin token.

The file is a JSON array of feedback rows (open-webui backend/open_webui/models/feedbacks.py,
FeedbackModel; the web UI builds them in ResponseMessage.svelte's feedbackHandler):

    {"id": "<feedback id>", "user_id": "<rater>", "version": 0, "type": "rating",
     "data": {"rating": 1 | -1, "model_id": "...", "reason": "...", "comment": "...",
              "details": {"rating": 1-10}, "tags": [...]},
     "meta": {"chat_id": "...", "message_id": "<rated message>", "message_index": 4, ...},
     "snapshot": {"chat": <the chat as GET /api/v1/chats/{id} returns it>},
     "created_at": <unix s>, "updated_at": <unix s>}

The snapshot's `chat.chat.history.messages` is a tree keyed by message id (`parentId`,
`childrenIds`, `role`, `content`, `timestamp`); the rated answer is `meta.message_id` and the
conversation it answered is the path from the root to its parent. Thumbs are `data.rating`
1 (up) / -1 (down); any other value (a 1-10 detail rating alone, a conversation-level rating)
carries no thumb and is skipped as `no_rating`. Open WebUI has no corrected answer; the comment
(with the reason picked in the UI) is kept as the feedback's comment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.imports.records import (
    FileRefused,
    ImportRecord,
    Item,
    Malformed,
    RecordError,
    Unrated,
    answer_of,
    chat_messages,
    check_prompt,
    source_id,
    timestamp,
)

_THUMBS = {1: "up", -1: "down"}


def parse(doc: Any, lines: list[tuple[int, Any]]) -> list[Item]:
    if doc is None:  # JSON lines: one feedback row per line
        entries = [(f"line {n}", v) for n, v in lines]
    elif isinstance(doc, list):
        entries = [(f"item {n}", v) for n, v in enumerate(doc, start=1)]
    elif isinstance(doc, Mapping) and isinstance(doc.get("items"), list):  # a /feedbacks/list page
        entries = [(f"item {n}", v) for n, v in enumerate(doc["items"], start=1)]
    elif isinstance(doc, Mapping) and "data" in doc and "meta" in doc:  # one feedback row
        entries = [("item 1", doc)]
    else:
        raise FileRefused("not an Open WebUI feedback export: expected a JSON array of feedback "
                          "rows (id, user_id, data.rating, meta.message_id, snapshot.chat)")
    items = []
    for where, value in entries:
        if isinstance(value, Mapping) and value.get("id"):
            where = f"{where} (id {str(value['id'])[:60]})"
        items.append(Item(where, _one(value)))
    return items


def _one(value: Any) -> ImportRecord | Unrated | RecordError:
    if not isinstance(value, Mapping):
        return RecordError(f"expected a feedback object, got {type(value).__name__}")
    try:
        return record(value)
    except Malformed as exc:
        return RecordError(str(exc))


def _rating(data: Mapping[str, Any]) -> str | None:
    raw = data.get("rating")
    try:
        value = int(raw) if isinstance(raw, (int, str)) and not isinstance(raw, bool) else None
    except ValueError:
        value = None
    return _THUMBS.get(value) if value is not None else None


def _object(value: Any) -> Mapping[str, Any]:
    """value when it is a JSON object, else an empty one (a missing or mistyped field)."""
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def record(fb: Mapping[str, Any]) -> ImportRecord | Unrated:
    ident = source_id(fb.get("id"))
    if ident is None:
        raise Malformed("id: missing (the feedback's id is what makes a second import a no-op)")
    data, meta = fb.get("data"), fb.get("meta")
    if not isinstance(data, Mapping):
        raise Malformed("data: missing (the feedback's rating)")
    if not isinstance(meta, Mapping):
        raise Malformed("meta: missing (which chat and message were rated)")
    rating = _rating(data)
    if rating is None:
        return Unrated("no_rating", f"data.rating {data.get('rating')!r} is not 1 or -1")
    message_id = meta.get("message_id")
    if not message_id:
        if meta.get("scope") == "conversation":
            return Unrated("not_an_answer", "rates a whole conversation, not one answer")
        raise Malformed("meta.message_id: missing (which answer was rated)")
    chat = _object(fb.get("snapshot")).get("chat")
    if not isinstance(chat, Mapping):
        raise Malformed("snapshot.chat: missing; export from an Open WebUI that keeps chat "
                        "snapshots with feedback (the export route returns them)")
    # GET /chats/{id} wraps the chat body in {"id", "title", "chat": {...}}; accept both.
    inner = chat.get("chat")
    body = inner if isinstance(inner, Mapping) else chat
    tree = _object(body.get("history")).get("messages")
    if not isinstance(tree, Mapping):
        raise Malformed("snapshot.chat.chat.history.messages: missing")
    path = _path_to(tree, str(message_id))
    answer = path.pop()
    if answer.get("role") != "assistant":
        raise Malformed(f"meta.message_id {message_id!r} is a {answer.get('role')!r} message, "
                        "not an answer")
    text, calls = answer_of(answer, f"message {message_id}")
    conversation = [{"role": m.get("role"), "content": m.get("content")} for m in path]
    system = _object(body.get("params")).get("system")
    if isinstance(system, str) and system.strip():
        conversation.insert(0, {"role": "system", "content": system})
    messages = chat_messages(conversation, "conversation")
    check_prompt(messages, "conversation")
    comment = _text(data.get("comment"))
    reason = _text(data.get("reason"))
    comment = " ".join(p for p in (f"[{reason}]" if reason.strip() else "", comment.strip()) if p)
    user = chat.get("user_id") or fb.get("user_id")
    return ImportRecord(
        source_id=ident, messages=messages, response_text=text, response_tool_calls=calls,
        rating=rating, comment=comment or None, rater_id=str(fb.get("user_id") or ""),
        user=str(user) if user else None,
        created_at=timestamp(answer.get("timestamp"), "answer timestamp")
        or timestamp(fb.get("created_at"), "created_at"))


def _path_to(tree: Mapping[str, Any], message_id: str) -> list[Mapping[str, Any]]:
    """The messages from the root of the chat tree down to message_id (inclusive)."""
    path: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    current: str | None = message_id
    while current is not None:
        if current in seen:
            raise Malformed(f"history.messages: the parentId chain of {message_id!r} loops")
        seen.add(current)
        node = tree.get(current)
        if not isinstance(node, Mapping):
            what = "the rated message" if current == message_id else f"its ancestor {current!r}"
            raise Malformed(f"history.messages: {what} is not in the snapshot")
        path.append(node)
        parent = node.get("parentId")
        current = str(parent) if parent else None
    return path[::-1]
