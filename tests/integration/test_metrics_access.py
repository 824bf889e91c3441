"""/metrics through a real API: tenant-free without a token, everything behind one, and the
Postgres-read gauges cached between scrapes."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.metrics import sample
from tests.helpers.stack import ApiProcess, flywheel_env

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def open_api(api_settings, stack_root):
    settings = {k: v for k, v in api_settings.items() if k != "metrics_token"}
    proc = ApiProcess(env=flywheel_env(**{**settings, "metrics_cache_s": "3"}),
                      log=stack_root / "api-metrics-open.log").start()
    yield proc
    proc.stop()


def test_without_a_token_metrics_name_no_tenant_and_db_gauges_are_cached(
        open_api, make_key, make_alias, tenant, db_sessions):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), 3)
    with httpx.Client(base_url=open_api.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        time.sleep(3.5)  # past any cached scrape from before this test's rows
        first = c.get("/metrics")
        assert first.status_code == 200
        assert tenant not in first.text and alias not in first.text
        assert "flywheel_gateway_latency_seconds_bucket" in first.text  # summed, not dropped
        before = sample(first.text, "flywheel_feedback_buffer")
        for i in ids:
            assert c.post("/v1/feedback", headers=bearer(key),
                          json={"interaction_id": i, "rating": "up"}).status_code == 201
        assert sample(c.get("/metrics").text, "flywheel_feedback_buffer") == before  # cached
        time.sleep(3.5)
        assert sample(c.get("/metrics").text, "flywheel_feedback_buffer") == before + 3


def test_with_a_token_only_its_bearer_gets_every_series(api, make_key, make_alias, tenant,
                                                         db_sessions):
    alias = make_alias(tenant)
    key = make_key(tenant, "product")
    seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), 1)
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert c.get("/metrics").status_code == 401
        wrong = c.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_metrics_token"
        assert c.get("/metrics", headers=bearer(key)).status_code == 401  # an API key is not it
        full = c.get("/metrics", headers=METRICS_AUTH)
        assert full.status_code == 200 and f'alias="{alias}"' in full.text
