"""Replicas discovered under one DNS name, and the residency bound, with two real vLLM (CPU)
replicas on 127.0.0.2 and 127.0.0.3 (one port) behind a name this module controls in /etc/hosts,
resolved by the system resolver in a real `flywheel api`:

- a worker-style engine operation resolves the name into both replicas;
- a replica that leaves the name leaves the API's pool, its metrics and its engine_replicas row,
  and gets no traffic; one that comes back empty gets the live version from the reconciler and
  then traffic; a failed lookup keeps the last known replicas and says why on /readyz;
- a staged version past the alias's `serving.max_resident_versions` is unloaded from both."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.config import Settings
from service.db.models import AdapterVersion, AuditEvent, EngineReplica
from service.db.session import session_scope
from service.engine import swap as sw
from service.engine.vllm_admin import VllmAdmin, replica_admins_for
from tests.helpers.auth import METRICS_AUTH, METRICS_TOKEN
from tests.helpers.hosts import HostsName, hosts_name
from tests.helpers.metrics import sample
from tests.helpers.replicas import ReplicaSet, api_env, chat, served_models
from tests.helpers.stack import REPO, ApiProcess

pytestmark = pytest.mark.vllm

ADDRESSES = ["127.0.0.2", "127.0.0.3"]


@dataclass
class Named:
    """Two replicas behind hosts.name, and an API that discovers them by it."""

    hosts: HostsName
    replicas: ReplicaSet
    api: ApiProcess
    policies: Path

    @property
    def entry(self) -> str:
        return f"http://{self.hosts.name}:{self.replicas.servers[0].port}"

    def url(self, i: int) -> str:
        return self.replicas.servers[i].url


@pytest.fixture(scope="module")
def named(tiny_model, stack_root, db_url, broker_url, tmp_path_factory) -> Iterator[Named]:
    policies = tmp_path_factory.mktemp("discovery-policies")
    shutil.copy(REPO / "policies" / "default.yaml", policies / "default.yaml")
    replicas = ReplicaSet.start(tiny_model, stack_root, hosts=ADDRESSES)
    try:
        with hosts_name(ADDRESSES) as hosts:
            entry = f"http://{hosts.name}:{replicas.servers[0].port}"
            env = api_env(db_url, broker_url, [entry], tiny_model, stack_root / "discovery-data",
                          replica_discovery_interval_s="0.3", policy_dir=str(policies),
                          # A swapped-out version drains for 1 s: the bound may then retire it.
                          drain_s="1",
                          metrics_token=METRICS_TOKEN, metrics_cache_s="0")
            with ApiProcess(env=env, log=stack_root / "api-discovery.log") as api:
                yield Named(hosts, replicas, api, policies)
    finally:
        replicas.stop()


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 60.0) -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


async def get(api: ApiProcess, path: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
        return await c.get(path, headers=headers)


def _row(db_sessions, url: str) -> EngineReplica | None:
    with session_scope(db_sessions) as s:
        return s.get(EngineReplica, url)


async def test_replicas_follow_the_name_and_a_new_one_gets_the_live_version_first(
        named, versions, swap_cfg, db_sessions, make_key):
    a_url, b_url = named.url(0), named.url(1)
    key = make_key(versions.tenant)
    alias, _ = versions.alias()
    v1, name1 = versions.new(alias)
    # A worker's engine operation resolves the name as the API does: both replicas.
    async with replica_admins_for(Settings(vllm_urls=named.entry)) as admins:
        assert sorted(a.base_url for a in admins) == [a_url, b_url]
        assert (await sw.swap(db_sessions, admins, v1, swap_cfg)).ok

    async def resident(url: str) -> float | None:
        text = (await get(named.api, "/metrics", METRICS_AUTH)).text
        return sample(text, "flywheel_resident_versions", replica=url, version=name1, role="live",
                      tenant=versions.tenant, alias=alias)

    await until(lambda: resident(b_url), "v1 live on both in the API's metrics")
    assert await resident(a_url) == 1

    async def both_recorded() -> bool:  # rows are written at the end of a reconcile round
        return _row(db_sessions, a_url) is not None and _row(db_sessions, b_url) is not None

    await until(both_recorded, "both replicas' engine_replicas rows", 120)

    # B leaves the name: out of the pool, the metrics and the table; chats go to A only.
    named.hosts.set(ADDRESSES[:1])

    async def b_gone() -> bool:
        text = (await get(named.api, "/metrics", METRICS_AUTH)).text
        return (sample(text, "flywheel_replicas", source=named.entry) == 1
                and f'replica="{b_url}"' not in text and _row(db_sessions, b_url) is None)

    await until(b_gone, "B dropped")
    assert _row(db_sessions, a_url) is not None
    ids = [await chat(named.api.url, key, alias) for _ in range(6)]
    assert {r for _, r in served_models(db_sessions, ids).values()} == {a_url}

    # While it is out, B loses its adapters (as a replacement pod would start empty): nothing
    # puts v1 back, since no reconciler knows B.
    async with VllmAdmin(b_url, timeout_s=30) as b:
        assert await b.unload_lora(name1)
        await asyncio.sleep(1.5)
        assert name1 not in await b.loaded_loras()

        # A lookup that fails keeps the last known replica and says why.
        named.hosts.set([])
        ready = await until(lambda: _discovery_error(named), "the lookup error on /readyz")
        assert ready["replicas"] == 1 and named.hosts.name in ready["error"]
        ids = [await chat(named.api.url, key, alias) for _ in range(2)]
        assert {r for _, r in served_models(db_sessions, ids).values()} == {a_url}

        # B comes back: the reconciler loads v1 there, and B gets its share of the chats.
        named.hosts.set(ADDRESSES)
        t0 = time.monotonic()
        await until(lambda: _holds(b, name1), "v1 loaded on B again")
        print(f"\nv1 back on the rediscovered replica {time.monotonic() - t0:.1f}s after its "
              "address came back")
    await until(lambda: resident(b_url), "v1 live on B in the metrics")
    await asyncio.sleep(0.5)  # the observer (0.2 s) has seen B hold v1
    ids = [await chat(named.api.url, key, alias) for _ in range(8)]
    assert {r for _, r in served_models(db_sessions, ids).values()} == {a_url, b_url}
    assert (await _discovery_error(named)) is None


async def _discovery_error(named: Named) -> dict | None:
    body = (await get(named.api, "/readyz", {})).json()
    [lookup] = [d for d in body["replica_discovery"] if d["name"] == named.entry]
    return lookup if lookup["error"] else None


async def _holds(admin: VllmAdmin, name: str) -> bool:
    return name in await admin.loaded_loras()


async def _alias_bounded_to(named, versions, bound: int) -> str:
    """A fresh alias of the tenant whose policy bounds its resident versions to `bound`."""
    named.hosts.set(ADDRESSES)
    alias, _ = versions.alias()
    (named.policies / f"{versions.tenant}--{alias}.yaml").write_text(
        f"serving: {{max_resident_versions: {bound}}}\n")
    await asyncio.sleep(1.2)  # the API re-reads policy files at most once a second
    return alias


async def test_a_staged_version_past_the_residency_bound_is_unloaded_everywhere(
        named, versions, swap_cfg, db_sessions, make_key):
    alias = await _alias_bounded_to(named, versions, 2)
    live, live_name = versions.new(alias)
    older, older_name = versions.new(alias)
    newer, newer_name = versions.new(alias)
    async with replica_admins_for(Settings(vllm_urls=named.entry)) as admins:
        assert (await sw.swap(db_sessions, admins, live, swap_cfg)).ok
        # Staged back to back, under the alias lock: three resident, one over the bound.
        for v in (older, newer):
            assert (await sw.stage(db_sessions, admins, v, swap_cfg)).ok

        async def evicted() -> bool:
            held = [await a.loaded_loras() for a in admins]
            return all(older_name not in h for h in held)

        await until(evicted, "the older staged version unloaded from both replicas", 30)
        held = [await a.loaded_loras() for a in admins]
        assert all({live_name, newer_name} <= h for h in held)
    with session_scope(db_sessions) as s:
        statuses = dict(s.execute(select(AdapterVersion.lora_name, AdapterVersion.status)
                                  .where(AdapterVersion.id.in_([live, older, newer]))).all())
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "adapter.evict",
                                                    AuditEvent.target_id == str(older))).all()
    assert statuses == {live_name: "live", older_name: "candidate", newer_name: "staged"}
    assert len(events) == 1 and events[0].tenant_id == versions.tenant
    assert "max_resident_versions" in events[0].reason

    async def shown() -> bool:  # the API's observer polls every 0.2 s
        text = (await get(named.api, "/metrics", METRICS_AUTH)).text
        return all(sample(text, "flywheel_resident_versions", replica=url, version=newer_name,
                          role="staged") == 1
                   and sample(text, "flywheel_resident_versions", replica=url,
                              version=older_name) is None
                   for url in (named.url(0), named.url(1)))

    await until(shown, "the metrics showing the newer staged version only", 10)


async def test_a_warm_version_past_the_bound_is_retired_once_the_alias_has_drained(
        named, versions, swap_cfg, db_sessions):
    """Bound 1: the previous version stays only while it may still serve (drain_s), not for the
    whole warm grace period; it is retired, not sent back to candidate."""
    alias = await _alias_bounded_to(named, versions, 1)
    first, first_name = versions.new(alias)
    second, second_name = versions.new(alias)
    async with replica_admins_for(Settings(vllm_urls=named.entry)) as admins:
        assert (await sw.swap(db_sessions, admins, first, swap_cfg)).ok
        assert (await sw.swap(db_sessions, admins, second, swap_cfg)).ok

        async def retired() -> bool:
            held = [await a.loaded_loras() for a in admins]
            return all(first_name not in h and second_name in h for h in held)

        await until(retired, "the warm previous version unloaded from both replicas", 30)
    with session_scope(db_sessions) as s:
        statuses = dict(s.execute(select(AdapterVersion.lora_name, AdapterVersion.status)
                                  .where(AdapterVersion.id.in_([first, second]))).all())
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "adapter.evict",
                                                    AuditEvent.target_id == str(first))).all()
    assert statuses == {first_name: "retired", second_name: "live"}
    assert len(events) == 1 and events[0].detail["from"] == "warm"
    assert events[0].detail["to"] == "retired" and events[0].detail["max_resident_versions"] == 1

