"""Aliases and their versions: what serves, the canary, history; manual rollback (ops)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.deps import OpsCaller, State
from service.api.errors import ApiError
from service.api.export_views import ExportOut, list_for_adapter
from service.api.lookups import adapter_or_404
from service.api.schemas import AliasPath
from service.db import adapter_reads as reads
from service.db import repositories as repo
from service.db.models import Adapter
from service.domain.judge_stats import summary
from service.engine import swap as engine_swap
from service.engine.vllm_admin import replica_admins
from service.names import check_name

router = APIRouter(tags=["adapters"])

# Versions the alias list carries per alias: an alias retrained daily has hundreds of them.
RECENT_VERSIONS = 6


class VersionOut(BaseModel):
    id: uuid.UUID
    number: int
    lora_name: str
    status: str
    sha256: str
    parent_version_id: uuid.UUID | None
    run_id: uuid.UUID | None
    failure_reason: str | None
    created_at: datetime
    promoted_at: datetime | None
    # Human ratings (posted or imported); the AI judge's are counted apart.
    thumbs_up: int = 0
    thumbs_down: int = 0
    judge_up: int = 0
    judge_down: int = 0


class VersionBrief(BaseModel):
    """A version as the alias list shows it, with its ratings."""

    id: uuid.UUID
    number: int
    lora_name: str
    status: str
    thumbs_up: int = 0
    thumbs_down: int = 0
    judge_up: int = 0
    judge_down: int = 0


class AdapterOut(BaseModel):
    alias: str
    description: str
    serving: str
    serving_version_id: uuid.UUID | None
    previous_version_id: uuid.UUID | None
    canary: str | None
    canary_share: float
    created_at: datetime
    previous: str | None  # lora_name of previous_version_id
    version_count: int
    recent_versions: list[VersionBrief]  # newest first, at most RECENT_VERSIONS


class AdapterDetail(AdapterOut):
    versions: list[VersionOut]
    # Newest first; each with its files, sha256 and status (see /v1/adapters/{alias}/exports).
    exports: list[ExportOut] = []


class AdapterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(min_length=1, max_length=63)
    description: str = Field(default="", max_length=2000)

    @field_validator("alias")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", v):
            raise ValueError("use lowercase letters, digits, '.', '_' and '-'")
        return check_name("alias", v)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)


def _summary(a: Adapter, names: dict, base: str, recent: list[VersionBrief],
             count: int) -> dict[str, Any]:
    return dict(alias=a.alias, description=a.description or "",
                serving=names.get(a.serving_version_id, base),
                serving_version_id=a.serving_version_id, previous_version_id=a.previous_version_id,
                canary=names.get(a.canary_version_id), canary_share=a.canary_share or 0.0,
                created_at=a.created_at, previous=names.get(a.previous_version_id),
                version_count=count, recent_versions=recent)


def _thumbs(counts: dict[tuple, int], version_id: uuid.UUID) -> dict[str, int]:
    """A version's ratings from (version, source, rating) counts: human and judge apart."""
    return {"thumbs_up": counts.get((version_id, "human", "up"), 0),
            "thumbs_down": counts.get((version_id, "human", "down"), 0),
            "judge_up": counts.get((version_id, "judge", "up"), 0),
            "judge_down": counts.get((version_id, "judge", "down"), 0)}


async def _recent_versions(session, adapter_ids: list[uuid.UUID]
                           ) -> tuple[dict[uuid.UUID, list[VersionBrief]], dict[uuid.UUID, int]]:
    """Each adapter's newest RECENT_VERSIONS versions with ratings, and its version count.

    Two queries whatever the number of aliases or versions."""
    rows = await reads.recent_versions(session, adapter_ids, RECENT_VERSIONS)
    counts = (await reads.rating_counts(session, adapter_ids, [r.id for r in rows])
              if rows else {})
    recent: dict[uuid.UUID, list[VersionBrief]] = {}
    totals: dict[uuid.UUID, int] = {}
    for r in rows:
        totals[r.adapter_id] = r.total
        recent.setdefault(r.adapter_id, []).append(VersionBrief(
            id=r.id, number=r.number, lora_name=r.lora_name, status=r.status,
            **_thumbs(counts, r.id)))
    return recent, totals


@router.get("/v1/adapters", response_model=list[AdapterOut])
async def list_adapters(caller: OpsCaller, state: State) -> list[AdapterOut]:
    """The tenant's aliases with what each serves and its newest versions."""
    async with state.sessions() as session:
        adapters = await reads.tenant_adapters(session, caller.tenant_id)
        names = await reads.version_names(session, (
            i for a in adapters
            for i in (a.serving_version_id, a.previous_version_id, a.canary_version_id)))
        recent, totals = await _recent_versions(session, [a.id for a in adapters])
    base = state.settings.base_model_name
    return [AdapterOut(**_summary(a, names, base, recent.get(a.id, []), totals.get(a.id, 0)))
            for a in adapters]


@router.post("/v1/adapters", response_model=AdapterOut, status_code=201)
async def create_adapter(body: AdapterCreate, caller: OpsCaller, state: State) -> AdapterOut:
    """Register an alias (ops); it serves the base model until a version is promoted."""
    async with state.sessions() as session, session.begin():
        if await reads.adapter_for_alias(session, caller.tenant_id, body.alias):
            raise ApiError(409, f"alias {body.alias!r} already exists", param="alias",
                           code="alias_exists")
        adapter = await session.run_sync(lambda s: repo.ensure_adapter(
            s, caller.tenant_id, body.alias, body.description))
        await session.run_sync(lambda s: repo.audit(
            s, tenant_id=caller.tenant_id, actor=f"key:{caller.key_id}", action="adapter.create",
            target_type="adapter", target_id=str(adapter.id)))
    return AdapterOut(**_summary(adapter, {}, state.settings.base_model_name, [], 0))


@router.get("/v1/adapters/{alias}", response_model=AdapterDetail)
async def get_adapter(alias: AliasPath, caller: OpsCaller, state: State) -> AdapterDetail:
    """An alias: serving and canary versions, and every version with its ratings."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        versions = await reads.versions_of(session, adapter.id)
        counts = await reads.rating_counts(session, [adapter.id])
        exports = await list_for_adapter(session, adapter.id)
    names = {v.id: v.lora_name for v in versions}
    out = [VersionOut.model_validate(v, from_attributes=True).model_copy(
        update=_thumbs(counts, v.id)) for v in versions]
    recent = [VersionBrief(**v.model_dump(include=set(VersionBrief.model_fields)))
              for v in out[::-1][:RECENT_VERSIONS]]
    return AdapterDetail(**_summary(adapter, names, state.settings.base_model_name, recent,
                                    len(out)), versions=out, exports=exports)


class PolicyOut(BaseModel):
    alias: str
    # The files merged into it, most general first; empty: the built-in defaults.
    sources: list[str]
    policy: dict[str, Any]


@router.get("/v1/adapters/{alias}/policy", response_model=PolicyOut)
async def adapter_policy(alias: AliasPath, caller: OpsCaller, state: State) -> PolicyOut:
    """The policy in effect for an alias (trigger, training, gate, approval, ..., export)."""
    async with state.sessions() as session:
        await adapter_or_404(session, caller.tenant_id, alias)  # 404 for another tenant's alias
    policy = state.policies.for_alias(alias, caller.tenant_id)
    return PolicyOut(alias=alias, sources=state.policies.source_for(alias, caller.tenant_id),
                     policy=policy.model_dump(mode="json"))


@router.get("/v1/adapters/{alias}/stats")
async def adapter_stats(alias: AliasPath, caller: OpsCaller, state: State,
                        bucket_minutes: Annotated[int, Query(ge=1, le=1440)] = 5,
                        hours: Annotated[int, Query(ge=1, le=24 * 30)] = 24) -> dict:
    """Thumbs-up rate over time per version that answered (for the ops page's chart)."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        rows = await reads.rating_series(session, adapter.id, bucket_minutes=bucket_minutes,
                                         hours=hours, base_name=state.settings.base_model_name)
        series: dict[str, list] = {}
        for r in rows:
            series.setdefault(r.version, []).append(
                {"t": r.bucket.isoformat(), "up": r.up, "n": r.n, "rate": r.up / r.n if r.n else None})
    return {"alias": alias, "bucket_minutes": bucket_minutes, "series": series,
            "feedback": sum(p["n"] for points in series.values() for p in points)}


@router.get("/v1/adapters/{alias}/judge")
async def adapter_judge(alias: AliasPath, caller: OpsCaller, state: State,
                        sweeps: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
    """The AI judge of an alias: its policy (endpoint without credentials), the hour's budget
    used, ratings by source, agreement with humans on answers both rated, recent sweeps."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        policy = state.policies.for_alias(alias, caller.tenant_id).judge
        return {"alias": alias, **await summary(session, adapter.id, policy, sweeps)}


@router.post("/v1/adapters/{alias}/rollback", response_model=AdapterDetail)
async def rollback_adapter(alias: AliasPath, caller: OpsCaller, state: State,
                           body: RollbackBody | None = None) -> AdapterDetail:
    """Serve the previous version again (ops): instant while it is warm."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
    if not state.settings.vllm_url_list:
        raise ApiError(503, "no vLLM replicas configured", code="engine_unavailable",
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    config = engine_swap.SwapConfig.from_settings(state.settings)
    try:
        # This process's replicas as its discovery last found them.
        async with replica_admins(state.pool.urls) as admins:
            result = await engine_swap.rollback(state.sync_sessions(), admins, adapter.id, config,
                                                actor=f"key:{caller.key_id}",
                                                reason=(body.reason if body else None))
    except engine_swap.SwapError as exc:  # in progress, or refused: nothing was changed
        raise ApiError(409, exc.reason, code=exc.code) from exc
    if not result.ok:
        raise ApiError(503, f"rollback failed at {result.phase}: {result.reason}",
                       code="rollback_failed", headers={"Retry-After": str(state.settings.retry_after_s)})
    state.route_cache.clear()
    return await get_adapter(alias, caller, state)
