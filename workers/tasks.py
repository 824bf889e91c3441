"""Thin Celery tasks: take an id, call one domain function. Safe to deliver twice."""

from __future__ import annotations

import uuid

from service import wakeup
from service.local.embedded import resolve_broker_url
from workers import judge as judge_sweep
from workers import pipeline
from workers.celery_app import app
from workers.context import context
from workers.stages import export as export_stage
from workers.stages import watch as watch_stage


def _taken(what: str, ident: str) -> None:
    wakeup.taken(resolve_broker_url(context().settings), what, ident)


@app.task(name="flywheel.advance_run")
def advance_run(run_id: str) -> str:
    """Claim the run and perform its next step (duplicate deliveries find nothing to claim)."""
    _taken(wakeup.RUN, run_id)
    return pipeline.advance(context(), uuid.UUID(run_id))


@app.task(name="flywheel.export_version")
def export_version(export_id: str) -> str:
    """Build and gate one export (duplicate deliveries find nothing to claim)."""
    _taken(wakeup.EXPORT, export_id)
    return export_stage.run_job(context(), uuid.UUID(export_id))


@app.task(name="flywheel.sweep")
def sweep() -> dict:
    """Re-check triggers; re-enqueue unclaimed runs and exports (lost wake-ups, Redis outages)."""
    return pipeline.sweep(context())


@app.task(name="flywheel.watch")
def watch() -> list:
    """Judge promoted and canary versions against their predecessors; roll back when worse."""
    return watch_stage.watch_all(context())


@app.task(name="flywheel.judge")
def judge() -> list:
    """Rate a sample of unrated answers for aliases whose policy names an AI judge."""
    return judge_sweep.sweep_all(context())
