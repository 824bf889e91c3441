"""Waiting on runs in the database."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import select

from service.db.models import Adapter, TrainingRun


def runs_of(db_sessions, tenant: str, alias: str) -> list[TrainingRun]:
    with db_sessions() as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        return list(s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id)
                              .order_by(TrainingRun.created_at)))


def wait_run(db_sessions, run_id: uuid.UUID, states: set[str], timeout: float = 300,
             log=None) -> TrainingRun:
    """Poll the run until it is in one of `states`; fail with its last state and reason."""
    deadline = time.monotonic() + timeout
    run = None
    while time.monotonic() < deadline:
        with db_sessions() as s:
            run = s.get(TrainingRun, run_id)
        if run.state in states:
            return run
        if run.state == "failed" and "failed" not in states:
            raise AssertionError(f"run failed: {run.failure_reason}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"run stayed {run.state if run else None} "
                         f"(progress {run.progress if run else None}):\n{tail}")


def wait_first_run(db_sessions, tenant: str, alias: str, timeout: float = 10) -> TrainingRun:
    """The alias's only run, once the API's debounced trigger has created it."""
    deadline = time.monotonic() + timeout
    while True:
        found = runs_of(db_sessions, tenant, alias)
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"expected exactly one run, found {len(found)}"
            return found[0]
        time.sleep(0.2)
