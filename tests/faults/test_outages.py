"""Outages of vLLM and Postgres give 503 with a reason, never a traceback; storing failures count."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from service.db import migrate
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.local.embedded import ensure_postgres, free_port, stop_postgres
from service.security import display_prefix, generate_key, hash_key
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.cli import flywheel
from tests.helpers.data import seed_interactions
from tests.helpers.metrics import sample
from tests.helpers.stack import ApiProcess, flywheel_env

pytestmark = [pytest.mark.faults, pytest.mark.vllm]

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def test_engine_unreachable_is_503_and_feedback_still_lands(api_settings, stack_root, client,
                                                           make_key, make_alias, tenant):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    iid = client.post("/v1/chat/completions", headers=bearer(key),
                      json={**CHAT, "model": alias}).headers["x-interaction-id"]
    dead = f"http://127.0.0.1:{free_port()}"
    broken = ApiProcess(env=flywheel_env(**{**api_settings, "vllm_urls": dead}),
                        log=stack_root / "api-dead-engine.log").start()
    try:
        with httpx.Client(base_url=broken.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", headers=bearer(key), json={**CHAT, "model": alias})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert "Traceback" not in r.text
            r = c.post("/v1/chat/completions", headers=bearer(key),
                       json={**CHAT, "model": alias, "stream": True})
            assert r.status_code == 503
            r = c.post("/v1/feedback", headers=bearer(key), json={"interaction_id": iid, "rating": "up"})
            assert r.status_code == 201
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["engine"].startswith("unavailable")
            assert ready.json()["checks"]["database"] == "ok"
    finally:
        broken.stop()


def test_postgres_restart_under_load_gives_503s_loses_nothing_and_recovers(api_settings, stack_root,
                                                                          tmp_path):
    root = tmp_path / "pg"
    url = ensure_postgres(root)
    migrate.upgrade(url)
    engine = make_sync_engine(url)
    sessions = sessionmaker(engine)
    key = generate_key()
    with session_scope(sessions) as s:
        key_row = repo.create_api_key(s, tenant_id="outage", role="product", key_hash=hash_key(key),
                                      prefix=display_prefix(key))
        repo.ensure_adapter(s, "outage", "bot")
        key_id = key_row.id
    ids = seed_interactions(sessions, "outage", "bot", key_id, 400)
    proc = ApiProcess(env=flywheel_env(**{**api_settings, "database_url": url,
                                          "feedback_rate_per_rater": "0"}),
                      log=stack_root / "api-db-outage.log").start()
    statuses: list[int] = []
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a steady feedback stream across the outage, one rating per interaction
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            for iid in ids:
                if stop.is_set():
                    return
                r = c.post("/v1/feedback", headers=bearer(key), json={"interaction_id": iid, "rating": "up"})
                statuses.append(r.status_code)
                if r.status_code == 201:
                    accepted.append(iid)
                elif r.status_code == 503:
                    assert r.json()["error"]["code"] == "database_unavailable"
                    assert "retry-after" in r.headers
                time.sleep(0.02)

    worker = threading.Thread(target=load)
    try:
        worker.start()
        time.sleep(1.5)
        stop_postgres(root)
        time.sleep(3)
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            assert c.get("/readyz").json()["checks"]["database"].startswith("unavailable")
        ensure_postgres(root)
        time.sleep(4)
    finally:
        stop.set()
        worker.join(30)
    sent, failed = len(statuses), statuses.count(503)
    print(f"postgres restart under load: {sent} sent, {failed} answered 503, "
          f"{sent - failed} accepted")
    assert set(statuses) <= {201, 503}, statuses  # never a 500
    assert failed > 0 and statuses[-1] == 201  # the outage was seen, and fully recovered from
    with session_scope(sessions) as s:
        stored = {str(i) for (i,) in s.execute(text("SELECT interaction_id FROM feedback"))}
    assert set(accepted) <= stored and len(accepted) == len(stored)  # 0 feedback rows lost
    proc.stop()
    engine.dispose()
    stop_postgres(root)


def test_a_row_postgres_refuses_is_not_answered_as_stored(client, db_url, make_key, make_alias,
                                                        tenant):
    """Not an outage (the spool is for those) but a refusal: the client gets a 500 saying so,
    never an interaction id for a row that does not exist."""
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    constraint = f"reject_{uuid.uuid4().hex[:8]}"
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE interactions ADD CONSTRAINT {constraint} "
                     f"CHECK (alias <> '{alias}') NOT VALID")
    try:
        before = _storage_failures(client)
        r = client.post("/v1/chat/completions", headers=bearer(key), json={**CHAT, "model": alias})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "interaction_not_stored"
        assert "CheckViolation" in r.json()["error"]["message"] and "Traceback" not in r.text
        assert "choices" not in r.json()
        assert _storage_failures(client) == before + 1
        with client.stream("POST", "/v1/chat/completions", headers=bearer(key),
                           json={**CHAT, "model": alias, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert any('"interaction_not_stored"' in e for e in events), events
    finally:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE interactions DROP CONSTRAINT {constraint}")


def _storage_failures(client) -> float:
    found = sample(client.get("/metrics", headers=METRICS_AUTH).text, "flywheel_storage_failures_total",
                   kind="interaction")
    return found or 0.0


def test_api_refuses_to_start_on_unmigrated_database(db_url, api_settings):
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    fresh = db_url.replace("/flywheel?", f"/{name}?")
    env = flywheel_env(**{**api_settings, "database_url": fresh})
    r = flywheel(env, "api", "--port", str(free_port()), timeout=60)
    assert r.returncode == 1
    assert "flywheel migrate" in r.stderr and "revision none" in r.stderr
    r = flywheel(env, "migrate", timeout=60)
    assert r.returncode == 0, r.stderr
    engine = make_sync_engine(fresh)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM interactions")).scalar() == 0
    engine.dispose()
