"""Wake-ups through the real Redis broker: the sweeper sends one per waiting job, not one per
round, and sends again once a worker has taken the last one."""

from __future__ import annotations

import uuid

import pytest
from redis import Redis

from service import wakeup
from service.config import Settings
from service.db.models import AdapterVersion
from service.db.session import session_scope
from service.domain import exports
from service.domain.policy import PolicyStore
from workers.context import WorkerContext
from workers.pipeline import sweep


@pytest.fixture()
def queue(broker_url) -> Redis:
    client = Redis.from_url(broker_url)
    yield client
    client.close()


@pytest.fixture()
def export_id(db_sessions, version_id) -> uuid.UUID:
    # version_id's teardown settles the export, so no later module's sweeper finds it.
    with session_scope(db_sessions) as s:
        export, _ = exports.request_export(s, s.get(AdapterVersion, version_id), fmt="gguf",
                                           quant="q8_0", fallback=False, actor="test")
        return export.id


def _waiting(queue: Redis) -> int:
    return queue.llen(wakeup.TRAINING_QUEUE)


def test_a_resend_waits_while_a_wake_up_is_queued_and_follows_once_it_is_taken(
        broker_url, queue):
    ident = uuid.uuid4()
    before = _waiting(queue)
    assert wakeup.wake_export(broker_url, ident, resend_after_s=60)
    assert not wakeup.wake_export(broker_url, ident, resend_after_s=60)
    assert _waiting(queue) == before + 1
    assert 0 < queue.ttl(f"fw:wake:export:{ident}") <= 60
    wakeup.taken(broker_url, wakeup.EXPORT, ident)
    assert wakeup.wake_export(broker_url, ident, resend_after_s=60)
    # A direct wake-up (a new job, the next step of a run) is always sent.
    assert wakeup.wake_export(broker_url, ident)
    assert _waiting(queue) == before + 3


def test_the_sweeper_does_not_pile_wake_ups_onto_a_waiting_job(
        db_url, broker_url, db_sessions, queue, export_id, tmp_path):
    settings = Settings(database_url=db_url, broker_url=broker_url, policy_dir=tmp_path)
    ctx = WorkerContext(settings=settings, sessions=db_sessions,
                        policies=PolicyStore(settings.policy_dir), worker_id="test-sweeper")
    assert sweep(ctx)["exports_enqueued"] >= 1  # ours, and any job earlier tests left waiting
    before = _waiting(queue)
    for _ in range(3):
        assert sweep(ctx)["exports_enqueued"] == 0
    assert _waiting(queue) == before
    wakeup.taken(broker_url, wakeup.EXPORT, export_id)  # a worker took it, then died
    assert sweep(ctx)["exports_enqueued"] == 1
    assert _waiting(queue) == before + 1
