"""The vLLM replicas this API process routes to, and which of the caller's adapter versions each
one holds (ops key; the ops page's Replicas panel). Replicas are shared by every tenant: the
versions listed are the caller tenant's only, the adapter count is everyone's."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel

from service.api.deps import OpsCaller, State
from service.db.models import Adapter, AdapterVersion
from service.engine.desired import version_rows
from service.engine.residency import role_of

router = APIRouter(tags=["replicas"])


class ResidentOut(BaseModel):
    alias: str
    version: str  # the lora name
    number: int
    # live | canary | warm | staged; another status: not desired, unloaded by the next round.
    role: str


class ReplicaOut(BaseModel):
    url: str
    source: str  # the FLYWHEEL_VLLM_URLS entry it came from
    healthy: bool
    observed: bool  # False until the observer has read its GET /v1/models
    adapters: int | None  # every adapter it lists, any tenant's
    versions: list[ResidentOut]


class LookupOut(BaseModel):
    name: str  # the configured entry
    replicas: list[str]
    expanded: bool  # a name resolved into one replica per address
    error: str | None  # why the last lookup failed (its last known replicas are kept)
    resolved_at: datetime | None


class ReplicasOut(BaseModel):
    replicas: list[ReplicaOut]
    discovery: list[LookupOut]
    discovery_interval_s: float


@router.get("/v1/replicas", response_model=ReplicasOut)
async def list_replicas(caller: OpsCaller, state: State) -> ReplicasOut:
    """Each replica with its health and the caller's versions it holds, and how every
    configured entry resolved."""
    replicas = list(state.pool.replicas)
    names = sorted({n for r in replicas for n in r.loaded or ()})
    rows = {}
    if names:
        async with state.sessions() as session:
            rows = {v.lora_name: v for v in await session.execute(version_rows().where(
                AdapterVersion.lora_name.in_(names), Adapter.tenant_id == caller.tenant_id)
                .order_by(Adapter.alias, AdapterVersion.number))}
    out = []
    for r in replicas:
        held = r.loaded or set()
        versions = [ResidentOut(alias=v.alias, version=v.lora_name, number=v.number,
                                role=role_of(v.id, v.status, v.serving_version_id,
                                             v.canary_version_id))
                    for name, v in rows.items() if name in held]
        out.append(ReplicaOut(url=r.url, source=r.source or r.url, healthy=r.is_up(),
                              observed=r.loaded is not None,
                              adapters=None if r.loaded is None else len(r.loaded),
                              versions=versions))
    lookups = [LookupOut(name=lk.entry, replicas=list(lk.urls), expanded=lk.expanded,
                         error=lk.error,
                         resolved_at=(datetime.fromtimestamp(lk.resolved_at, UTC)
                                      if lk.resolved_at else None))
               for lk in state.discovery.lookups.values()]
    return ReplicasOut(replicas=out, discovery=lookups,
                       discovery_interval_s=state.settings.replica_discovery_interval_s)
