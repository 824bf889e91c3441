"""The adapters API through the real stack: listing, versions with ratings, stats, manual rollback."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import select, update

from service.api.routes.adapters import RECENT_VERSIONS
from service.db import repositories as repo
from service.db.models import Adapter, AuditEvent, Feedback, Interaction
from service.db.session import session_scope
from service.engine.artifact import artifact_sha256
from service.engine.swap import SwapConfig, set_canary, swap
from service.engine.vllm_admin import VllmAdmin
from tests.helpers.auth import bearer
from tests.helpers.data import seed_interactions
from tests.helpers.vllm import make_random_lora

pytestmark = pytest.mark.vllm


@pytest.fixture()
def live_alias(db_sessions, tiny_model, vllm, tmp_path, make_alias, tenant):
    """An alias serving a real (random) LoRA version on the shared vLLM, back to base afterwards."""
    alias = make_alias(tenant)
    artifact = make_random_lora(tiny_model, tmp_path / "v1", seed=3)
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant, Adapter.alias == alias)).one()
        version = repo.create_version(s, adapter, artifact_path=str(artifact),
                                      sha256=artifact_sha256(artifact), parent_version_id=None,
                                      run_id=None, lineage={})
        version_id, adapter_id, lora_name = version.id, adapter.id, version.lora_name
    config = SwapConfig(engine_base_model=str(tiny_model), max_lora_rank=16, drain_s=1.0)

    async def go():
        async with VllmAdmin(vllm.url) as admin:
            return await swap(db_sessions, [admin], version_id, config, actor="test")

    assert asyncio.run(go()).ok
    yield alias, lora_name, adapter_id
    with session_scope(db_sessions) as s:  # leave the shared engine's sizing budget as found
        a = s.get(Adapter, adapter_id)
        a.serving_version_id = a.previous_version_id = None


def test_adapter_listing_and_detail(client, make_key, tenant, live_alias):
    alias, lora_name, _ = live_alias
    key, ops = make_key(tenant, "product"), make_key(tenant, "ops")
    assert client.get("/v1/adapters", headers=bearer(key)).status_code == 403  # ops only
    listed = client.get("/v1/adapters", headers=bearer(ops)).json()
    assert [(a["alias"], a["serving"]) for a in listed] == [(alias, lora_name)]
    r = client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": alias, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    client.post("/v1/feedback", headers=bearer(key),
                json={"interaction_id": r.headers["x-interaction-id"], "rating": "up"})
    detail = client.get(f"/v1/adapters/{alias}", headers=bearer(ops)).json()
    [v1] = detail["versions"]
    assert v1["lora_name"] == lora_name and v1["status"] == "live" and v1["thumbs_up"] == 1
    stats = client.get(f"/v1/adapters/{alias}/stats", headers=bearer(ops)).json()
    assert stats["series"][lora_name][0]["up"] == 1 and stats["feedback"] == 1
    assert client.get("/v1/adapters/nope", headers=bearer(ops)).status_code == 404


def test_listing_carries_the_newest_versions_with_ratings(client, make_key, make_alias, tenant,
                                                          live_alias, db_sessions):
    """The list's per-alias version summary is bounded: the newest few, with their ratings."""
    alias, v1_name, adapter_id = live_alias  # v1 serves; the versions added here are candidates
    idle = make_alias(tenant)
    other_tenant = f"{tenant}-x"
    other = make_alias(other_tenant)
    ops = make_key(tenant, "ops")
    with session_scope(db_sessions) as s:
        adapter = s.get(Adapter, adapter_id)
        ids = {1: adapter.serving_version_id}
        for n in range(2, 9):  # never loaded: candidates are not desired on the engine
            ids[n] = repo.create_version(s, adapter, artifact_path=f"/nowhere/v{n}",
                                         sha256="0" * 64, parent_version_id=None, run_id=None,
                                         lineage={}).id
        adapter.previous_version_id = ids[2]  # older than the versions the list shows
        other_adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == other_tenant)).one()
        repo.create_version(s, other_adapter, artifact_path="/nowhere/x", sha256="0" * 64,
                            parent_version_id=None, run_id=None, lineage={})
    # (version number or None for the base model, rating): v2 and v1 are outside the window.
    ratings = [(8, "up"), (8, "up"), (8, "down"), (5, "down"), (2, "up"), (1, "up"), (None, "up")]
    interactions = seed_interactions(db_sessions, tenant, alias, None, len(ratings))
    with session_scope(db_sessions) as s:
        for iid, (n, _) in zip(interactions, ratings, strict=True):
            s.execute(update(Interaction).where(Interaction.id == uuid.UUID(iid))
                      .values(version_id=ids.get(n)))
    for iid, (_, rating) in zip(interactions, ratings, strict=True):
        r = client.post("/v1/feedback", headers=bearer(ops), json={"interaction_id": iid,
                                                                   "rating": rating})
        assert r.status_code == 201, r.text

    listed = {a["alias"]: a for a in client.get("/v1/adapters", headers=bearer(ops)).json()}
    assert set(listed) == {alias, idle}  # another tenant's alias is not listed
    a = listed[alias]
    assert a["serving"] == v1_name and a["version_count"] == 8
    assert a["previous"] == repo.lora_name_for(tenant, alias, 2)
    assert a["previous_version_id"] == str(ids[2])
    thumbs = {8: (2, 1), 5: (0, 1)}
    assert RECENT_VERSIONS == 6  # so v8..v3 are shown, newest first
    assert [(v["number"], v["id"], v["lora_name"], v["status"], v["thumbs_up"], v["thumbs_down"])
            for v in a["recent_versions"]] == [
        (n, str(ids[n]), repo.lora_name_for(tenant, alias, n), "candidate", *thumbs.get(n, (0, 0)))
        for n in range(8, 2, -1)]
    assert (listed[idle]["version_count"], listed[idle]["recent_versions"],
            listed[idle]["previous"]) == (0, [], None)
    # The detail agrees with the list, and still carries every version.
    detail = client.get(f"/v1/adapters/{alias}", headers=bearer(ops)).json()
    assert [v["number"] for v in detail["versions"]] == list(range(1, 9))
    assert {k: detail[k] for k in ("previous", "version_count", "recent_versions")} == {
        k: a[k] for k in ("previous", "version_count", "recent_versions")}
    other_listed = client.get("/v1/adapters", headers=bearer(make_key(other_tenant, "ops"))).json()
    assert [(x["alias"], x["version_count"]) for x in other_listed] == [(other, 1)]


def test_manual_rollback_is_ops_only_and_audited(client, make_key, tenant, live_alias, db_sessions):
    alias, lora_name, adapter_id = live_alias
    product, ops = make_key(tenant, "product"), make_key(tenant, "ops")
    assert client.post(f"/v1/adapters/{alias}/rollback", headers=bearer(product)).status_code == 403
    other_ops = make_key(f"{tenant}-x", "ops")
    assert client.post(f"/v1/adapters/{alias}/rollback", headers=bearer(other_ops)).status_code == 404
    r = client.post(f"/v1/adapters/{alias}/rollback", headers=bearer(ops), json={"reason": "too chatty"})
    assert r.status_code == 200, r.text
    assert r.json()["serving"] == "base"
    r = client.post(f"/v1/adapters/{alias}/rollback", headers=bearer(ops))
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_roll_back"
    with db_sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant,
                                                   AuditEvent.reason == "too chatty")).one()
    assert event.actor.startswith("key:")


def test_create_alias_validates_and_is_ops_only(client, make_key, tenant):
    ops, product = make_key(tenant, "ops"), make_key(tenant, "product")
    assert client.post("/v1/adapters", headers=bearer(product), json={"alias": "x"}).status_code == 403
    r = client.post("/v1/adapters", headers=bearer(ops), json={"alias": "Bad Alias!"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "alias"
    r = client.post("/v1/adapters", headers=bearer(ops), json={"alias": "faq-bot"})
    assert r.status_code == 201 and r.json()["serving"] == "base"
    created = r.json()
    assert (created["version_count"], created["recent_versions"], created["previous"]) == (0, [], None)
    assert client.post("/v1/adapters", headers=bearer(ops), json={"alias": "faq-bot"}).status_code == 409


def test_canary_share_is_within_a_binomial_bound_and_feedback_follows_the_version(
        client, make_key, tenant, live_alias, tiny_model, vllm, tmp_path, db_sessions):
    alias, lora_name, adapter_id = live_alias
    key = make_key(tenant, "product")
    artifact = make_random_lora(tiny_model, tmp_path / "v2", seed=4)
    with session_scope(db_sessions) as s:
        adapter = s.get(Adapter, adapter_id)
        v2 = repo.create_version(s, adapter, artifact_path=str(artifact),
                                 sha256=artifact_sha256(artifact), parent_version_id=None,
                                 run_id=None, lineage={})
        v2_id, v2_name = v2.id, v2.lora_name
    config = SwapConfig(engine_base_model=str(tiny_model), max_lora_rank=16, drain_s=1.0)

    async def canary(share):
        async with VllmAdmin(vllm.url) as admin:
            return await set_canary(db_sessions, [admin], adapter_id, v2_id if share else None,
                                    share, config, actor="test")

    assert asyncio.run(canary(0.3)).ok
    try:
        time.sleep(1.2)  # past the routing cache
        n = 240
        ids = []
        for i in range(n):
            r = client.post("/v1/chat/completions", headers=bearer(key), json={
                "model": alias, "max_tokens": 1, "user": f"user-{i}",
                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            ids.append(uuid.UUID(r.headers["x-interaction-id"]))
            client.post("/v1/feedback", headers=bearer(key), json={
                "interaction_id": str(ids[-1]), "rating": "up" if i % 2 else "down",
                "rater_id": f"user-{i}"})
        with db_sessions() as s:
            rows = s.execute(select(Interaction.id, Interaction.served_model, Interaction.version_id)
                             .where(Interaction.id.in_(ids))).all()
            fb = dict(s.execute(select(Feedback.interaction_id, Feedback.version_id)
                                .where(Feedback.interaction_id.in_(ids))).all())
        canaried = sum(1 for r in rows if r.served_model == v2_name)
        # Binomial(240, 0.3): mean 72, sd 7.1; 4 sd either side fails by chance ~6e-5 of the time.
        assert 72 - 29 <= canaried <= 72 + 29, canaried
        assert {r.served_model for r in rows} == {lora_name, v2_name}
        assert all(fb[r.id] == r.version_id for r in rows)  # each rating counts for who answered
    finally:
        asyncio.run(canary(0.0))
