"""The exactly-once trigger through two real API processes sharing one Postgres."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from sqlalchemy import select

from service.db.models import Adapter, TrainingRun
from tests.helpers.auth import bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.stack import ApiProcess, flywheel_env

THRESHOLD = 20


@pytest.fixture(scope="module")
def trigger_policies(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    (d / "default.yaml").write_text(f"trigger: {{min_new_ratings: {THRESHOLD}}}\n")
    return d


@pytest.fixture(scope="module")
def two_apis(api_settings, trigger_policies, stack_root):
    """Two API processes on the same services, with a low threshold."""
    env = flywheel_env(**{**api_settings, "policy_dir": str(trigger_policies)})
    procs = [ApiProcess(env=env, log=stack_root / f"api-trigger-{i}.log").start() for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def test_concurrent_feedback_from_two_processes_creates_exactly_one_run(
        two_apis, db_sessions, make_key, make_alias, tenant, broker_url):
    key = make_key(tenant, "product")
    alias = make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), 50)
    r = redis.Redis.from_url(broker_url)
    queued_before = r.llen("training")

    def post(i: int) -> int:
        api = two_apis[i % 2]
        return httpx.post(f"{api.url}/v1/feedback", headers=bearer(key), timeout=30,
                          json={"interaction_id": ids[i], "rating": "up" if i % 3 else "down"}).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(post, range(50)))
    assert statuses == [201] * 50

    # The API checks the trigger within its debounce (0.25 s); wait well past it.
    time.sleep(1.5)
    with db_sessions() as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant, Adapter.alias == alias)).one()
        created = list(s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id)))
    assert len(created) == 1
    run = created[0]
    assert run.state == "pending"
    assert run.trigger["new_ratings"] >= THRESHOLD and run.trigger["reason"] == "threshold"
    assert adapter.feedback_watermark == run.feedback_seq_to
    assert run.policy["trigger"]["min_new_ratings"] == THRESHOLD
    # A worker was woken through Redis (one message per created run).
    assert r.llen("training") == queued_before + 1


def test_below_threshold_creates_nothing(two_apis, db_sessions, make_key, make_alias, tenant):
    key = make_key(tenant, "product")
    alias = make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), THRESHOLD - 1)
    for i, iid in enumerate(ids):
        assert httpx.post(f"{two_apis[i % 2].url}/v1/feedback", headers=bearer(key),
                          json={"interaction_id": iid, "rating": "up"}).status_code == 201
    time.sleep(1.0)
    with db_sessions() as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant)).one()
        assert s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id)).first() is None
