"""Feedback round trips and every bad input, through the real API and Postgres."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from service.db.models import Feedback
from tests.helpers.auth import METRICS_AUTH, bearer

pytestmark = pytest.mark.vllm


@pytest.fixture()
def served(client, make_key, make_alias, tenant):
    """A product key, its alias, and one real interaction id."""
    key = make_key(tenant, "product")
    alias = make_alias(tenant)
    r = client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    return key, alias, r.headers["x-interaction-id"]


def feedback_rows(db_sessions, iid) -> list[Feedback]:
    with db_sessions() as s:
        return list(s.scalars(select(Feedback).where(Feedback.interaction_id == uuid.UUID(iid))))


def test_feedback_round_trip_and_replacement(client, served, db_sessions):
    key, _, iid = served
    r = client.post("/v1/feedback", headers=bearer(key),
                    json={"interaction_id": iid, "rating": "up", "rater_id": "alice"})
    assert r.status_code == 201 and r.json()["replaced"] is False
    first_seq = feedback_rows(db_sessions, iid)[0].seq

    r = client.post("/v1/feedback", headers=bearer(key), json={
        "interaction_id": iid, "rating": "down", "rater_id": "alice",
        "correction": "Hello, support team!", "comment": "too short"})
    assert r.status_code == 200 and r.json()["replaced"] is True

    rows = feedback_rows(db_sessions, iid)
    assert len(rows) == 1
    assert rows[0].rating == "down" and rows[0].correction == "Hello, support team!"
    # A replaced rating counts as new feedback for the retraining trigger.
    assert rows[0].seq > first_seq

    client.post("/v1/feedback", headers=bearer(key),
                json={"interaction_id": iid, "rating": "up", "rater_id": "bob"})
    shown = client.get(f"/v1/interactions/{iid}", headers=bearer(key)).json()["feedback"]
    assert {(f["rater_id"], f["rating"]) for f in shown} == {("alice", "down"), ("bob", "up")}


def test_feedback_is_attributed_to_the_alias_and_version(client, served, db_sessions):
    key, alias, iid = served
    client.post("/v1/feedback", headers=bearer(key), json={"interaction_id": iid, "rating": "up"})
    row = feedback_rows(db_sessions, iid)[0]
    assert row.adapter_id is not None and row.version_id is None  # served by base
    assert row.rater_id.startswith("key:")


@pytest.mark.parametrize("body, field", [
    ({"rating": "up"}, "interaction_id"),
    ({"interaction_id": "not-a-uuid", "rating": "up"}, "interaction_id"),
    ({"interaction_id": "IID", "rating": "meh"}, "rating"),
    ({"interaction_id": "IID"}, "rating"),
    ({"interaction_id": "IID", "rating": "up", "correction": "   "}, "correction"),
    ({"interaction_id": "IID", "rating": "up", "ratting": "down"}, "ratting"),
    ({"interaction_id": "IID", "rating": "up", "rater_id": "x" * 201}, "rater_id"),
])
def test_bad_feedback_is_422_naming_the_field(client, served, db_sessions, body, field):
    key, _, iid = served
    body = {k: (iid if v == "IID" else v) for k, v in body.items()}
    r = client.post("/v1/feedback", headers=bearer(key), json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field
    assert feedback_rows(db_sessions, iid) == []


def test_malformed_json_is_422(client, served):
    key, _, _ = served
    r = client.post("/v1/feedback", headers={**bearer(key), "Content-Type": "application/json"},
                    content=b'{"interaction_id": ')
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"


def test_unknown_interaction_is_404(client, served, db_sessions):
    key, _, _ = served
    missing = str(uuid.uuid4())
    r = client.post("/v1/feedback", headers=bearer(key), json={"interaction_id": missing, "rating": "up"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "interaction_id"
    assert client.get(f"/v1/interactions/{missing}", headers=bearer(key)).status_code == 404
    with db_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Feedback)
                        .where(Feedback.interaction_id == uuid.UUID(missing))) == 0


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "M"}, "messages"),
    ({"model": "M", "messages": []}, "messages"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "bot\u0000", "messages": [{"role": "user", "content": "x"}]}, "model"),  # found by fuzzing
])
def test_bad_chat_request_is_422_naming_the_field(client, served, body, field):
    key, alias, _ = served
    body = {k: (alias if v == "M" else v) for k, v in body.items()}
    r = client.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field


def test_oversized_body_is_413(client, served, api_settings):
    key, alias, _ = served
    big = "x" * (int(api_settings["max_body_bytes"]) + 10)
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": alias, "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


def test_oversized_chunked_body_is_413(client, served, api_settings):
    key, _, iid = served
    limit = int(api_settings["max_body_bytes"])

    def chunks():  # no Content-Length: the server must count what arrives
        yield b'{"interaction_id": "' + iid.encode() + b'", "rating": "up", "comment": "'
        for _ in range(limit // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/feedback", headers={**bearer(key), "Content-Type": "application/json"},
                    content=chunks())
    assert r.status_code == 413


def test_feedback_metrics(client, served, api):
    key, alias, iid = served
    client.post("/v1/feedback", headers=bearer(key), json={"interaction_id": iid, "rating": "down"})
    text = client.get("/metrics", headers=METRICS_AUTH).text
    assert f'flywheel_feedback_total{{alias="{alias}",rating="down"}} 1.0' in text
