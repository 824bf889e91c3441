"""Group commit of ratings against the real Postgres and of rate-limit counts against the real
Redis; and through the API, a concurrent burst keeps every rating and every limit exact."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from service.db import hotpath
from service.db.models import Feedback
from service.intake.ratelimit import window_counter
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.metrics import sample
from tests.helpers.stack import api_with


@pytest.fixture()
async def fast_pool(db_url):
    pool = hotpath.make_pool(db_url, size=2, timeout_s=5)
    await pool.open(wait=True)
    yield pool
    await pool.close()


@pytest.fixture()
def seeded(db_sessions, make_key, make_alias, tenant):
    key = make_key(tenant, "product")
    key_id = api_key_id(db_sessions, key)
    ids = [uuid.UUID(i) for i in seed_interactions(db_sessions, tenant, make_alias(tenant),
                                                   key_id, 4)]
    return tenant, key, key_id, ids


def _write(tenant, key_id, iid, rater, rating="up", owner=None, **kw):
    return hotpath.FeedbackWrite(interaction_id=iid, tenant_id=tenant, owner_key=owner,
                                 rater_id=rater, rating=rating, correction=kw.get("correction"),
                                 comment=kw.get("comment"), api_key_id=key_id)


def _rows(db_sessions, ids) -> dict[tuple[uuid.UUID, str], Feedback]:
    with db_sessions() as s:
        return {(f.interaction_id, f.rater_id): f for f in s.scalars(
            select(Feedback).where(Feedback.interaction_id.in_(ids)))}


async def test_one_batch_upserts_repeats_in_order_and_skips_what_the_caller_cannot_see(
        fast_pool, seeded, db_sessions):
    tenant, _, key_id, (a, b, c, _) = seeded
    stranger = uuid.uuid4()  # another product key: must not rate this key's interactions
    out = await hotpath.upsert_feedback_many(fast_pool, [
        _write(tenant, key_id, a, "ann", "up"),
        _write(tenant, key_id, b, "ann", "down", correction="better\x00 answer"),
        _write(tenant, key_id, a, "ann", "down", comment="changed my mind"),  # same pair again
        _write(tenant, key_id, uuid.uuid4(), "ann"),                          # no such interaction
        _write(f"{tenant}-other", key_id, c, "ann"),                          # another tenant
        _write(tenant, key_id, c, "ann", owner=stranger),
        _write(tenant, key_id, c, "bob", owner=key_id),
    ])
    assert [r is not None for r in out] == [True, True, True, False, False, False, True]
    assert out[0].replaced is False and out[2].replaced is True and out[2].id == out[0].id
    assert out[2].seq > out[0].seq  # a replaced rating counts as new for the trigger
    rows = _rows(db_sessions, [a, b, c])
    assert set(rows) == {(a, "ann"), (b, "ann"), (c, "bob")}
    assert rows[(a, "ann")].rating == "down" and rows[(a, "ann")].comment == "changed my mind"
    assert rows[(b, "ann")].correction == "better\ufffd answer"


async def test_a_rating_the_database_refuses_fails_alone(fast_pool, seeded, db_sessions):
    tenant, _, key_id, (a, b, c, d) = seeded
    out = await hotpath.upsert_feedback_many(fast_pool, [
        _write(tenant, key_id, a, "carol"),
        _write(tenant, key_id, b, "x" * 300),  # over the column's 200 characters
        _write(tenant, key_id, c, "carol"),
    ])
    assert out[0] is not None and out[2] is not None
    assert "too long" in str(out[1])
    assert set(_rows(db_sessions, [a, b, c, d])) == {(a, "carol"), (c, "carol")}


async def test_batched_counts_are_what_one_incr_per_call_gives(broker_url):
    redis = Redis.from_url(broker_url)
    try:
        counter = window_counter(redis)
        t, r1, r2 = (f"test:rl:{uuid.uuid4().hex}:{k}" for k in ("t", "r1", "r2"))
        calls = [(t, r1), (t, r2), (t, r1), (t, r1), (t, r2)]
        got = await asyncio.gather(*(counter.submit(c) for c in calls))
        assert got == [[1, 1], [2, 1], [3, 2], [4, 3], [5, 2]]
        assert counter.batches < len(calls)  # they shared round trips
        assert 0 < await redis.ttl(t) <= 120
        assert await counter.submit((t,)) == [6]
        await redis.delete(t, r1, r2)
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def burst_api(api_settings, stack_root):
    with api_with(api_settings, stack_root / "api-burst.log", feedback_rate_per_rater="10",
                  feedback_rate_per_tenant="1000") as proc:
        yield proc


async def test_a_concurrent_burst_keeps_every_rating_and_the_limits_exact(
        burst_api, db_sessions, make_key, make_alias, tenant):
    key = make_key(tenant, "product")
    ids = seed_interactions(db_sessions, tenant, make_alias(tenant),
                            api_key_id(db_sessions, key), 30)
    async with httpx.AsyncClient(base_url=burst_api.url, timeout=30) as c:
        async def post(iid, rater, rating):
            r = await c.post("/v1/feedback", headers=bearer(key),
                             json={"interaction_id": iid, "rating": rating, "rater_id": rater})
            return r.status_code

        # 30 raters x 1 rating, the same 30 again (replacements), and 25 from one rater
        # whose limit is 10: all at once.
        burst = [post(iid, f"u{n}", "up") for n, iid in enumerate(ids)]
        burst += [post(iid, f"u{n}", "down") for n, iid in enumerate(ids)]
        burst += [post(ids[n], "mallory", "down") for n in range(25)]
        statuses = await asyncio.gather(*burst)
    assert all(s in (200, 201) for s in statuses[:60]), statuses[:60]
    assert sorted(statuses[60:]).count(429) == 15
    assert sum(s in (200, 201) for s in statuses[60:]) == 10
    rows = _rows(db_sessions, [uuid.UUID(i) for i in ids])
    assert len([k for k in rows if k[1].startswith("u")]) == 30
    # Fewer statements than accepted ratings: the burst shared them.
    metrics = httpx.get(f"{burst_api.url}/metrics", headers=METRICS_AUTH).text
    written = sample(metrics, "flywheel_feedback_batch_size_sum")
    statements = sample(metrics, "flywheel_feedback_batch_size_count")
    assert written == 70 and statements < written
    assert len([k for k in rows if k[1] == "mallory"]) == 10
