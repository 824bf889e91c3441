"""The run state machine: claim a run, run the stage its state calls for, move it on; and the
sweeper that keeps the loop turning when a wake-up was lost.

Each stage (workers/stages/) is idempotent: it re-reads the run, and a stage that already
produced its output (e.g. a candidate version) just records the transition.
"""

from __future__ import annotations

import logging
import uuid

from service.db import repositories as repo
from service.db.models import RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs, trigger
from service.domain.exports import claimable_exports
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_export, wake_run
from workers.context import StepFailed, WorkerContext, disk_full_reason
from workers.stages import adapter_import, deploy, evaluate, train

log = logging.getLogger(__name__)

# States a worker acts on (the stage for each: run_stage).
WORK_STATES = (RunState.pending.value, RunState.training.value, RunState.evaluating.value,
               RunState.approved.value, RunState.deploying.value)


def advance(ctx: WorkerContext, run_id: uuid.UUID) -> str:
    """Claim the run and run one step; re-enqueue when more work follows. Returns what happened."""
    with session_scope(ctx.sessions) as s:
        claim = runs.claim(s, run_id, ctx.worker_id, ctx.settings.run_lease_s, WORK_STATES)
    if claim is None:
        return "not claimable (done, or held by another worker)"
    try:
        outcome = run_stage(ctx, claim)
    except StepFailed as exc:
        _fail(ctx, claim, str(exc))
        return f"failed: {exc}"
    except Exception as exc:
        full = disk_full_reason(ctx, exc)
        if full:
            log.error("run %s: %s", run_id, full)
            _fail(ctx, claim, full)
            return "failed: disk full"
        log.exception("run %s: step %s crashed", run_id, claim.state)
        _fail(ctx, claim, f"{claim.state} step crashed: {type(exc).__name__}: {exc}")
        return f"failed: {type(exc).__name__}"
    if outcome in WORK_STATES:
        wake_run(_broker(ctx), run_id)
    return outcome


def run_stage(ctx: WorkerContext, claim: runs.Claim) -> str:
    """Run the stage the claimed state calls for; returns the state the run is in afterwards."""
    if claim.state in (RunState.pending.value, RunState.training.value):
        if adapter_import.is_adapter_import(ctx, claim.run_id):
            return adapter_import.prepare_gate(ctx, claim)  # trained elsewhere: gate data only
        return train.train(ctx, claim)
    if claim.state == RunState.evaluating.value:
        return evaluate.evaluate(ctx, claim)
    if claim.state in (RunState.approved.value, RunState.deploying.value):
        return deploy.deploy(ctx, claim)
    raise StepFailed(f"no stage for state {claim.state}")


def _fail(ctx: WorkerContext, claim: runs.Claim, reason: str) -> None:
    with session_scope(ctx.sessions) as s:
        if runs.transition(s, claim.run_id, claim.owner, RunState.failed, failure_reason=reason[:2000]):
            run = s.get(TrainingRun, claim.run_id)
            assert run is not None  # the transition just updated it, in this transaction
            repo.audit(s, tenant_id=run.tenant_id, actor="worker", action="run.failed",
                       target_type="run", target_id=str(claim.run_id), reason=reason[:2000])


def _broker(ctx: WorkerContext) -> str:
    return resolve_broker_url(ctx.settings)


def sweep(ctx: WorkerContext) -> dict:
    """Run the trigger for every alias (service.domain.trigger); re-enqueue unclaimed runs and exports
    that have no wake-up waiting in the queue."""
    created = trigger.sweep(ctx.sessions, ctx.policies)
    with session_scope(ctx.sessions) as s:
        pending = runs.claimable_runs(s, WORK_STATES)
    broker = _broker(ctx)
    resend = ctx.settings.wake_resend_after_s
    enqueued = sum(wake_run(broker, run_id, resend_after_s=resend) for run_id in pending)
    with session_scope(ctx.sessions) as s:
        waiting = claimable_exports(s)
    exports_enqueued = sum(wake_export(broker, export_id, resend_after_s=resend)
                           for export_id in waiting)
    return {"created": created, "enqueued": enqueued, "exports_enqueued": exports_enqueued}
