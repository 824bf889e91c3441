"""Replica metrics, as this API process sees its replicas (its observer reads every replica's
GET /v1/models each second): which adapter versions each one holds and in which role, how many
replicas each FLYWHEEL_VLLM_URLS entry resolved to and how many answer, and whether the entry's
last lookup worked.

`flywheel_resident_versions` names tenants, aliases and versions; without a metrics token it is
summed over them (service.metrics_redact), which leaves resident versions per replica and role.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import AdapterVersion
from service.engine.desired import version_rows
from service.engine.discovery import Discovery
from service.engine.replicas import ReplicaPool
from service.engine.residency import role_of


def discovery_families(pool: ReplicaPool, discovery: Discovery) -> list[GaugeMetricFamily]:
    """Replicas per configured entry (found, healthy) and whether its last lookup worked."""
    found = GaugeMetricFamily("flywheel_replicas", "vLLM replicas a FLYWHEEL_VLLM_URLS entry "
                              "resolved to (a headless Service name: one per address)",
                              labels=["source"])
    healthy = GaugeMetricFamily("flywheel_replicas_healthy", "Of those, the replicas that "
                                "answered the last observation", labels=["source"])
    lookup = GaugeMetricFamily("flywheel_replica_discovery_ok", "1 when the entry's last DNS "
                               "lookup worked; 0: its last known replicas are kept",
                               labels=["source"])
    for entry, lk in discovery.lookups.items():
        mine = [r for r in pool.replicas if (r.source or r.url) == entry]
        found.add_metric([entry], len(mine))
        healthy.add_metric([entry], sum(r.is_up() for r in mine))
        lookup.add_metric([entry], 0 if lk.error else 1)
    return [found, healthy, lookup]


async def resident_families(session: AsyncSession, pool: ReplicaPool) -> list[GaugeMetricFamily]:
    """Per replica: each version it holds (1, with tenant, alias and role) and how many adapters
    it lists in all (other deployments' included)."""
    held = {r.url: r.loaded for r in pool.replicas if r.loaded is not None}
    names = sorted({n for loaded in held.values() for n in loaded})
    rows = ({r.lora_name: r for r in await session.execute(
        version_rows().where(AdapterVersion.lora_name.in_(names)))} if names else {})
    resident = GaugeMetricFamily("flywheel_resident_versions", "Adapter versions loaded on a "
                                 "replica, with the alias's role for each (live, canary, warm, "
                                 "staged; another status: about to be unloaded)",
                                 labels=["replica", "tenant", "alias", "version", "role"])
    adapters = GaugeMetricFamily("flywheel_replica_adapters", "LoRA adapters a replica lists "
                                 "(GET /v1/models), whoever loaded them", labels=["replica"])
    for url, loaded in held.items():
        adapters.add_metric([url], len(loaded))
        for name in sorted(loaded & rows.keys()):
            v = rows[name]
            role = role_of(v.id, v.status, v.serving_version_id, v.canary_version_id)
            resident.add_metric([url, v.tenant_id, v.alias, name, role], 1)
    return [resident, adapters]


def exposition(families: Iterable[GaugeMetricFamily]) -> bytes:
    """Prometheus text for ready-made families."""
    fixed = list(families)

    class _Fixed:
        def collect(self):
            return fixed

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return generate_latest(registry)
