"""service.domain.exports against the real Postgres: dedupe, the lease, a dead worker's job handed on,
giving up on a job that keeps killing its worker; and the schema matches the models."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from redis.asyncio import Redis
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from service.api import download_links as links
from service.db import migrate
from service.db.models import AdapterVersion, AuditEvent, Base, Export, ExportStatus
from service.db.session import session_scope
from service.domain import exports


def _request(db_sessions, version_id, quant="q8_0", fallback=False):
    with session_scope(db_sessions) as s:
        export, created = exports.request_export(s, s.get(AdapterVersion, version_id), fmt="gguf",
                                                 quant=quant, fallback=fallback, actor="test")
        return export.id, created


def _expire(db_sessions, export_id):
    with session_scope(db_sessions) as s:
        s.execute(text("UPDATE exports SET lease_expires_at = now() - interval '1 second' "
                       "WHERE id = :id"), {"id": export_id})


def test_one_job_per_identical_request_until_it_settles(db_sessions, version_id):
    first, created = _request(db_sessions, version_id)
    assert created
    assert _request(db_sessions, version_id) == (first, False)
    other, created = _request(db_sessions, version_id, quant="f16")
    assert created and other != first
    with session_scope(db_sessions) as s:
        assert exports.claim(s, first, "w1", 30)
        assert exports.finish(s, first, "w1", ExportStatus.failed, failure_reason="numbers")
    again, created = _request(db_sessions, version_id)  # a failed export may be asked again
    assert created and again != first
    with session_scope(db_sessions) as s:
        assert exports.claim(s, again, "w1", 30)
        assert exports.finish(s, again, "w1", ExportStatus.passed, sha256="a" * 64)
    assert _request(db_sessions, version_id) == (again, False)  # a passed one is reused


def test_the_index_refuses_a_second_active_job_whatever_the_caller(db_sessions, version_id):
    first, _ = _request(db_sessions, version_id)
    with pytest.raises(Exception, match="uq_exports_one_active"), session_scope(db_sessions) as s:
        s.execute(text("""INSERT INTO exports (id, tenant_id, adapter_id, version_id, format, quant,
                          fallback, status, requested_by, files, lineage, progress, metrics,
                          attempts) SELECT :id, tenant_id, adapter_id, version_id, format, quant,
                          false, 'queued', 'x', '[]', '{}', '{}', '{}', 0 FROM exports
                          WHERE id = :first"""), {"id": uuid.uuid4(), "first": first})


def test_lease_keeps_a_second_worker_out_until_it_expires(db_sessions, version_id):
    export_id, _ = _request(db_sessions, version_id)
    with session_scope(db_sessions) as s:
        assert exports.claim(s, export_id, "w1", 30)
        assert not exports.claim(s, export_id, "w2", 30)  # a duplicate delivery finds nothing
        assert exports.report(s, export_id, "w1", 30, {"stage": "merge: loading"})
        assert not exports.report(s, export_id, "w2", 30, {"stage": "bogus"})
        assert export_id not in exports.claimable_exports(s)
    _expire(db_sessions, export_id)  # w1 died (kill -9): its lease runs out
    with session_scope(db_sessions) as s:
        assert export_id in exports.claimable_exports(s)
        assert exports.claim(s, export_id, "w2", 30)
        # The stalled first worker can neither report nor finish over the new owner.
        assert not exports.report(s, export_id, "w1", 30, {"stage": "late"})
        assert not exports.finish(s, export_id, "w1", ExportStatus.passed)
        assert exports.finish(s, export_id, "w2", ExportStatus.passed, sha256="b" * 64)
        row = s.get(Export, export_id)
        assert (row.status, row.attempts, row.lease_owner) == ("passed", 2, None)
        assert row.progress == {"stage": "merge: loading"} and row.finished_at is not None


def test_delete_frees_the_files_keeps_the_record_and_waits_for_running_jobs(db_sessions,
                                                                            version_id, tmp_path):
    export_id, _ = _request(db_sessions, version_id)
    with session_scope(db_sessions) as s:
        with pytest.raises(exports.ExportRefused, match="wait for it to finish"):
            exports.delete_export(s, s.get(Export, export_id), actor="test", reason=None)
    job_dir = tmp_path / str(export_id)
    (job_dir / "gguf-q8_0").mkdir(parents=True)
    (job_dir / "gguf-q8_0" / "model.gguf").write_bytes(b"GGUF")
    with session_scope(db_sessions) as s:
        assert exports.claim(s, export_id, "w1", 30)
        assert exports.finish(s, export_id, "w1", ExportStatus.passed, bytes=4,
                              path=str(job_dir / "gguf-q8_0"),
                              files=[{"name": "model.gguf", "bytes": 4, "sha256": "x"}])
    with session_scope(db_sessions) as s:
        row = s.get(Export, export_id)
        doomed = exports.delete_export(s, row, actor="test", reason="disk")
        assert (row.status, row.path, row.files) == ("deleted", None, [])
        assert job_dir.exists()  # nothing removed before the commit
    exports.remove_files(doomed)
    assert not job_dir.exists()
    with db_sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.target_id == str(export_id),
                                                   AuditEvent.action == "export.deleted")).one()
    assert event.reason == "disk" and event.detail["bytes"] == 4
    # A deleted export does not count as the passed copy of the same request.
    assert _request(db_sessions, version_id)[1] is True


def test_a_job_that_keeps_killing_its_worker_is_given_up_with_a_reason(db_sessions, version_id):
    export_id, _ = _request(db_sessions, version_id)
    for i in range(exports.MAX_ATTEMPTS):
        with session_scope(db_sessions) as s:
            assert exports.claim(s, export_id, f"w{i}", 30)
        _expire(db_sessions, export_id)
    with session_scope(db_sessions) as s:
        assert export_id not in exports.claimable_exports(s)
        row = s.get(Export, export_id)
        assert row.status == "error" and "gave up after 3 attempts" in row.failure_reason
        assert not exports.claim(s, export_id, "w9", 30)
        assert s.scalars(select(AuditEvent).where(AuditEvent.target_id == str(export_id),
                                                  AuditEvent.action == "export.error")).one()


def test_database_schema_matches_the_models(db_url):
    """Migrations and models agree (0001 once lost four foreign keys this way)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_migrations_downgrade_and_upgrade_cleanly(db_url):
    scratch = f"flywheel_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{scratch}"'))
    url = make_url(db_url).set(database=scratch).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        command.downgrade(migrate.alembic_config(url), "0001")
        command.downgrade(migrate.alembic_config(url), "base")
        migrate.upgrade(url)
        engine = create_engine(url)
        migrate.check_migrated(engine, url)  # at head again
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{scratch}" WITH (FORCE)'))
        admin.dispose()


def test_download_links_expire_and_are_stored_hashed(broker_url):
    async def go():
        redis = Redis.from_url(broker_url)
        try:
            target = links.LinkTarget(uuid.uuid4(), "model.gguf", "t-1")
            token = await links.create_link(redis, target, ttl_s=1)
            assert await links.resolve_link(redis, token) == target
            stored = await redis.keys("fw:dl:*")
            assert token.encode() not in b"".join(stored)  # only the token's hash is kept
            assert f"fw:dl:{hashlib.sha256(token.encode()).hexdigest()}".encode() in stored
            await asyncio.sleep(1.2)
            assert await links.resolve_link(redis, token) is None
            assert await links.resolve_link(redis, "not-a-token") is None
        finally:
            await redis.aclose()

    asyncio.run(go())


def test_a_one_time_link_opens_exactly_one_download_even_when_raced(broker_url):
    async def go():
        redis = Redis.from_url(broker_url)
        try:
            target = links.LinkTarget(uuid.uuid4(), "model.gguf", "t-1")
            token = await links.create_link(redis, target, ttl_s=30, one_time=True)
            got = await asyncio.gather(*(links.resolve_link(redis, token) for _ in range(20)))
            assert got.count(target) == 1 and got.count(None) == 19
            reusable = await links.create_link(redis, target, ttl_s=30)
            assert [await links.resolve_link(redis, reusable) for _ in range(3)] == [target] * 3
        finally:
            await redis.aclose()

    asyncio.run(go())
