"""The auth matrix: role x tenant x route, through the real API and Postgres."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.db import repositories as repo
from service.db.session import session_scope
from service.security import hash_key
from tests.helpers.auth import bearer
from tests.helpers.stack import api_with

pytestmark = pytest.mark.vllm

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def routes(iid: str, alias: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("POST", "/v1/chat/completions", {**CHAT, "model": alias}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/feedback", {"interaction_id": iid, "rating": "up"}),
        ("GET", f"/v1/interactions/{iid}", None),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/runs", None),
        ("GET", f"/v1/adapters/{alias}", None),
        ("GET", f"/v1/adapters/{alias}/exports", None),
    ]


@pytest.fixture()
def world(client, make_key, make_alias, tenant):
    """Tenant A with two product keys and an ops key; tenant B with a product and an ops key."""
    other = f"{tenant}-b"
    keys = {"a_product": make_key(tenant, "product"), "a_product2": make_key(tenant, "product"),
            "a_ops": make_key(tenant, "ops"), "b_product": make_key(other, "product"),
            "b_ops": make_key(other, "ops")}
    alias = make_alias(tenant)
    r = client.post("/v1/chat/completions", headers=bearer(keys["a_product"]),
                    json={**CHAT, "model": alias})
    assert r.status_code == 200
    return keys, alias, r.headers["x-interaction-id"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer fw_not_a_real_key"},
                                     {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}])
def test_missing_or_invalid_key_is_401_on_every_route(client, world, headers):
    _, alias, iid = world
    for method, path, body in routes(iid, alias):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"


def test_role_and_tenant_matrix(client, world):
    keys, alias, iid = world
    expected = {
        # key: (chat, models, feedback, interaction, audit, runs, adapter, exports)
        "a_product": (200, 200, 201, 200, 403, 403, 403, 403),
        "a_product2": (200, 200, 404, 404, 403, 403, 403, 403),  # only own interactions
        "a_ops": (200, 200, 201, 200, 200, 200, 200, 200),
        "b_product": (404, 200, 404, 404, 403, 403, 403, 403),  # another tenant's alias: 404
        "b_ops": (404, 200, 404, 404, 200, 200, 404, 404),
    }
    for who, statuses in expected.items():
        got = tuple(client.request(m, p, json=b, headers=bearer(keys[who])).status_code
                    for m, p, b in routes(iid, alias))
        assert got == statuses, who


def test_keys_are_stored_hashed(db_sessions, make_key, tenant):
    key = make_key(tenant, "product")
    with db_sessions() as s:
        stored = [k for k in repo.list_api_keys(s, tenant)]
    assert len(stored) == 1
    assert stored[0].key_hash == hash_key(key) and key not in stored[0].key_hash


def test_revoked_key_is_refused_within_cache_ttl(client, db_sessions, make_key, tenant, api_settings):
    key = make_key(tenant, "product")
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    with session_scope(db_sessions) as s:
        row = [k for k in repo.list_api_keys(s, tenant)][0]
        repo.revoke_api_key(s, str(row.id))
    time.sleep(float(api_settings["auth_cache_ttl_s"]) + 0.2)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 401


def test_ops_audit_lists_only_own_tenant(client, db_sessions, world, tenant):
    keys, _, _ = world
    with session_scope(db_sessions) as s:
        repo.audit(s, tenant_id=tenant, actor="test", action="probe", target_type="x",
                   target_id=str(uuid.uuid4()))
    mine = client.get("/v1/audit", headers=bearer(keys["a_ops"])).json()
    theirs = client.get("/v1/audit", headers=bearer(keys["b_ops"])).json()
    assert [e["action"] for e in mine] == ["probe"]
    assert theirs == []


# Routes that answer without a key, and why: probes and scrapes, the ops page's static shell (it
# asks for a key itself), and export download links (the short-lived link is the credential).
PUBLIC = {"/healthz", "/readyz", "/metrics", "/ops", "/v1/downloads/{token}"}


def test_every_other_route_in_the_schema_needs_a_key(client):
    """A new route cannot ship without auth by accident: every operation in the OpenAPI schema
    outside PUBLIC answers 401 without a key."""
    schema = client.get("/openapi.json").json()
    checked = 0
    for path, ops in schema["paths"].items():
        if path in PUBLIC:
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path).replace("/x/", f"/{uuid.uuid4()}/")
        for method in ops:
            r = client.request(method.upper(), concrete, json={})
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            checked += 1
    assert checked >= 20


@pytest.fixture(scope="module")
def throttled_api(api_settings, stack_root):
    with api_with(api_settings, stack_root / "api-auth-flood.log", auth_failures_per_minute="20",
                  auth_cache_ttl_s="30") as proc:
        yield proc


def test_a_flood_of_random_keys_is_throttled_and_valid_keys_keep_working(throttled_api, make_key,
                                                                          tenant, db_sessions):
    valid, fresh = make_key(tenant, "ops"), make_key(tenant, "ops")
    with httpx.Client(base_url=throttled_api.url, timeout=30) as c:
        assert c.get("/v1/runs", headers=bearer(valid)).status_code == 200  # now cached

        def guess(_):
            return c.get("/v1/runs", headers=bearer(f"fw_{uuid.uuid4().hex}")).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(guess, range(300)))
        # The first 20 failures each cost a lookup and a 401; then the address waits, with no
        # database query at all, until the minute is over.
        assert codes.count(401) == 20 and codes.count(429) == 280, (codes.count(401), codes.count(429))
        r = c.get("/v1/runs", headers=bearer(f"fw_{uuid.uuid4().hex}"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "auth_rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # 300 misses evicted nothing: the cached valid key answers at once, flood or not.
        assert c.get("/v1/runs", headers=bearer(valid)).status_code == 200
        # A valid key the process has not seen yet waits like the flood (same address).
        assert c.get("/v1/runs", headers=bearer(fresh)).status_code == 429
