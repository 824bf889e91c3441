"""A Postgres outage loses nothing: answered chats and accepted ratings go to the local spool and
are written back, exactly once, when Postgres returns, even after a kill -9 of the API."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from service.db import migrate
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.local.embedded import ensure_postgres, stop_postgres
from service.security import display_prefix, generate_key, hash_key
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.metrics import sample
from tests.helpers.stack import ApiProcess, flywheel_env

pytestmark = [pytest.mark.faults, pytest.mark.vllm]


class OwnDatabase:
    """A Postgres of the test's own, to stop and start, with one product key and alias."""

    def __init__(self, root) -> None:
        self.root = root
        self.url = ensure_postgres(root)
        migrate.upgrade(self.url)
        self.engine = make_sync_engine(self.url)
        self.sessions = sessionmaker(self.engine)
        self.key = generate_key()
        with session_scope(self.sessions) as s:
            repo.create_api_key(s, tenant_id="spool", role="product", key_hash=hash_key(self.key),
                                prefix=display_prefix(self.key))
            repo.ensure_adapter(s, "spool", "bot")

    def rows(self, sql: str) -> list:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)))

    def close(self) -> None:
        self.engine.dispose()
        stop_postgres(self.root)


@pytest.fixture
def own_db(tmp_path):
    db = OwnDatabase(tmp_path / "pg")
    yield db
    db.close()


def _api(api_settings, db: OwnDatabase, tmp_path, name: str) -> ApiProcess:
    env = flywheel_env(**{**api_settings, "database_url": db.url,
                          "data_dir": str(tmp_path / "data"), "feedback_rate_per_rater": "0",
                          "spool_replay_interval_s": "0.2"})
    return ApiProcess(env=env, log=tmp_path / f"{name}.log").start()


def _chat(c: httpx.Client, key: str, n: int, stream: bool) -> tuple[int, str | None, str]:
    """(status, interaction id, the answer's text as the client saw it)."""
    body = {"model": "bot", "messages": [{"role": "user", "content": f"hello {n}"}],
            "max_tokens": 4, "stream": stream}
    if not stream:
        r = c.post("/v1/chat/completions", headers=bearer(key), json=body)
        answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
        return r.status_code, r.headers.get("x-interaction-id"), answer
    with c.stream("POST", "/v1/chat/completions", headers=bearer(key), json=body) as r:
        parts, done = [], False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event  # the spool took it: no storage error
            for choice in event.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
        ok = r.status_code == 200 and done
        return (200 if ok else r.status_code), r.headers.get("x-interaction-id"), "".join(parts)


def _wait_drained(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=10) as c:
        while time.monotonic() < deadline:
            ready = c.get("/readyz").json()
            if ready["checks"]["database"] == "ok" and ready["spool"]["records"] == 0:
                return ready
            time.sleep(0.3)
    raise AssertionError(f"the spool did not drain within {timeout} s: {ready}")


def test_postgres_outage_under_chats_and_ratings_loses_nothing(api_settings, own_db, tmp_path):
    proc = _api(api_settings, own_db, tmp_path, "api-spool")
    answered: dict[str, str] = {}  # interaction id -> the text the client got
    accepted: dict[str, int] = {}  # interaction id -> status of its rating (201 or 202)
    chat_status: list[int] = []
    rating_status: list[int] = []
    stop = threading.Event()

    def load() -> None:  # chats (a third of them streamed), each rated right after its answer
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                status, iid, answer = _chat(c, own_db.key, n, stream=n % 3 == 0)
                chat_status.append(status)
                if status == 200:
                    answered[iid] = answer
                    r = c.post("/v1/feedback", headers=bearer(own_db.key),
                               json={"interaction_id": iid, "rating": "up" if n % 2 else "down",
                                     "correction": None if n % 2 else f"better {n}"})
                    rating_status.append(r.status_code)
                    if r.status_code in (201, 202):
                        accepted[iid] = r.status_code
                    else:
                        assert r.json()["error"]["code"] == "database_unavailable", r.text
                n += 1

    worker = threading.Thread(target=load)
    try:
        worker.start()
        time.sleep(2)
        before = len(answered)
        stop_postgres(own_db.root)
        time.sleep(12)
        during = len(answered) - before
        ensure_postgres(own_db.root)
        time.sleep(3)
    finally:
        stop.set()
        worker.join(60)
    ready = _wait_drained(proc.url)
    with httpx.Client(base_url=proc.url, timeout=10) as c:
        metrics = c.get("/metrics", headers=METRICS_AUTH).text
    proc.stop()
    print(f"spool outage: {len(chat_status)} chats, {len(answered)} answered ({during} during "
          f"the outage), {len(accepted)} ratings accepted "
          f"({list(accepted.values()).count(202)} spooled), {rating_status.count(503)} ratings 503")
    assert set(chat_status) <= {200, 503} and set(rating_status) <= {201, 202, 503}
    assert during >= 5, "the outage was not served from the spool"
    assert list(accepted.values()).count(202) >= 5, "no rating waited in the spool"
    assert ready["spool"]["bytes"] == 0
    assert (sample(metrics, "flywheel_spooled_total", kind="interaction") or 0) >= during

    stored = {str(r.id): r for r in own_db.rows(
        "SELECT id, response_text, finish_reason FROM interactions")}
    missing = set(answered) - set(stored)
    assert not missing, f"{len(missing)} answered interactions were never stored"
    assert len(stored) == len(answered)  # nothing unanswered was kept either
    for iid, answer in answered.items():
        assert stored[iid].response_text == answer.replace("\x00", "\ufffd")  # Postgres text
        assert stored[iid].finish_reason not in (None, "pending")
    ratings = own_db.rows("SELECT interaction_id, rating, correction FROM feedback")
    assert sorted(str(r.interaction_id) for r in ratings) == sorted(accepted)  # each exactly once
    assert own_db.rows("SELECT count(*) FROM feedback WHERE correction IS NOT NULL")[0][0] == \
        sum(1 for r in ratings if r.rating == "down")


def test_a_killed_api_replays_its_spool_when_started_again(api_settings, own_db, tmp_path):
    proc = _api(api_settings, own_db, tmp_path, "api-killed")
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        assert _chat(c, own_db.key, 0, stream=False)[0] == 200  # key and route now cached
        stop_postgres(own_db.root)
        answered, spooled_ratings = {}, []
        for n in range(1, 9):
            status, iid, answer = _chat(c, own_db.key, n, stream=n % 2 == 0)
            assert status == 200
            answered[iid] = answer
            r = c.post("/v1/feedback", headers=bearer(own_db.key),
                       json={"interaction_id": iid, "rating": "up", "rater_id": f"r{n}"})
            assert r.status_code == 202 and r.json()["pending"] is True, r.text
            spooled_ratings.append(r.json()["id"])
        # A rating for an interaction that is not in the spool cannot be checked: 503.
        r = c.post("/v1/feedback", headers=bearer(own_db.key),
                   json={"interaction_id": str(uuid.uuid4()), "rating": "up"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
        # A stream the client drops mid-answer is kept too, with what was served of it.
        body = {"model": "bot", "messages": [{"role": "user", "content": "a long one"}],
                "max_tokens": 200, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/chat/completions", headers=bearer(own_db.key),
                      json=body) as r:
            dropped = r.headers["x-interaction-id"]
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["spool"]["records"] < 17 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/readyz").json()["spool"]["records"] == 17
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    ensure_postgres(own_db.root)
    assert own_db.rows("SELECT count(*) FROM interactions")[0][0] == 1

    again = _api(api_settings, own_db, tmp_path, "api-restarted")
    try:
        _wait_drained(again.url)
    finally:
        again.stop()
    stored = {str(r.id): r.response_text for r in own_db.rows(
        "SELECT id, response_text FROM interactions")}
    assert {i: stored.get(i) for i in answered} == {
        i: a.replace("\x00", "\ufffd") for i, a in answered.items()}
    [kept] = own_db.rows(f"SELECT finish_reason FROM interactions WHERE id = '{dropped}'")
    assert kept.finish_reason == "disconnected"
    ids = {str(i) for (i,) in own_db.rows("SELECT id FROM feedback")}
    assert ids == set(spooled_ratings)  # the ids the client got are the rows' ids
    assert not list((tmp_path / "data" / "spool").rglob("*.spool"))
