"""Reading feedback exports (pure): the sample files of each format, and what each malformed
record is reported as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.imports import FileRefused, ImportRecord, RatingRule, RecordError, Unrated, parse_file

DATA = Path(__file__).resolve().parents[1] / "data" / "imports"
SAMPLES = {"openwebui": "openwebui-feedback-export.json", "langfuse": "langfuse-traces.json",
           "jsonl": "chats.jsonl"}


def _parse(source: str, data: object, rule: RatingRule | None = None):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return parse_file(source, raw, rule)


def _only(source: str, data: object, rule: RatingRule | None = None):
    """One record read by the format alone (parse_file refuses a file of nothing but errors)."""
    from service.imports import jsonl, langfuse, openwebui

    rule = rule or RatingRule()
    read = {"openwebui": lambda d: openwebui.parse(d, []), "langfuse": lambda d: langfuse.parse(d, [], rule),
            "jsonl": lambda d: jsonl.parse(d, [], rule)}[source]
    [item] = read(data)
    return item.value


@pytest.mark.parametrize("source", sorted(SAMPLES))
def test_each_sample_reads_ten_records_one_unrated_and_reports_the_malformed(source):
    parsed = parse_file(source, (DATA / SAMPLES[source]).read_bytes())
    counts = parsed.counts()
    assert counts["records"] == 10 and counts["unrated"] == 1
    assert counts["errors"] == (2 if source == "jsonl" else 1)
    ratings = [r.rating for _, r in parsed.records]
    assert ratings.count("up") == 6 and ratings.count("down") == 4
    for _, r in parsed.records:
        assert r.messages[-1]["role"] == "user" and r.response_text.strip()
        assert r.created_at is not None and r.created_at.tzinfo is not None
        assert r.source_id and r.rating in ("up", "down")
    assert len({r.source_id for _, r in parsed.records}) == 10


def test_openwebui_walks_the_chat_tree_to_the_rated_answer():
    parsed = parse_file("openwebui", (DATA / SAMPLES["openwebui"]).read_bytes())
    doc = json.loads((DATA / SAMPLES["openwebui"]).read_text())
    by_id = {r.source_id: r for _, r in parsed.records}
    two_turns = by_id[doc[3]["id"]]
    assert [m["role"] for m in two_turns.messages] == ["user", "assistant", "user"]
    assert two_turns.messages[-1]["content"] == "Do you ship to Canada?"
    assert two_turns.rater_id == doc[3]["user_id"]
    # The chat's system prompt comes first; a thumbs-down keeps its reason and comment.
    first_down = by_id[doc[2]["id"]]
    system = doc[2]["snapshot"]["chat"]["chat"]["params"]["system"]
    assert first_down.messages[0] == {"role": "system", "content": system}
    assert first_down.rating == "down"
    assert first_down.comment == "[Not helpful] Does not answer the question."
    # The answer's own time, not the feedback's.
    assert int(first_down.created_at.timestamp()) == doc[2]["snapshot"]["chat"]["chat"]["history"][
        "messages"][doc[2]["meta"]["message_id"]]["timestamp"]


def test_openwebui_reports_where_and_why():
    doc = json.loads((DATA / SAMPLES["openwebui"]).read_text())
    good = doc[0]
    no_msg = {**good, "meta": {**good["meta"], "message_id": "nope"}}
    user_msg = {**good, "meta": {**good["meta"], "message_id": good["snapshot"]["chat"]["chat"][
        "history"]["messages"][good["meta"]["message_id"]]["parentId"]}}
    conversation = {**good, "meta": {"scope": "conversation", "chat_id": "c"}, "snapshot": {}}
    items = _parse("openwebui", [no_msg, user_msg, conversation, 7, {"id": "x"}]).items
    assert items[0].where == f"item 1 (id {good['id']})"
    assert "the rated message is not in the snapshot" in items[0].value.reason
    assert "is a 'user' message, not an answer" in items[1].value.reason
    assert items[2].value == Unrated("not_an_answer", "rates a whole conversation, not one answer")
    assert items[3].value == RecordError("expected a feedback object, got int")
    assert items[4].value == RecordError("data: missing (the feedback's rating)")
    with pytest.raises(FileRefused, match="not an Open WebUI feedback export"):
        _parse("openwebui", {"hello": "world"})


def test_langfuse_takes_the_generation_the_score_points_at_and_the_corrected_output():
    parsed = parse_file("langfuse", (DATA / SAMPLES["langfuse"]).read_bytes())
    corrected = [r for _, r in parsed.records if r.correction]
    assert len(corrected) == 2 and all(r.rating == "down" for r in corrected)
    r = corrected[0]
    assert [m["role"] for m in r.messages] == ["system", "user"]
    assert r.response_text == "Please wait." and r.correction.startswith("Sorry for the delay.")
    assert r.rater_id == "customer-104" and r.comment is None  # a boolean score, no comment
    assert corrected[1].comment == "thumbs down from chat widget"


def test_langfuse_rules_shapes_and_joined_scores():
    trace = {"id": "t1", "timestamp": "2026-01-02T03:04:05Z", "input": "What is 2+2?", "output": "4",
             "scores": [{"id": "s1", "name": "stars", "value": 3, "dataType": "NUMERIC",
                         "timestamp": "2026-01-02T03:05:00Z"},
                        {"id": "s2", "name": "stars", "value": 5, "dataType": "NUMERIC",
                         "timestamp": "2026-01-02T03:06:00Z"}]}
    stars = RatingRule(up_min=4, down_max=2, score_name="stars")
    r = _only("langfuse", trace, stars)
    assert isinstance(r, ImportRecord) and r.rating == "up"  # the newest score wins
    assert r.messages == [{"role": "user", "content": "What is 2+2?"}] and r.response_text == "4"
    assert _only("langfuse", {**trace, "scores": trace["scores"][:1]}, stars).reason == "no_rating"
    # Scores fetched apart, matched by traceId; a categorical label.
    bare = {**trace, "scores": ["s9"]}
    doc = {"traces": [bare], "scores": [{"id": "s9", "traceId": "t1", "name": "user-feedback",
                                         "dataType": "CATEGORICAL", "stringValue": "bad"}]}
    assert _only("langfuse", doc).rating == "down"
    assert "only score ids" in _only("langfuse", bare).reason
    # OpenAI choices as the output, {"messages": [...]} as the input.
    choice = {**trace, "input": {"messages": [{"role": "user", "content": "hi"}]},
              "output": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
              "scores": [{"id": "s", "name": "user-feedback", "value": 0, "dataType": "NUMERIC"}]}
    assert (_only("langfuse", choice).response_text, _only("langfuse", choice).rating) == ("hello", "down")
    assert "no answer text" in _only("langfuse", {**choice, "output": {"tokens": 3}}).reason
    assert "expected a trace object" in _parse("langfuse", b'{"id": "x", "input": "a"}\n[1]\n').items[1].value.reason


def test_jsonl_lines_report_their_line_number_and_the_field():
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "rating": "thumbs_up"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "a"}], "response": "b", "rating": 3},),
        json.dumps({"messages": [{"role": "user", "content": "a"}], "response": "b",
                    "correction": "c"}),
        json.dumps({"messages": [{"role": "robot", "content": "a"}], "response": "b", "rating": "up"}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                    "response": "b", "rating": "up"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}], "response": "  ", "rating": "up"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}], "response": "b", "rating": "meh"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}], "response": "b", "rating": "up",
                    "created_at": "yesterday"}),
        "{not json",
    ]
    items = _parse("jsonl", "\n".join(lines).encode()).items
    assert [i.where for i in items] == [f"line {n}" for n in (1, 3, 4, 5, 6, 7, 8, 9, 10)]
    first = items[0].value
    assert first.rating == "up" and first.messages == [{"role": "user", "content": "a"}]
    assert first.source_id.startswith("sha256:")  # no id: its content hash
    assert items[1].value.rating == "up"  # 3 >= up_min 1
    assert (items[2].value.rating, items[2].value.correction) == ("down", "c")
    reasons = [i.value.reason for i in items[3:]]
    assert "messages[0].role: 'robot' is not one of" in reasons[0]
    assert "messages[0].content[0]: a image_url part; only text can be trained on" in reasons[1]
    assert reasons[2] == "response: the answer is empty"
    assert reasons[3] == "rating: 'meh' is not up/down, a boolean or a number"
    assert reasons[4] == "created_at: 'yesterday' is not an ISO 8601 time"
    assert reasons[5].startswith("not valid JSON")


def test_jsonl_tool_calls_and_tools_are_kept():
    call = {"id": "c1", "type": "function", "function": {"name": "track", "arguments": {"order": 7}}}
    r = _only("jsonl", {"id": 7, "tools": [{"type": "function", "function": {"name": "track"}}],
                        "messages": [{"role": "user", "content": "where is 7?"},
                                     {"role": "assistant", "content": None, "tool_calls": [call]}],
                        "rating": True, "created_at": 1764504000123})
    assert r.source_id == "7" and r.response_text == ""
    assert r.response_tool_calls == [{"id": "c1", "type": "function",
                                      "function": {"name": "track", "arguments": '{"order": 7}'}}]
    assert r.params == {"tools": [{"type": "function", "function": {"name": "track"}}]}
    assert r.created_at.year == 2025  # milliseconds


def test_same_content_same_id_and_whole_file_refusals():
    rec = {"messages": [{"role": "user", "content": "a"}], "response": "b", "rating": "up"}
    twice = _parse("jsonl", (json.dumps(rec) + "\n" + json.dumps(rec) + "\n").encode())
    assert twice.items[0].value.source_id == twice.items[1].value.source_id
    with pytest.raises(FileRefused, match="empty"):
        parse_file("jsonl", b"  \n")
    with pytest.raises(FileRefused, match="not UTF-8"):
        parse_file("jsonl", b"\xff\xfe{}")
    with pytest.raises(FileRefused, match="neither JSON nor JSON lines"):
        parse_file("langfuse", b"<html>")
    with pytest.raises(FileRefused, match=r"none of the 12 records reads as Open WebUI; the "
                                          r"first, item 1 \(id [0-9a-f]+\): data: missing"):
        parse_file("openwebui", (DATA / SAMPLES["langfuse"]).read_bytes())
    with pytest.raises(FileRefused, match="unknown source"):
        parse_file("csv", b"a,b")


def test_rating_rule():
    rule = RatingRule()
    assert [rule.rate(v) for v in (1, 0, -1, True, False, "up", "Thumbs-Down", "1", 0.5)] == \
        ["up", "down", "down", "up", "down", "up", "down", "up", None]
    with pytest.raises(ValueError, match="below up_min"):
        RatingRule(up_min=1, down_max=1)
    with pytest.raises(ValueError, match="finite"):
        RatingRule(up_min=float("nan"))
