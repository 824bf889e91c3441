"""Ops decisions on runs (approve, reject), shared by the API, the CLI and the ops page."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import repositories as repo
from service.db.models import AdapterVersion, RunState, TrainingRun, VersionStatus
from service.domain import runs


class DecisionError(Exception):
    """The decision cannot be taken: status 404 (no such run for the tenant) or 409 (wrong state)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decide_run(session: Session, run_id: uuid.UUID, *, approve: bool, actor: str,
               tenant_id: str | None = None, reason: str | None = None) -> TrainingRun:
    """Approve or reject a run awaiting approval; audited. tenant_id None: any tenant (CLI)."""
    q = select(TrainingRun).where(TrainingRun.id == run_id).with_for_update()
    if tenant_id is not None:
        q = q.where(TrainingRun.tenant_id == tenant_id)
    # Row lock: two ops deciding at once get one decision and one 409.
    run = session.scalars(q).first()
    if run is None:
        raise DecisionError(404, f"run {run_id} not found")
    if run.state != RunState.awaiting_approval.value:
        raise DecisionError(409, f"run {run_id} is {run.state}, not awaiting_approval")
    # Written by the one writer of run rows (a rejection stamps finished_at), then re-read.
    runs.transition(session, run_id, None, RunState.approved if approve else RunState.rejected,
                    release=False)
    session.refresh(run)
    if not approve and run.candidate_version_id:
        version = repo.get_row(session, AdapterVersion, run.candidate_version_id)
        version.status = VersionStatus.failed.value
        version.failure_reason = f"rejected by {actor}: {reason or 'no reason given'}"
    repo.audit(session, tenant_id=run.tenant_id, actor=actor,
               action="run.approved" if approve else "run.rejected", target_type="run",
               target_id=str(run_id), reason=reason)
    session.flush()
    return run
