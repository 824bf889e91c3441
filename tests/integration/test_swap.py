"""Hot swap, rollback and canary against two real vLLM (CPU) replicas behind a real gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from sqlalchemy import select

from service.db.models import Adapter, AdapterVersion, AuditEvent
from service.db.session import session_scope
from service.engine import swap as sw
from service.engine.artifact import verifier
from service.engine.reconcile import reconcile_once
from service.engine.sizing import EngineSize
from service.engine.vllm_admin import VllmAdmin
from tests.helpers.cli import flywheel
from tests.helpers.replicas import ROUTING_TTL_S, Traffic, api_env, chat, served_models

pytestmark = pytest.mark.vllm

# What each bad artifact must be refused with (artifact.verify_artifact's codes).
REFUSALS = {"wrong_sha": "sha256_mismatch", "wrong_base": "wrong_base", "pickle_only": "pickle",
            "rank_too_large": "rank_too_large", "nan": "non_finite",
            "modules_to_save": "modules_to_save"}


def _alias_row(sessions, adapter_id) -> Adapter:
    with session_scope(sessions) as s:
        return s.get(Adapter, adapter_id)


def _version_row(sessions, version_id) -> AdapterVersion:
    with session_scope(sessions) as s:
        return s.get(AdapterVersion, version_id)


async def _loaded(admins) -> list[set[str]]:
    return [await a.loaded_loras() for a in admins]


async def test_swap_under_load_fails_no_request_and_gateway_follows_within_bound(
        swap_api, admins, versions, swap_cfg, db_sessions, make_key):
    key = make_key(versions.tenant)
    alias, adapter_id = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    first = await sw.swap(db_sessions, admins, v1, swap_cfg, actor="test")
    assert first.ok, first.reason

    traffic = Traffic(swap_api.url, key, alias, concurrency=8)
    runner = asyncio.create_task(traffic.run())
    try:
        await traffic.until(100, not_before=first.flipped_at + ROUTING_TTL_S)
        swap_started = time.time()
        result = await sw.swap(db_sessions, admins, v2, swap_cfg, actor="test", reason="newer")
        swap_ended = time.time()
        await traffic.until(len(traffic.shots) + 100, not_before=swap_ended + 2 * ROUTING_TTL_S)
    finally:
        traffic.stop()
        await runner

    assert result.ok, result.reason
    shots = traffic.shots
    assert len(shots) >= 200
    assert traffic.failed == [], traffic.failed[:3]
    in_flight = [s for s in shots if s.start < swap_ended and s.end > swap_started]
    assert in_flight, "no request overlapped the swap"
    served = served_models(db_sessions, [s.interaction_id for s in shots])
    assert len(served) == len(shots)
    # The stated bound: a request starting routing_cache_ttl_s after the flip gets the new version.
    after = [s for s in shots if s.start > result.flipped_at + ROUTING_TTL_S]
    assert len(after) >= 50
    assert {served[s.interaction_id][0] for s in after} == {name2}
    before = [s for s in shots if s.end < swap_started]
    assert {served[s.interaction_id][0] for s in before} == {name1}
    # Both replicas took traffic, before and after.
    assert {served[s.interaction_id][1] for s in after} == set(result.replicas)

    row = _alias_row(db_sessions, adapter_id)
    assert (row.serving_version_id, row.previous_version_id) == (v2, v1)
    assert _version_row(db_sessions, v1).status == "warm"  # kept loaded for instant rollback
    assert _version_row(db_sessions, v2).status == "live"
    assert all({name1, name2} <= held for held in await _loaded(admins))
    assert set(result.timings) >= {"lock", "verify", "health", "load", "smoke", "flip", "swap"}
    assert len([c for c in result.calls if c.op == "load"]) == 2
    print(f"\nswap under load: {len(shots)} requests, {len(in_flight)} in flight during the swap, "
          f"swap {result.timings['swap'] * 1000:.0f} ms vs raw load+smoke "
          f"{result.raw_calls_s * 1000:.0f} ms; phases "
          + ", ".join(f"{k} {v * 1000:.0f}" for k, v in result.timings.items()))


@pytest.mark.parametrize("kind", list(REFUSALS))
async def test_bad_artifact_is_refused_before_any_load(kind, admins, versions, swap_cfg,
                                                       db_sessions):
    alias, adapter_id = versions.alias()
    good, _ = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, good, swap_cfg)).ok
    bad, bad_name = versions.new(alias, kind)

    result = await sw.swap(db_sessions, admins, bad, swap_cfg, actor="test")

    assert not result.ok
    assert (result.phase, result.code) == ("verify", REFUSALS[kind])
    assert result.calls == [] and result.loaded_on == []  # not one call reached a replica
    assert all(bad_name not in held for held in await _loaded(admins))
    version = _version_row(db_sessions, bad)
    assert version.status == "failed"
    assert version.failure_reason.startswith(f"{REFUSALS[kind]}: ")
    assert _alias_row(db_sessions, adapter_id).serving_version_id == good
    with session_scope(db_sessions) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.target_id == str(bad))).one()
    assert event.action == "adapter.swap_failed" and REFUSALS[kind] in event.reason


class _KillOnLoad(VllmAdmin):
    """A replica client that crashes its replica the moment a load is sent to it."""

    def __init__(self, url: str, kill) -> None:
        super().__init__(url, timeout_s=60)
        self._kill = kill

    async def load_lora(self, name: str, path: str) -> None:
        await asyncio.to_thread(self._kill)
        await super().load_lora(name, path)


async def test_replica_killed_mid_swap_keeps_alias_and_reconciler_restores_it(
        swap_api, swap_replicas, admins, versions, swap_cfg, db_sessions, make_key):
    key = make_key(versions.tenant)
    alias, adapter_id = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, v1, swap_cfg)).ok

    crashing = [admins[0], _KillOnLoad(swap_replicas.urls[1],
                                       lambda: swap_replicas.stop_one(1, crash=True))]
    try:
        result = await sw.swap(db_sessions, crashing, v2, swap_cfg, actor="test")
    finally:
        await crashing[1].aclose()

    assert not result.ok and result.phase == "load", result
    assert swap_replicas.urls[1] in result.reason
    assert _alias_row(db_sessions, adapter_id).serving_version_id == v1
    assert _version_row(db_sessions, v2).status == "failed"
    assert name2 not in await admins[0].loaded_loras()  # unloaded where it did land
    # The gateway keeps serving the old version from the surviving replica.
    await asyncio.sleep(0.5)
    iid = await chat(swap_api.url, key, alias)
    assert served_models(db_sessions, [iid])[iid] == (name1, swap_replicas.urls[0])

    await asyncio.to_thread(swap_replicas.start_one, 1)  # back, empty
    deadline = time.monotonic() + 30
    while name1 not in await _held(admins[1]):
        assert time.monotonic() < deadline, "the reconciler did not restore the replica"
        await asyncio.sleep(0.2)
    assert name2 not in await admins[1].loaded_loras()


async def _held(admin: VllmAdmin) -> set[str]:
    try:
        return await admin.loaded_loras()
    except Exception:  # noqa: BLE001 - still starting
        return set()


async def test_rollback_is_instant_while_warm_and_reloads_once_retired(
        swap_api, admins, versions, swap_cfg, db_sessions, make_key):
    key = make_key(versions.tenant)
    alias, adapter_id = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    v3, _ = versions.new(alias)
    for v in (v1, v2):
        assert (await sw.swap(db_sessions, admins, v, swap_cfg)).ok

    warm = await sw.rollback(db_sessions, admins, adapter_id, swap_cfg, actor="test",
                             reason="thumbs down")
    assert warm.ok, warm.reason
    assert [c.op for c in warm.calls] == []  # nothing to load or smoke: instant
    assert warm.timings["swap"] < 0.5
    row = _alias_row(db_sessions, adapter_id)
    assert (row.serving_version_id, row.previous_version_id) == (v1, None)
    assert _version_row(db_sessions, v2).failure_reason == "rolled back: thumbs down"
    await asyncio.sleep(ROUTING_TTL_S + 0.1)
    iid = await chat(swap_api.url, key, alias)
    assert served_models(db_sessions, [iid])[iid][0] == name1

    # v3 goes live, v1 becomes the warm previous version; then its grace period runs out.
    assert (await sw.swap(db_sessions, admins, v3, swap_cfg)).ok
    report = await reconcile_once(db_sessions, admins, warm_grace_s=0, drain_s=0,
                                  verify=verifier(engine_base_model=swap_cfg.engine_base_model,
                                                  max_lora_rank=swap_cfg.max_lora_rank))
    assert name1 in report.retired
    assert _version_row(db_sessions, v1).status == "retired"
    assert all(name1 not in held for held in await _loaded(admins))

    cold = await sw.rollback(db_sessions, admins, adapter_id, swap_cfg, actor="test")
    assert cold.ok, cold.reason
    assert sorted(c.op for c in cold.calls) == ["load", "load", "smoke", "smoke"]
    assert _alias_row(db_sessions, adapter_id).serving_version_id == v1
    assert all(name1 in held for held in await _loaded(admins))
    await asyncio.sleep(ROUTING_TTL_S + 0.1)
    iid = await chat(swap_api.url, key, alias)
    assert served_models(db_sessions, [iid])[iid][0] == name1
    print(f"\nrollback: warm {warm.timings['swap'] * 1000:.1f} ms, "
          f"after unload {cold.timings['swap'] * 1000:.1f} ms")


async def test_one_operation_per_alias_while_other_aliases_swap(admins, versions, swap_cfg,
                                                                db_sessions):
    busy, busy_id = versions.alias()
    free, _ = versions.alias()
    v_busy, _ = versions.new(busy)
    v_free, _ = versions.new(free)
    quick = dataclasses.replace(swap_cfg, lock_wait_s=0.3)
    async with sw.alias_locked(db_sessions, busy_id, busy, wait_s=1):
        with pytest.raises(sw.SwapInProgress, match="already in progress"):
            await sw.swap(db_sessions, admins, v_busy, quick)
        other = await sw.swap(db_sessions, admins, v_free, quick)
    assert other.ok and other.timings["lock"] < 0.3
    assert _version_row(db_sessions, v_busy).status == "candidate"  # untouched


async def test_first_adapter_refused_when_engine_too_small(admins, versions, swap_cfg,
                                                           db_sessions):
    alias, adapter_id = versions.alias()
    v, name = versions.new(alias)
    tiny = dataclasses.replace(swap_cfg, engine_size=EngineSize(1, 1))
    with pytest.raises(sw.SwapRefused, match="max-cpu-loras") as info:
        await sw.swap(db_sessions, admins, v, tiny)
    assert info.value.code == "engine_too_small"
    assert _version_row(db_sessions, v).status == "candidate"
    assert all(name not in held for held in await _loaded(admins))


async def test_canary_is_sticky_per_user_and_promotes(swap_api, admins, versions, swap_cfg,
                                                     db_sessions, make_key):
    key = make_key(versions.tenant)
    alias, adapter_id = versions.alias()
    v1, name1 = versions.new(alias)
    v2, name2 = versions.new(alias)
    assert (await sw.swap(db_sessions, admins, v1, swap_cfg)).ok
    staged = await sw.stage(db_sessions, admins, v2, swap_cfg)
    assert staged.ok and _version_row(db_sessions, v2).status == "staged"
    canary = await sw.set_canary(db_sessions, admins, adapter_id, v2, 0.5, swap_cfg)
    assert canary.ok, canary.reason
    await asyncio.sleep(ROUTING_TTL_S + 0.1)

    users = [f"u{i}" for i in range(12)]
    ids = {u: [await chat(swap_api.url, key, alias, u) for _ in range(2)] for u in users}
    served = served_models(db_sessions, [i for pair in ids.values() for i in pair])
    per_user = {u: {served[i][0] for i in pair} for u, pair in ids.items()}
    assert all(len(models) == 1 for models in per_user.values())  # sticky
    assert set().union(*per_user.values()) == {name1, name2}  # both versions get feedback

    promoted = await sw.swap(db_sessions, admins, v2, swap_cfg)
    assert promoted.ok
    row = _alias_row(db_sessions, adapter_id)
    assert (row.serving_version_id, row.canary_version_id, row.canary_share) == (v2, None, 0.0)


def test_cli_swaps_and_rolls_back(swap_replicas, versions, db_sessions, db_url,
                                  broker_url, tiny_model, stack_root):
    alias, adapter_id = versions.alias()
    v1, _ = versions.new(alias)
    v2, _ = versions.new(alias)
    env = api_env(db_url, broker_url, swap_replicas.urls, tiny_model, stack_root / "cli-data")
    for v in (v1, v2):
        done = flywheel(env, "adapters", "swap", str(v), "--reason", "cli test")
        assert done.returncode == 0, done.stderr
    assert '"ok": true' in done.stdout
    done = flywheel(env, "adapters", "rollback", alias, "--tenant", versions.tenant)
    assert done.returncode == 0, done.stderr
    assert _alias_row(db_sessions, adapter_id).serving_version_id == v1
    done = flywheel(env, "adapters", "rollback", "no-such-alias", "--tenant", versions.tenant)
    assert done.returncode == 2 and "no alias" in done.stderr
