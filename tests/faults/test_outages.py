"""Outages of vLLM and Postgres give 503 with a reason, never a traceback; storing failures count."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy import text

from service.db import migrate
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.embedded import ensure_postgres, free_port, stop_postgres
from service.security import display_prefix, generate_key, hash_key
from tests.conftest import bearer
from tests.helpers.stack import REPO, ApiProcess, flywheel_env

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


def test_database_outage_is_503_then_recovers(api_settings, stack_root, tmp_path):
    root = tmp_path / "pg"
    url = ensure_postgres(root)
    migrate.upgrade(url)
    engine = make_sync_engine(url)
    from sqlalchemy.orm import sessionmaker

    sessions = sessionmaker(engine)
    key = generate_key()
    with session_scope(sessions) as s:
        repo.create_api_key(s, tenant_id="outage", role="product", key_hash=hash_key(key),
                            prefix=display_prefix(key))
        repo.ensure_adapter(s, "outage", "bot")
    engine.dispose()
    proc = ApiProcess(env=flywheel_env(**{**api_settings, "database_url": url}),
                      log=stack_root / "api-db-outage.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", headers=bearer(key), json={**CHAT, "model": "bot"})
            assert r.status_code == 200
            iid = r.headers["x-interaction-id"]
            stop_postgres(root)
            time.sleep(1.5)  # past the auth and routing caches
            for method, path, body in [
                ("POST", "/v1/chat/completions", {**CHAT, "model": "bot"}),
                ("POST", "/v1/feedback", {"interaction_id": iid, "rating": "up"}),
                ("GET", f"/v1/interactions/{iid}", None),
            ]:
                r = c.request(method, path, json=body, headers=bearer(key))
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "database_unavailable"
                assert "retry-after" in r.headers
            assert c.get("/readyz").json()["checks"]["database"].startswith("unavailable")
            ensure_postgres(root)
            deadline = time.monotonic() + 20
            while True:
                r = c.post("/v1/feedback", headers=bearer(key), json={"interaction_id": iid, "rating": "up"})
                if r.status_code == 201 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert r.status_code == 201, r.text
    finally:
        proc.stop()
        stop_postgres(root)


def test_storage_failure_still_answers_and_is_counted(client, db_url, make_key, make_alias, tenant):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    constraint = f"reject_{uuid.uuid4().hex[:8]}"
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE interactions ADD CONSTRAINT {constraint} "
                     f"CHECK (alias <> '{alias}') NOT VALID")
    try:
        before = _storage_failures(client)
        r = client.post("/v1/chat/completions", headers=bearer(key), json={**CHAT, "model": alias})
        assert r.status_code == 200 and r.json()["choices"]
        iid = r.headers["x-interaction-id"]
        assert _storage_failures(client) == before + 1
        assert client.get(f"/v1/interactions/{iid}", headers=bearer(key)).status_code == 404
    finally:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE interactions DROP CONSTRAINT {constraint}")


def _storage_failures(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('flywheel_storage_failures_total{kind="interaction"}'):
            return float(line.split()[-1])
    return 0.0


def test_api_refuses_to_start_on_unmigrated_database(db_url, api_settings):
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    fresh = db_url.replace("/flywheel?", f"/{name}?")
    env = flywheel_env(**{**api_settings, "database_url": fresh})
    r = subprocess.run([sys.executable, "-m", "service.cli", "api", "--port", str(free_port())],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "flywheel migrate" in r.stderr and "revision none" in r.stderr
    r = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    engine = make_sync_engine(fresh)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM interactions")).scalar() == 0
    engine.dispose()
