"""The outbox writes spooled records back into a real Postgres: in order, once, and a record
Postgres refuses is set aside without blocking the ones behind it."""

from __future__ import annotations

import asyncio
import json
import uuid

from sqlalchemy import text

from service.db import hotpath
from service.db import repositories as repo
from service.db.session import session_scope
from service.intake.outbox import Outbox
from service.intake.spool import Spool


def _values(tenant: str, adapter_id, n: int) -> dict:
    return {"id": uuid.uuid4(), "tenant_id": tenant, "api_key_id": None, "alias": "bot",
            "adapter_id": adapter_id, "version_id": None, "served_model": "base",
            "user": None, "messages": [{"role": "user", "content": f"q{n}"}],
            "params": {"temperature": 0}, "stream": False, "response_text": f"a{n}",
            "finish_reason": "stop", "created_at": "2026-01-02T03:04:05+00:00"}


def _rating(iid, tenant: str, rating: str) -> hotpath.FeedbackWrite:
    return hotpath.FeedbackWrite(interaction_id=iid, tenant_id=tenant, owner_key=None,
                                 rater_id="r1", rating=rating, correction=None, comment=None,
                                 api_key_id=None, id=uuid.uuid4())


def test_spooled_records_are_written_back_in_order_once(db_url, db_sessions, tenant, tmp_path):
    with session_scope(db_sessions) as s:
        adapter_id = repo.ensure_adapter(s, tenant, "bot").id
    good, poisoned = _values(tenant, adapter_id, 1), _values("no-such-tenant", None, 2)
    later = _values(tenant, adapter_id, 3)
    arrived: list[str] = []

    async def scenario() -> tuple[int, int]:
        pool = hotpath.make_pool(db_url, size=2, timeout_s=3)
        await pool.open()
        outbox = Outbox(Spool(tmp_path / "spool", max_bytes=1 << 20), pool,
                        on_feedback=lambda row, write: arrived.append(write.rating))
        outbox.open()
        try:
            await outbox.add_interaction(good)
            await outbox.add_feedback(_rating(good["id"], tenant, "down"))
            await outbox.add_feedback(_rating(good["id"], tenant, "up"))  # the later one wins
            await outbox.add_interaction(poisoned)  # its tenant does not exist: refused
            await outbox.add_feedback(_rating(poisoned["id"], "no-such-tenant", "up"))
            await outbox.add_interaction(later)
            assert outbox.held(good["id"]) is not None and outbox.depth == 6
            written = await outbox.replay_once()
            assert outbox.held(good["id"]) is None and outbox.depth == 0
            return written, await outbox.replay_once()
        finally:
            outbox.spool.close()
            await pool.close()

    written, again = asyncio.run(scenario())
    assert (written, again) == (6, 0)
    assert arrived == ["down", "up"]
    with db_sessions() as s:
        rows = s.execute(text("SELECT id, response_text, created_at FROM interactions "
                              "WHERE tenant_id = :t ORDER BY response_text"), {"t": tenant}).all()
        assert [r.response_text for r in rows] == ["a1", "a3"]
        assert rows[0].created_at.isoformat() == "2026-01-02T03:04:05+00:00"  # when it was served
        ratings = s.execute(text("SELECT rating FROM feedback WHERE interaction_id = :i"),
                            {"i": good["id"]}).scalars().all()
        assert ratings == ["up"]
    [rejected] = (tmp_path / "spool" / "rejected").iterdir()
    lines = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [(x["record"]["kind"], x["error"]) for x in lines] == [
        ("interaction", "ForeignKeyViolation"), ("feedback", "LookupError")]
    assert oct(rejected.stat().st_mode & 0o777) == "0o600"


def test_a_replay_after_a_crash_writes_nothing_twice(db_url, db_sessions, tenant, tmp_path):
    """Records written back but not yet cleared (the process died in between) are replayed by
    the next process: the interaction is not duplicated and the rating stays one row."""
    with session_scope(db_sessions) as s:
        adapter_id = repo.ensure_adapter(s, tenant, "bot").id
    values = _values(tenant, adapter_id, 1)

    async def scenario() -> None:
        pool = hotpath.make_pool(db_url, size=2, timeout_s=3)
        await pool.open()
        first = Outbox(Spool(tmp_path / "spool", max_bytes=1 << 20), pool)
        first.open()
        await first.add_interaction(values)
        await first.add_feedback(_rating(values["id"], tenant, "up"))
        await first.add_interaction(_values(tenant, adapter_id, 2))
        # Written back, then the process dies before clearing them from its spool file.
        for _, records, _ in first.spool.pending():
            for record in records:
                await first._write_back(record)
        first.spool.close()  # the lock goes with the process; the file and its records stay
        second = Outbox(Spool(tmp_path / "spool", max_bytes=1 << 20), pool)
        second.open()
        assert second.depth == 3
        assert await second.replay_once() == 3
        assert second.depth == 0
        second.spool.close()
        await pool.close()

    asyncio.run(scenario())
    with db_sessions() as s:
        assert s.execute(text("SELECT count(*) FROM interactions WHERE tenant_id = :t"),
                         {"t": tenant}).scalar() == 2
        assert s.execute(text("SELECT count(*) FROM feedback WHERE interaction_id = :i"),
                         {"i": values["id"]}).scalar() == 1
