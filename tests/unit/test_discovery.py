"""Replica discovery with a fake resolver: which URLs a FLYWHEEL_VLLM_URLS entry becomes, what a
refresh adds and drops, a failed lookup keeping the last known replicas; and the pool taking
replicas in and out. tests/integration/test_replica_discovery.py resolves a real name."""

from __future__ import annotations

import asyncio
import socket

import httpx

from service.engine.discovery import Discovery, look_up, resolve_urls, system_resolver
from service.engine.replicas import ReplicaPool


class FakeDns:
    """host -> addresses; a host mapped to an exception raises it."""

    def __init__(self, **records):
        self.records = {k.replace("_", "-"): v for k, v in records.items()}
        self.asked: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        got = self.records.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(got, BaseException):
            raise got
        return list(got)


def test_literal_ips_and_single_answer_names_stay_as_configured():
    dns = FakeDns(vllm_0=["10.0.0.7"])
    d = Discovery(["http://10.0.0.5:8100", "http://[fd00::5]:8100", "http://vllm-0:8100/"], dns)
    assert d.urls == ["http://10.0.0.5:8100", "http://[fd00::5]:8100", "http://vllm-0:8100/"]
    assert dns.asked == ["vllm-0"]  # literal addresses are never looked up
    assert d.lookups["http://10.0.0.5:8100"].resolved_at is None
    assert d.lookups["http://vllm-0:8100/"].resolved_at is not None
    assert not any(lk.expanded for lk in d.lookups.values())


def test_a_name_with_several_addresses_is_one_replica_per_address():
    dns = FakeDns(vllm=["10.0.0.2", "10.0.0.10", "10.0.0.3"], vllm6=["fd00::1", "fd00::2"])
    d = Discovery(["http://vllm:8100", "https://vllm6:9000/prefix"], dns)
    assert d.urls == ["http://10.0.0.2:8100", "http://10.0.0.10:8100", "http://10.0.0.3:8100",
                      "https://[fd00::1]:9000/prefix", "https://[fd00::2]:9000/prefix"]
    assert d.source_of("http://10.0.0.3:8100") == "http://vllm:8100"
    assert d.lookups["http://vllm:8100"].expanded and d.errors == {}


async def test_refresh_adds_new_addresses_and_drops_vanished_ones():
    dns = FakeDns(vllm=["10.0.0.1", "10.0.0.2"])
    d = Discovery(["http://vllm:8100"], dns)
    dns.records["vllm"] = ["10.0.0.2", "10.0.0.3"]
    change = await d.refresh()
    assert change.added == ["http://10.0.0.3:8100"] and change.removed == ["http://10.0.0.1:8100"]
    assert not await d.refresh()  # nothing changed
    # Down to one address: still that address's replica (its identity does not flip to the name).
    dns.records["vllm"] = ["10.0.0.3"]
    change = await d.refresh()
    assert d.urls == ["http://10.0.0.3:8100"] and change.removed == ["http://10.0.0.2:8100"]


async def test_a_failed_lookup_keeps_the_last_known_replicas_and_says_why():
    dns = FakeDns(vllm=["10.0.0.1", "10.0.0.2"])
    d = Discovery(["http://vllm:8100"], dns)
    dns.records["vllm"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert not await d.refresh()
    assert d.urls == ["http://10.0.0.1:8100", "http://10.0.0.2:8100"]
    assert d.errors == {"http://vllm:8100": "vllm: Temporary failure in name resolution"}
    dns.records["vllm"] = []  # an empty answer is a failure too, never an empty pool
    assert not await d.refresh() and "no address" in d.errors["http://vllm:8100"]
    dns.records["vllm"] = ["10.0.0.2"]
    change = await d.refresh()
    assert change.removed == ["http://10.0.0.1:8100"] and d.errors == {}


def test_a_name_that_never_resolved_stays_as_configured_with_its_error():
    lk = look_up("http://nowhere:8100", FakeDns())
    assert lk.urls == ("http://nowhere:8100",) and lk.error and lk.resolved_at is None


async def test_the_system_resolver_gives_localhost_one_address():
    # 127.0.0.1 and ::1 answer for one server: one family only, so one replica as configured.
    assert len(system_resolver("localhost")) == 1
    assert await resolve_urls(["http://localhost:8100", "http://127.0.0.1:8101"]) == [
        "http://localhost:8100", "http://127.0.0.1:8101"]


async def test_the_pool_routes_a_new_replica_a_version_only_once_it_holds_it():
    pool = ReplicaPool(["http://a:1"], base_name="base", connect_timeout_s=1, read_timeout_s=1)
    pool.observe("http://a:1", healthy=True, loaded={"v1"})
    pool.add("http://b:1", source="http://svc:1")
    pool.add("http://b:1")  # known already: no second copy
    assert pool.urls == ["http://a:1", "http://b:1"]
    assert sorted(r.url for r in pool.candidates("base")) == ["http://a:1", "http://b:1"]
    assert [r.url for r in pool.candidates("v1")] == ["http://a:1"]
    pool.observe("http://b:1", healthy=True, loaded={"v1"})
    assert sorted(r.url for r in pool.candidates("v1")) == ["http://a:1", "http://b:1"]

    pool.close_delay_s = 0.05
    gone = pool.replicas[0]
    pool.remove("http://a:1")
    assert pool.urls == ["http://b:1"] and not gone.client.is_closed  # running requests finish
    await asyncio.sleep(0.2)
    assert gone.client.is_closed
    await pool.aclose()
    assert all(isinstance(r.client, httpx.AsyncClient) and r.client.is_closed for r in pool.replicas)
