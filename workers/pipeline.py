"""The run state machine: claim a run, perform the step its state calls for, move it on.

Each step is idempotent: it re-reads the run, and a step that already produced its output
(e.g. a candidate version) just records the transition.
"""

from __future__ import annotations

import errno
import logging
import uuid

from sqlalchemy import select

from service import runs
from service.db.models import Adapter, RunState, TrainingRun
from service.db.session import session_scope
from service.policy import Policy
from service.wakeup import wake_export, wake_run
from workers.context import WorkerContext

log = logging.getLogger(__name__)

# States a worker acts on, and the step for each.
WORK_STATES = (RunState.pending.value, RunState.training.value, RunState.evaluating.value,
               RunState.approved.value, RunState.deploying.value)


def advance(ctx: WorkerContext, run_id: uuid.UUID) -> str:
    """Claim the run and run one step; re-enqueue when more work follows. Returns what happened."""
    with session_scope(ctx.sessions) as s:
        claim = runs.claim(s, run_id, ctx.worker_id, ctx.settings.run_lease_s, WORK_STATES)
    if claim is None:
        return "not claimable (done, or held by another worker)"
    from workers import steps  # heavy imports (torch) only when there is work

    try:
        outcome = steps.run_step(ctx, claim)
    except steps.StepFailed as exc:
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


# Below this much free space a failed write is taken to be a full disk: torch's checkpoint
# writer, for one, reports ENOSPC as a RuntimeError about stream positions.
_DISK_FULL_BYTES = 1 << 20


def disk_full_reason(ctx: WorkerContext, exc: BaseException, retry: str = "start a new run"
                     ) -> str | None:
    """A clear reason when a step or export failed because the artifact disk is full, else None."""
    import shutil

    where = ctx.settings.resolved_artifact_dir
    enospc = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    try:
        low = shutil.disk_usage(where).free < _DISK_FULL_BYTES
    except OSError:
        low = False
    if not (enospc or low):
        return None
    return (f"artifact disk full ({where}): {type(exc).__name__}: {exc}; free space, then {retry} "
            "(artifacts are written atomically: nothing partial was recorded)")


def _fail(ctx: WorkerContext, claim: runs.Claim, reason: str) -> None:
    from service.db import repositories as repo

    with session_scope(ctx.sessions) as s:
        if runs.transition(s, claim.run_id, claim.owner, RunState.failed, failure_reason=reason[:2000]):
            run = s.get(TrainingRun, claim.run_id)
            repo.audit(s, tenant_id=run.tenant_id, actor="worker", action="run.failed",
                       target_type="run", target_id=str(claim.run_id), reason=reason[:2000])


def _broker(ctx: WorkerContext) -> str:
    from service.embedded import resolve_broker_url

    return resolve_broker_url(ctx.settings)


def sweep(ctx: WorkerContext) -> dict:
    """Create runs for aliases over their threshold; re-enqueue unclaimed runs and exports that
    have no wake-up waiting in the queue."""
    from service.exports import claimable_exports

    created = 0
    with session_scope(ctx.sessions) as s:
        adapters = list(s.execute(select(Adapter.id, Adapter.alias, Adapter.tenant_id)))
    for adapter_id, alias, tenant_id in adapters:
        policy: Policy = ctx.policies.for_alias(alias, tenant_id)
        with session_scope(ctx.sessions) as s:
            if runs.maybe_trigger(s, adapter_id, policy):
                created += 1
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
