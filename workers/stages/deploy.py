"""The deploy stage (approved -> deploying -> canary | live): swap the candidate in, or start it
as a canary beside the serving version; queue the exports a promotion asks for. Engine work goes
through service.engine.swap; this module decides and records. The watch stage takes it from
there (workers/stages/watch.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs
from service.domain.exports import ExportRefused, request_export
from service.domain.policy import Policy
from service.engine import swap as engine_swap
from service.engine.vllm_admin import replica_admins_for
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_export
from workers.context import StepFailed, WorkerContext

log = logging.getLogger(__name__)


def engine_op(ctx: WorkerContext, op):
    """Run op(admins) against every configured replica; clients closed afterwards."""
    async def go():
        async with replica_admins_for(ctx.settings) as admins:
            return await op(admins)

    return asyncio.run(go())


def deploy(ctx: WorkerContext, claim: runs.Claim) -> str:
    """approved → deploying → canary | live (or failed with the swap's reason)."""
    settings = ctx.settings
    if not settings.vllm_url_list:
        raise StepFailed("no vLLM replicas configured (FLYWHEEL_VLLM_URLS): cannot deploy")
    with session_scope(ctx.sessions) as s:
        run = repo.get_row(s, TrainingRun, claim.run_id)
        if run.candidate_version_id is None:
            raise StepFailed(f"run {claim.run_id} was approved without a candidate version")
        runs.transition(s, run.id, claim.owner, RunState.deploying, release=False)
        policy = Policy.model_validate(run.policy)
        adapter = repo.get_row(s, Adapter, run.adapter_id)
        version_id, adapter_id = run.candidate_version_id, adapter.id
    config = engine_swap.SwapConfig.from_settings(settings)
    canary = policy.canary.share > 0
    if canary:
        result = engine_op(ctx, lambda admins: engine_swap.set_canary(
            ctx.sessions, admins, adapter_id, version_id, policy.canary.share, config,
            actor="worker", reason=f"run {claim.run_id}: canary at {policy.canary.share:.0%}"))
    else:
        result = engine_op(ctx, lambda admins: engine_swap.swap(
            ctx.sessions, admins, version_id, config, actor="worker",
            reason=f"run {claim.run_id} promoted"))
    with session_scope(ctx.sessions) as s:
        if not result.ok:
            runs.transition(s, claim.run_id, claim.owner, RunState.failed,
                            failure_reason=f"deploy failed at {result.phase}: {result.reason}",
                            metrics={"deploy": result.as_dict()})
            return RunState.failed.value
        to = RunState.canary if canary else RunState.live
        # Merged into progress (runs.MERGED_JSON): the ops page still charts the training loss.
        runs.transition(s, claim.run_id, claim.owner, to, metrics={"deploy": result.as_dict()},
                        progress={"deployed_at": datetime.now(UTC).isoformat()})
        if to == RunState.live:
            runs.supersede_others(s, adapter_id, claim.run_id)
    if to == RunState.live:
        queue_promotion_exports(ctx, version_id, policy)
    return to.value


def queue_promotion_exports(ctx: WorkerContext, version_id: uuid.UUID, policy: Policy) -> list:
    """Queue the exports the policy asks for on every promotion (export.on_promotion)."""
    queued = []
    for spec in policy.export.on_promotion:
        with session_scope(ctx.sessions) as s:
            try:
                export, created = request_export(
                    s, repo.get_row(s, AdapterVersion, version_id), fmt=spec.format, quant=spec.quant,
                    fallback=policy.export.fallback, actor="promotion",
                    reason="export.on_promotion in the alias's policy")
            except ExportRefused as exc:  # a promotion never fails for its exports
                log.warning("export on promotion of %s refused: %s", version_id, exc)
                continue
            if created:
                queued.append(export.id)
    for export_id in queued:
        wake_export(resolve_broker_url(ctx.settings), export_id)
    return queued
