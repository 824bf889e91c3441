"""After the gate: deploy (swap, or canary first), then watch the thumbs-up rate and keep or
roll back. Engine work goes through service.engine.swap; this module decides and records."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import select, text

from service import runs
from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, RunState, TrainingRun
from service.db.session import session_scope
from service.embedded import resolve_broker_url
from service.engine import swap as engine_swap
from service.engine.vllm_admin import replica_admins
from service.exports import ExportRefused, request_export
from service.policy import Policy
from service.wakeup import wake_export
from workers.context import WorkerContext
from workers.watch import RateComparison, judge

log = logging.getLogger(__name__)


def _engine_op(ctx: WorkerContext, op):
    """Run op(admins) against every configured replica; clients closed afterwards."""
    async def go():
        async with replica_admins(ctx.settings.vllm_url_list) as admins:
            return await op(admins)

    return asyncio.run(go())


def deploy_step(ctx: WorkerContext, claim: runs.Claim) -> str:
    """approved → deploying → canary | live (or failed with the swap's reason)."""
    settings = ctx.settings
    if not settings.vllm_url_list:
        from workers.steps import StepFailed

        raise StepFailed("no vLLM replicas configured (FLYWHEEL_VLLM_URLS): cannot deploy")
    with session_scope(ctx.sessions) as s:
        run = s.get(TrainingRun, claim.run_id)
        runs.transition(s, run.id, claim.owner, RunState.deploying, release=False)
        policy = Policy.model_validate(run.policy)
        adapter = s.get(Adapter, run.adapter_id)
        version_id, adapter_id = run.candidate_version_id, adapter.id
    config = engine_swap.SwapConfig.from_settings(settings)
    canary = policy.canary.share > 0
    if canary:
        result = _engine_op(ctx, lambda admins: engine_swap.set_canary(
            ctx.sessions, admins, adapter_id, version_id, policy.canary.share, config,
            actor="worker", reason=f"run {claim.run_id}: canary at {policy.canary.share:.0%}"))
    else:
        result = _engine_op(ctx, lambda admins: engine_swap.swap(
            ctx.sessions, admins, version_id, config, actor="worker",
            reason=f"run {claim.run_id} promoted"))
    with session_scope(ctx.sessions) as s:
        if not result.ok:
            runs.transition(s, claim.run_id, claim.owner, RunState.failed,
                            failure_reason=f"deploy failed at {result.phase}: {result.reason}",
                            metrics={**(s.get(TrainingRun, claim.run_id).metrics or {}),
                                     "deploy": result.as_dict()})
            return RunState.failed.value
        to = RunState.canary if canary else RunState.live
        metrics = {**(s.get(TrainingRun, claim.run_id).metrics or {}), "deploy": result.as_dict()}
        # Merged, not replaced: the ops page still charts the run's training loss.
        progress = {**(s.get(TrainingRun, claim.run_id).progress or {}),
                    "deployed_at": datetime.now(timezone.utc).isoformat()}
        runs.transition(s, claim.run_id, claim.owner, to, metrics=metrics, progress=progress)
        if to == RunState.live:
            _supersede_others(s, adapter_id, claim.run_id)
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
                    s, s.get(AdapterVersion, version_id), fmt=spec.format, quant=spec.quant,
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


def _supersede_others(s, adapter_id: uuid.UUID, keep_run: uuid.UUID) -> None:
    s.execute(text("""UPDATE training_runs SET state = 'superseded', updated_at = now()
                      WHERE adapter_id = :a AND state IN ('live', 'canary') AND id <> :keep"""),
              {"a": adapter_id, "keep": keep_run})


# Imported ratings (interactions.source set) rate answers no version of the alias gave: their
# version_id is NULL like the base model's, so they are left out of the base's rate here. The
# AI judge's are left out too: the watch compares what users think.
_RATES = text("""
SELECT count(*) FILTER (WHERE f.rating = 'up') AS ups, count(*) AS n
FROM feedback f JOIN interactions i ON i.id = f.interaction_id
WHERE f.adapter_id = :adapter_id
  AND f.version_id IS NOT DISTINCT FROM :version_id
  AND i.source IS NULL
  AND f.source = 'human'
  AND (CAST(:since AS timestamptz) IS NULL OR f.created_at >= CAST(:since AS timestamptz))
""")


def _rates(s, adapter_id, version_id, since) -> tuple[int, int]:
    row = s.execute(_RATES, {"adapter_id": adapter_id, "version_id": version_id, "since": since}).one()
    return int(row.ups), int(row.n)


def watch_all(ctx: WorkerContext) -> list[dict]:
    """Judge every run in its watch window (live or canary); roll back or promote as decided."""
    decisions = []
    with session_scope(ctx.sessions) as s:
        watched = list(s.scalars(select(TrainingRun).where(
            TrainingRun.state.in_([RunState.live.value, RunState.canary.value]))))
        items = [(r.id, r.state, r.adapter_id, r.candidate_version_id, r.parent_version_id,
                  r.policy, r.progress) for r in watched]
    for run_id, state, adapter_id, version_id, parent_id, policy_raw, progress in items:
        policy = Policy.model_validate(policy_raw)
        deployed = datetime.fromisoformat(progress.get("deployed_at")) if progress.get(
            "deployed_at") else None
        if deployed is None or progress.get("watch_closed"):
            continue
        window_over = datetime.now(timezone.utc) >= deployed + timedelta(minutes=policy.watch.window_minutes)
        with session_scope(ctx.sessions) as s:
            new_up, new_n = _rates(s, adapter_id, version_id, deployed)
            # A canary runs beside the serving version: compare the same window. A promoted
            # version is compared with everything its predecessor was rated.
            prev_since = deployed if state == RunState.canary.value else None
            prev_up, prev_n = _rates(s, adapter_id, parent_id, prev_since)
        decision = judge(RateComparison(new_up, new_n, prev_up, prev_n), policy.watch,
                         window_over=window_over)
        decisions.append({"run_id": str(run_id), "action": decision.action, "reason": decision.reason})
        if decision.action == "wait":
            continue
        _act(ctx, run_id, state, adapter_id, version_id, policy, decision)
    return decisions


def _act(ctx, run_id, state, adapter_id, version_id, policy: Policy, decision) -> None:
    settings = ctx.settings
    config = engine_swap.SwapConfig.from_settings(settings)
    with session_scope(ctx.sessions) as s:
        tenant_id = s.get(Adapter, adapter_id).tenant_id
    if decision.action == "rollback" and policy.rollback.automatic:
        if state == RunState.canary.value:
            result = _engine_op(ctx, lambda admins: engine_swap.set_canary(
                ctx.sessions, admins, adapter_id, None, 0.0, config, actor="watch",
                reason=decision.reason))
        else:
            result = _engine_op(ctx, lambda admins: engine_swap.rollback(
                ctx.sessions, admins, adapter_id, config, actor="watch", reason=decision.reason))
        with session_scope(ctx.sessions) as s:
            if result.ok:
                runs.transition(s, run_id, None, RunState.rolled_back,
                                verdict={**(s.get(TrainingRun, run_id).verdict or {}),
                                         "watch": decision.reason})
                # The version stays warm through the drain window (stale routes may still reach
                # it); the reconciler retires it. Its failure_reason says why it was rolled back.
            repo.audit(s, tenant_id=tenant_id, actor="watch",
                       action="run.rolled_back" if result.ok else "run.rollback_failed",
                       target_type="run", target_id=str(run_id), reason=decision.reason,
                       detail={"swap": result.as_dict()})
        return
    if decision.action == "keep" and state == RunState.canary.value:
        result = _engine_op(ctx, lambda admins: engine_swap.swap(
            ctx.sessions, admins, version_id, config, actor="watch",
            reason=f"canary passed: {decision.reason}"))
        with session_scope(ctx.sessions) as s:
            if result.ok:
                runs.transition(s, run_id, None, RunState.live, progress={
                    **(s.get(TrainingRun, run_id).progress or {}),
                    "deployed_at": datetime.now(timezone.utc).isoformat()})
                _supersede_others(s, adapter_id, run_id)
            repo.audit(s, tenant_id=tenant_id, actor="watch", action="canary.promoted" if result.ok
                       else "canary.promotion_failed", target_type="run", target_id=str(run_id),
                       reason=decision.reason)
        if result.ok:
            queue_promotion_exports(ctx, version_id, policy)
        return
    with session_scope(ctx.sessions) as s:  # keep a live version: close its window
        run = s.get(TrainingRun, run_id)
        runs.transition(s, run_id, None, RunState.live, release=False,
                        progress={**(run.progress or {}), "watch_closed": True,
                                  "watch_verdict": decision.reason})
        repo.audit(s, tenant_id=tenant_id, actor="watch", action="run.kept", target_type="run",
                   target_id=str(run_id), reason=decision.reason)
