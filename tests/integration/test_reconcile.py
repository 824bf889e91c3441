"""The reconciler and the gateway's replica observer against two real vLLM (CPU) replicas."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from service.db.models import Adapter, AdapterVersion, AuditEvent, EngineReplica
from service.db.session import session_scope
from service.engine import swap as sw
from service.engine.artifact import WEIGHTS_FILE, verifier
from service.engine.reconcile import apply_to_pool, observe, reconcile_once
from service.engine.replicas import ReplicaPool
from service.engine.vllm_admin import VllmAdmin
from service.local.embedded import free_port
from tests.helpers.replicas import api_env, chat, served_models
from tests.helpers.stack import ApiProcess

pytestmark = pytest.mark.vllm

GRACE = {"warm_grace_s": 600.0, "drain_s": 3.0}


def _verify(cfg: sw.SwapConfig):
    return verifier(engine_base_model=cfg.engine_base_model, max_lora_rank=cfg.max_lora_rank)


async def _wait_for(admin: VllmAdmin, names: set[str], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if names <= await admin.loaded_loras():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not answering yet
            pass
        assert time.monotonic() - t0 < timeout, f"{names} not restored on {admin.base_url}"
        await asyncio.sleep(0.2)


async def _wait_for_row(db_sessions, url: str, names: set[str], timeout: float = 10.0
                        ) -> EngineReplica:
    t0 = time.monotonic()
    while True:
        with session_scope(db_sessions) as s:
            row = s.get(EngineReplica, url)
        if row is not None and row.healthy and names <= set(row.loaded or ()):
            return row
        if time.monotonic() - t0 > timeout:
            return row
        await asyncio.sleep(0.2)


async def test_replica_restarted_at_rest_gets_its_adapters_back(
        swap_api, swap_replicas, admins, versions, swap_cfg, db_sessions, make_key):
    key = make_key(versions.tenant)
    alias, _ = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    for v in (v1, v2):
        assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok
    down_url, up_url = swap_replicas.urls

    await asyncio.to_thread(swap_replicas.stop_one, 0)
    await asyncio.sleep(0.5)  # the gateway's observer polls every 0.2 s
    ids = [await chat(swap_api.url, key, alias) for _ in range(6)]
    assert {r for _, r in served_models(db_sessions, ids).values()} == {up_url}

    await asyncio.to_thread(swap_replicas.start_one, 0)
    # No operator action: the API's own reconciler (every 1 s) reloads live and warm versions.
    took = await _wait_for(admins[0], {name1, name2})
    print(f"\nadapters back on the restarted replica {took:.1f}s after it was healthy")
    # The round records what it saw only after its loads finish, so the row may trail the replica.
    row = await _wait_for_row(db_sessions, down_url, {name1, name2})
    assert row.healthy and {name1, name2} <= set(row.loaded)
    await asyncio.sleep(0.5)
    ids = [await chat(swap_api.url, key, alias) for _ in range(6)]
    assert {r for _, r in served_models(db_sessions, ids).values()} == {down_url, up_url}


async def test_reconcile_loads_missing_unloads_refused_and_leaves_foreign_names(
        admins, versions, swap_cfg, db_sessions, lora_template):
    alias, _ = versions.alias()
    live, live_name = versions.new(alias)
    dead, dead_name = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, live, swap_cfg)).ok
    with session_scope(db_sessions) as s:
        s.execute(update(AdapterVersion).where(AdapterVersion.id == dead)
                  .values(status="failed", failure_reason="test"))
    foreign = f"scratch-{uuid.uuid4().hex[:6]}"
    a, b = admins
    await b.unload_lora(live_name)                       # lost (say, evicted by hand)
    await a.load_lora(dead_name, str(lora_template))     # a failed version someone loaded
    await a.load_lora(foreign, str(lora_template))       # not ours: must be left alone
    try:
        report = await reconcile_once(db_sessions, admins, **GRACE, verify=_verify(swap_cfg))
        assert report.errors == []
        held_a, held_b = await a.loaded_loras(), await b.loaded_loras()
        assert live_name in held_a and live_name in held_b
        assert dead_name not in held_a and foreign in held_a
        with session_scope(db_sessions) as s:
            rows = {r.url: r for r in s.scalars(select(EngineReplica).where(
                EngineReplica.url.in_([a.base_url, b.base_url])))}
        assert all(r.healthy and live_name in r.loaded for r in rows.values())
    finally:
        await a.unload_lora(foreign)


async def test_reconcile_leaves_an_alias_alone_while_an_operation_holds_it(
        admins, versions, swap_cfg, db_sessions):
    alias, adapter_id = versions.alias()
    v, name = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok
    async with sw.alias_locked(db_sessions, adapter_id, alias, wait_s=5):
        await admins[1].unload_lora(name)
        report = await reconcile_once(db_sessions, admins, **GRACE, verify=_verify(swap_cfg))
        assert adapter_id in report.busy
        assert name not in await admins[1].loaded_loras()
    report = await reconcile_once(db_sessions, admins, **GRACE, verify=_verify(swap_cfg))
    assert name in await admins[1].loaded_loras()


async def test_warm_versions_retire_after_their_grace_and_drain(admins, versions, swap_cfg,
                                                                db_sessions):
    alias, adapter_id = versions.alias()
    names = []
    for _ in range(3):
        v, name = versions.new(alias)
        names.append(name)
        assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok
    oldest, previous, live = names
    # Swapped back to back: the oldest is still inside drain_s, so it stays loaded for now.
    await reconcile_once(db_sessions, admins, warm_grace_s=600, drain_s=60,
                         verify=_verify(swap_cfg))
    assert all({oldest, previous, live} <= held for held in
               [await a.loaded_loras() for a in admins])
    await reconcile_once(db_sessions, admins, warm_grace_s=600, drain_s=0,
                         verify=_verify(swap_cfg))
    with session_scope(db_sessions) as s:
        statuses = dict(s.execute(select(AdapterVersion.lora_name, AdapterVersion.status)
                                  .where(AdapterVersion.adapter_id == adapter_id)).all())
    assert statuses == {oldest: "retired", previous: "warm", live: "live"}
    held = [await a.loaded_loras() for a in admins]
    assert all(oldest not in h and {previous, live} <= h for h in held)
    with session_scope(db_sessions) as s:
        actions = s.scalars(select(AuditEvent.action).where(
            AuditEvent.tenant_id == versions.tenant, AuditEvent.action == "adapter.retire")).all()
    assert actions == ["adapter.retire"]


async def test_observer_takes_a_down_replica_out_of_routing(swap_replicas, admins, versions,
                                                            swap_cfg, db_sessions):
    alias, adapter_id = versions.alias()
    v, name = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok
    dead = f"http://127.0.0.1:{free_port()}"
    pool = ReplicaPool([*swap_replicas.urls, dead], base_name="base", connect_timeout_s=1,
                       read_timeout_s=5)
    # Held so the API's reconciler cannot put the version back before we look.
    async with sw.alias_locked(db_sessions, adapter_id, alias, wait_s=5), \
            VllmAdmin(dead, timeout_s=2) as dead_admin:
        await admins[1].unload_lora(name)  # replica 1 lacks the version for a moment
        states = await observe([*admins, dead_admin])
        try:
            apply_to_pool(pool, states)
            assert [s.healthy for s in states] == [True, True, False]
            assert [r.url for r in pool.candidates(name)] == [swap_replicas.urls[0]]
            assert sorted(r.url for r in pool.candidates("base")) == sorted(swap_replicas.urls)
            # Known nowhere yet (a load the observer has not seen): every healthy replica is tried.
            assert len(pool.candidates("loaded-a-moment-ago")) == 2
        finally:
            await pool.aclose()
    await reconcile_once(db_sessions, admins, **GRACE, verify=_verify(swap_cfg))


def test_api_refuses_to_start_when_the_engine_is_too_small(swap_replicas, db_url, broker_url,
                                                           tiny_model, stack_root, versions,
                                                           db_sessions):
    alias, adapter_id = versions.alias()
    v, _ = versions.new(alias)
    with session_scope(db_sessions) as s:  # an alias that serves an adapter
        s.execute(update(AdapterVersion).where(AdapterVersion.id == v).values(status="live"))
        s.execute(update(Adapter).where(Adapter.id == adapter_id).values(serving_version_id=v))
    env = api_env(db_url, broker_url, swap_replicas.urls, tiny_model, stack_root / "small-data",
                  vllm_max_loras="1", vllm_max_cpu_loras="2")
    proc = ApiProcess(env=env, log=stack_root / "api-too-small.log")
    with pytest.raises(RuntimeError, match="exited") as info:
        proc.start(timeout=60)
    proc.stop()
    assert "engine is too small" in str(info.value)
    assert "--max-cpu-loras" in str(info.value)


async def test_an_artifact_changed_after_promotion_is_loaded_nowhere_and_shown(
        swap_api, swap_replicas, admins, versions, swap_cfg, db_sessions):
    """Tamper with a live version's weights, restart a replica: the API's reconciler refuses to
    load it there (sha256), audits that once, and /readyz lists it (by version id); a pickle dropped beside a
    warm version's safetensors is refused the same way. The replica that kept its verified
    in-memory copy goes on serving it."""
    alias, _ = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    for v in (v1, v2):
        assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok  # v2 live, v1 warm
    with session_scope(db_sessions) as s:
        path1 = s.get(AdapterVersion, v1).artifact_path
        path2 = s.get(AdapterVersion, v2).artifact_path
    weights = Path(path2) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor: same size, same header
    weights.write_bytes(bytes(data))
    (Path(path1) / "adapter_model.bin").write_bytes(b"not loaded, whatever it holds")

    await asyncio.to_thread(swap_replicas.stop_one, 0)
    await asyncio.to_thread(swap_replicas.start_one, 0)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=swap_api.url, timeout=10) as c:
        while True:
            ready = (await c.get("/readyz")).json()
            refused = {r["version_id"]: r["code"] for r in ready.get("refused_artifacts", [])}
            if {str(v1), str(v2)} <= set(refused):
                break
            assert time.monotonic() - t0 < 60, refused
            await asyncio.sleep(0.5)
    assert refused[str(v2)] == "sha256_mismatch" and refused[str(v1)] == "pickle"
    assert versions.tenant not in str(ready) and alias not in str(ready)  # a public route
    await asyncio.sleep(2.5)  # more reconcile rounds: still refused, audited only once
    loaded_restarted, loaded_kept = await admins[0].loaded_loras(), await admins[1].loaded_loras()
    assert name1 not in loaded_restarted and name2 not in loaded_restarted
    assert {name1, name2} <= loaded_kept
    with session_scope(db_sessions) as s:
        events = list(s.scalars(select(AuditEvent).where(
            AuditEvent.action == "artifact.refused",
            AuditEvent.target_id.in_([str(v1), str(v2)]))))
    assert sorted(e.target_id for e in events) == sorted([str(v1), str(v2)])
    assert all(e.actor == "reconciler" and e.tenant_id == versions.tenant for e in events)

    # Rolling back to v1 needs a load on the restarted replica: verified, refused, v1 failed.
    result = await sw.rollback(db_sessions, admins, versions.adapters[-1], swap_cfg, actor="test")
    assert not result.ok and result.phase == "verify" and "pickle" in result.reason
    with session_scope(db_sessions) as s:
        assert s.get(AdapterVersion, v1).status == "failed"
