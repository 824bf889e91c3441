"""Feedback rate limits (poisoning guard) through a real API process and Redis."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import METRICS_AUTH, bearer
from tests.helpers.data import seed_interactions
from tests.integration.test_trigger import _key_id
from tests.helpers.stack import ApiProcess, flywheel_env


@pytest.fixture(scope="module")
def limited_api(api_settings, stack_root):
    env = flywheel_env(**{**api_settings, "feedback_rate_per_rater": "3", "feedback_rate_per_tenant": "8"})
    proc = ApiProcess(env=env, log=stack_root / "api-limits.log").start()
    yield proc
    proc.stop()


def test_rater_and_tenant_limits_answer_429_with_retry_after(limited_api, db_sessions, make_key,
                                                            make_alias, tenant):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, _key_id(db_sessions, key), 12)
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
        oid = seed_interactions(db_sessions, other, oalias, _key_id(db_sessions, okey), 1)[0]
        assert c.post("/v1/feedback", headers=bearer(okey),
                      json={"interaction_id": oid, "rating": "up"}).status_code == 201
        assert 'flywheel_feedback_rate_limited_total{scope="rater"}' in c.get("/metrics", headers=METRICS_AUTH).text
