"""Training runs: list, inspect, and the ops decisions (approve, reject)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from service.api.deps import OpsCaller, State
from service.api.errors import ApiError
from service.api.schemas import AliasQuery
from service.db.adapter_reads import version_names
from service.db.models import Adapter, AdapterVersion, EvalResult, RunState, TrainingRun
from service.domain import runs
from service.domain.decisions import DecisionError, decide_run
from service.wakeup import wake_run

router = APIRouter(tags=["runs"])


class RunOut(BaseModel):
    id: uuid.UUID
    alias: str
    state: str
    method: str | None
    method_reason: str | None
    trigger: dict[str, Any]
    progress: dict[str, Any]
    dataset_stats: dict[str, Any]
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    failure_reason: str | None
    attempts: int
    # The training job (workers/trainer/): backend, attempt, restarts and why the last one ended.
    training_job: dict[str, Any] | None
    parent_version: str | None
    candidate_version: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class RunDetail(RunOut):
    lineage: dict[str, Any]
    eval_results: list[dict[str, Any]]
    policy: dict[str, Any]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)


def _actor(caller) -> str:
    return f"key:{caller.key_id}"


async def _load(session, tenant_id: str, run_id: uuid.UUID):
    row = (await session.execute(
        select(TrainingRun, Adapter.alias).join(Adapter, Adapter.id == TrainingRun.adapter_id)
        .where(TrainingRun.id == run_id, TrainingRun.tenant_id == tenant_id))).first()
    if row is None:
        raise ApiError(404, f"run {run_id} not found", param="run_id", code="run_not_found")
    return row


def _out(run: TrainingRun, alias: str, names: dict) -> dict:
    return dict(
        id=run.id, alias=alias, state=run.state, method=run.method, method_reason=run.method_reason,
        trigger=run.trigger or {}, progress=run.progress or {}, dataset_stats=run.dataset_stats or {},
        metrics=run.metrics or {}, verdict=run.verdict or {}, failure_reason=run.failure_reason,
        attempts=run.attempts, training_job=runs.job_summary(run.trainer_job),
        parent_version=names.get(run.parent_version_id),
        candidate_version=names.get(run.candidate_version_id), created_at=run.created_at,
        started_at=run.started_at, finished_at=run.finished_at, updated_at=run.updated_at)


@router.get("/v1/runs", response_model=list[RunOut])
async def list_runs(caller: OpsCaller, state: State,
                    alias: AliasQuery = None,
                    run_state: Annotated[RunState | None, Query(alias="state")] = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[RunOut]:
    """The tenant's runs, newest first."""
    q = (select(TrainingRun, Adapter.alias).join(Adapter, Adapter.id == TrainingRun.adapter_id)
         .where(TrainingRun.tenant_id == caller.tenant_id)
         .order_by(TrainingRun.created_at.desc()).limit(limit))
    if alias:
        q = q.where(Adapter.alias == alias)
    if run_state:
        q = q.where(TrainingRun.state == run_state.value)
    async with state.sessions() as session:
        rows = (await session.execute(q)).all()
        names = await version_names(session, (v for r, _ in rows
                                              for v in (r.parent_version_id, r.candidate_version_id)))
    return [RunOut(**_out(r, a, names)) for r, a in rows]


@router.get("/v1/runs/{run_id}", response_model=RunDetail)
async def get_run(run_id: uuid.UUID, caller: OpsCaller, state: State) -> RunDetail:
    """A run with progress, dataset stats, metrics, verdict, lineage and eval results."""
    async with state.sessions() as session:
        run, alias = await _load(session, caller.tenant_id, run_id)
        names = await version_names(session, (run.parent_version_id, run.candidate_version_id))
        lineage = {}
        if run.candidate_version_id:
            version = await session.get(AdapterVersion, run.candidate_version_id)
            lineage = {**(version.lineage or {}), "sha256": version.sha256,
                       "artifact_path": version.artifact_path}
            lineage.get("dataset", {}).pop("interaction_ids", None)
        results = (await session.scalars(select(EvalResult).where(EvalResult.run_id == run_id)
                                         .order_by(EvalResult.id))).all()
    return RunDetail(**_out(run, alias, names), lineage=lineage, policy=run.policy or {},
                     eval_results=[{"subject": e.subject, "metric": e.metric, "value": e.value,
                                    "passed": e.passed, "detail": e.detail} for e in results])


async def _decide(run_id: uuid.UUID, caller, state, body: Decision, approve: bool) -> RunDetail:
    try:
        async with state.sessions() as session, session.begin():
            await session.run_sync(lambda s: decide_run(
                s, run_id, approve=approve, actor=_actor(caller), tenant_id=caller.tenant_id,
                reason=body.reason))
    except DecisionError as exc:
        raise ApiError(exc.status, str(exc), param="run_id" if exc.status == 404 else None,
                       code="run_not_found" if exc.status == 404 else "invalid_state") from exc
    if approve:
        await asyncio.to_thread(wake_run, state.broker_url, run_id)
    return await get_run(run_id, caller, state)


@router.post("/v1/runs/{run_id}/approve", response_model=RunDetail)
async def approve_run(run_id: uuid.UUID, caller: OpsCaller, state: State,
                      body: Decision | None = None) -> RunDetail:
    """Approve a gated candidate for promotion (ops only); the worker deploys it."""
    return await _decide(run_id, caller, state, body or Decision(), approve=True)


@router.post("/v1/runs/{run_id}/reject", response_model=RunDetail)
async def reject_run(run_id: uuid.UUID, caller: OpsCaller, state: State,
                     body: Decision | None = None) -> RunDetail:
    """Reject a gated candidate (ops only); the alias keeps serving what it serves."""
    return await _decide(run_id, caller, state, body or Decision(), approve=False)
