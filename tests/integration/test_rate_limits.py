"""Feedback rate limits (poisoning guard) through a real API process and Redis."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.stack import api_with


@pytest.fixture(scope="module")
def limited_api(api_settings, stack_root):
    with api_with(api_settings, stack_root / "api-limits.log", feedback_rate_per_rater="3",
                  feedback_rate_per_tenant="8") as proc:
        yield proc


def test_rater_and_tenant_limits_answer_429_with_retry_after(limited_api, db_sessions, make_key,
                                                            make_alias, tenant):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), 12)
    with httpx.Client(base_url=limited_api.url, timeout=30) as c:
        def post(i, rater):
            return c.post("/v1/feedback", headers=bearer(key),
                          json={"interaction_id": ids[i], "rating": "down", "rater_id": rater})

        assert [post(i, "mallory").status_code for i in range(3)] == [201, 201, 201]
        r = post(3, "mallory")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rater_rate_limited"
        assert r.json()["error"]["param"] == "rater_id"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Other raters of the same tenant still get through, up to the tenant's limit (8).
        statuses = [post(4 + i, f"user{i}").status_code for i in range(6)]
        assert statuses[:4] == [201] * 4 and statuses[4:] == [429, 429]
        assert post(11, "user9").json()["error"]["code"] == "tenant_rate_limited"
        # Another tenant is unaffected.
        other = f"{tenant}-o"
        okey, oalias = make_key(other, "product"), make_alias(other)
        oid = seed_interactions(db_sessions, other, oalias, api_key_id(db_sessions, okey), 1)[0]
        assert c.post("/v1/feedback", headers=bearer(okey),
                      json={"interaction_id": oid, "rating": "up"}).status_code == 201
        assert 'flywheel_feedback_rate_limited_total{scope="rater"}' in c.get("/metrics", headers=METRICS_AUTH).text


@pytest.fixture(scope="module")
def per_key_api(api_settings, stack_root):
    with api_with(api_settings, stack_root / "api-per-key.log", feedback_rate_per_rater="2",
                  feedback_rate_per_key="5", feedback_rate_per_tenant="1000") as proc:
        yield proc


def test_a_key_inventing_rater_ids_meets_its_own_limit_and_raters_are_per_key(
        per_key_api, db_sessions, make_key, make_alias, tenant):
    from workers.stages.train import load_rated

    mallory, other = make_key(tenant, "product"), make_key(tenant, "product")
    alias = make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, mallory), 8)
    oids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, other), 3)
    with httpx.Client(base_url=per_key_api.url, timeout=30) as c:
        codes = [c.post("/v1/feedback", headers=bearer(mallory), json={
            "interaction_id": i, "rating": "up", "rater_id": f"sock{n}"}).status_code
            for n, i in enumerate(ids[:7])]
        assert codes == [201] * 5 + [429, 429]
        r = c.post("/v1/feedback", headers=bearer(mallory),
                   json={"interaction_id": ids[7], "rating": "up", "rater_id": "sock99"})
        assert r.json()["error"]["code"] == "key_rate_limited"
        # Another key of the tenant has its own window, and its "sock0" is another rater.
        assert [c.post("/v1/feedback", headers=bearer(other), json={
            "interaction_id": i, "rating": "up", "rater_id": "sock0"}).status_code
            for i in oids] == [201, 201, 429]
    # The worker reads who posted each rating: the dataset's per-key cap groups by it.
    with db_sessions() as s:
        from service.db.models import Adapter
        adapter_id = s.scalars(select(Adapter.id).where(Adapter.tenant_id == tenant)).one()
        rated = load_rated(s, adapter_id, 0, 2**62)
    assert {r.posted_by for r in rated} == {str(api_key_id(db_sessions, mallory)),
                                             str(api_key_id(db_sessions, other))}
    assert sum(r.posted_by == str(api_key_id(db_sessions, mallory)) for r in rated) == 5
