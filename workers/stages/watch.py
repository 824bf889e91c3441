"""The watch stage (canary | live -> live | rolled_back): through its watch window, compare a
deployed version's thumbs-up rate with its predecessor's; promote a canary that holds up, close
the window of a live version that does, roll back one that does worse. The rule is the pure
workers/watch.py; this module gathers its inputs and acts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text

from service.db import repositories as repo
from service.db.models import Adapter, RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs
from service.domain.policy import Policy
from service.engine import swap as engine_swap
from workers.context import WorkerContext
from workers.stages.deploy import engine_op, queue_promotion_exports
from workers.watch import RateComparison, judge

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
        deployed_at = progress.get("deployed_at")
        deployed = datetime.fromisoformat(deployed_at) if deployed_at else None
        if deployed is None or progress.get("watch_closed"):
            continue
        window_over = datetime.now(UTC) >= deployed + timedelta(minutes=policy.watch.window_minutes)
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
        tenant_id = repo.get_row(s, Adapter, adapter_id).tenant_id
    if decision.action == "rollback" and policy.rollback.automatic:
        if state == RunState.canary.value:
            result = engine_op(ctx, lambda admins: engine_swap.set_canary(
                ctx.sessions, admins, adapter_id, None, 0.0, config, actor="watch",
                reason=decision.reason))
        else:
            result = engine_op(ctx, lambda admins: engine_swap.rollback(
                ctx.sessions, admins, adapter_id, config, actor="watch", reason=decision.reason))
        with session_scope(ctx.sessions) as s:
            if result.ok:
                runs.transition(s, run_id, None, RunState.rolled_back,
                                verdict={"watch": decision.reason})
                # The version stays warm through the drain window (stale routes may still reach
                # it); the reconciler retires it. Its failure_reason says why it was rolled back.
            repo.audit(s, tenant_id=tenant_id, actor="watch",
                       action="run.rolled_back" if result.ok else "run.rollback_failed",
                       target_type="run", target_id=str(run_id), reason=decision.reason,
                       detail={"swap": result.as_dict()})
        return
    if decision.action == "keep" and state == RunState.canary.value:
        result = engine_op(ctx, lambda admins: engine_swap.swap(
            ctx.sessions, admins, version_id, config, actor="watch",
            reason=f"canary passed: {decision.reason}"))
        with session_scope(ctx.sessions) as s:
            if result.ok:
                runs.transition(s, run_id, None, RunState.live, progress={
                    "deployed_at": datetime.now(UTC).isoformat()})
                runs.supersede_others(s, adapter_id, run_id)
            repo.audit(s, tenant_id=tenant_id, actor="watch", action="canary.promoted" if result.ok
                       else "canary.promotion_failed", target_type="run", target_id=str(run_id),
                       reason=decision.reason)
        if result.ok:
            queue_promotion_exports(ctx, version_id, policy)
        return
    with session_scope(ctx.sessions) as s:  # keep a live version: close its window
        runs.transition(s, run_id, None, RunState.live, release=False,
                        progress={"watch_closed": True, "watch_verdict": decision.reason})
        repo.audit(s, tenant_id=tenant_id, actor="watch", action="run.kept", target_type="run",
                   target_id=str(run_id), reason=decision.reason)
