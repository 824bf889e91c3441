"""Training runs in Postgres: the worker lease and every write to a run row.

This module is the one writer of training_runs rows once they exist: claims and lease renewals,
state transitions (finished_at stamped on entering a finished state), dataset stats, method,
and the JSON sections stages add to a run. Runs are created by the trigger (service/domain/trigger.py,
one exactly-once statement) and by an adapter import (service/domain/adapter_import.py).

Postgres is the only source of truth. Celery messages only wake workers, and a lease makes a
duplicate delivery find nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from service.db.models import RunState, TrainingRun

# Entering one of these stamps finished_at (once): the run's work is over, whatever follows.
FINISHED_STATES = (RunState.rejected, RunState.failed, RunState.live, RunState.superseded,
                   RunState.rolled_back)

# JSON columns that several stages write a part of (metrics: quantization, training, gate,
# golden, deploy; progress: the trainer's report, deployed_at, the watch's close; verdict: the
# gate's, then the watch's): a write merges its top-level keys into what the run holds, so no
# stage erases another's. Any other column, dataset_stats included, is set whole; renew
# replaces progress with the trainer's latest report (training writes progress first).
MERGED_JSON = ("metrics", "progress", "verdict")
_COLUMNS = frozenset(c.name for c in TrainingRun.__table__.columns)


@dataclass(frozen=True)
class Claim:
    run_id: uuid.UUID
    state: str
    attempts: int
    owner: str


# A run is claimable when nobody holds a live lease on it. The state is not changed here:
# the step that runs decides the transition.
_CLAIM = text("""
UPDATE training_runs
SET lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :lease_s),
    attempts = attempts + 1, started_at = coalesce(started_at, now()), updated_at = now()
WHERE id = :run_id AND state = ANY(:states)
  AND (lease_owner IS NULL OR lease_expires_at < now())
RETURNING id, state, attempts
""")


def claim(session: Session, run_id: uuid.UUID, owner: str, lease_s: float,
          states: tuple[str, ...]) -> Claim | None:
    """Take the run's lease; None when another worker holds it or it is not in `states`."""
    row = session.execute(_CLAIM, {"run_id": run_id, "owner": owner, "lease_s": lease_s,
                                   "states": list(states)}).first()
    return Claim(row.id, row.state, row.attempts, owner) if row else None


def renew(session: Session, run_id: uuid.UUID, owner: str, lease_s: float,
          progress: dict | None = None) -> bool:
    """Extend the lease (and store the trainer's latest progress report, replacing the last:
    training is the first stage to write progress); False when the lease was lost."""
    row = session.execute(text("""
        UPDATE training_runs
        SET lease_expires_at = now() + make_interval(secs => :lease_s), updated_at = now(),
            progress = CASE WHEN CAST(:progress AS jsonb) IS NULL THEN progress
                            ELSE CAST(:progress AS jsonb) END
        WHERE id = :run_id AND lease_owner = :owner RETURNING id
    """), {"run_id": run_id, "owner": owner, "lease_s": lease_s,
           "progress": None if progress is None else to_json(progress)}).first()
    return row is not None


def _assignments(fields: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """SET clauses for fields (their values added to params): a dict for a MERGED_JSON column
    merges its keys into the column, other dicts and lists are stored as JSON, the rest as is."""
    sets = []
    for name, value in fields.items():
        if name not in _COLUMNS:  # names become SQL: only the table's own columns get through
            raise ValueError(f"training_runs has no column {name!r}")
        params[name] = to_json(value) if isinstance(value, (dict, list)) else value
        if isinstance(value, dict) and name in MERGED_JSON:
            sets.append(f"{name} = coalesce({name}, '{{}}'::jsonb) || CAST(:{name} AS jsonb)")
        elif isinstance(value, (dict, list)):
            sets.append(f"{name} = CAST(:{name} AS jsonb)")
        else:
            sets.append(f"{name} = :{name}")
    return sets


def transition(session: Session, run_id: uuid.UUID, owner: str | None, to: RunState, *,
               release: bool = True, **fields: Any) -> bool:
    """Move the run to a new state (only while holding its lease when owner is given), writing
    fields with it (see update); release=False keeps the lease for the work that follows."""
    sets = ["state = :to", "updated_at = now()"]
    params: dict[str, Any] = {"run_id": run_id, "to": to.value, "owner": owner}
    if release:
        sets += ["lease_owner = NULL", "lease_expires_at = NULL"]
    if to in FINISHED_STATES:
        sets.append("finished_at = coalesce(finished_at, now())")
    sets += _assignments(fields, params)
    where = "id = :run_id" + (" AND lease_owner = :owner" if owner else "")
    row = session.execute(text(f"UPDATE training_runs SET {', '.join(sets)} WHERE {where} RETURNING id"),
                          params).first()
    return row is not None


def update(session: Session, run_id: uuid.UUID, *, owner: str | None = None, **fields: Any) -> bool:
    """Write fields of a run without moving it (only while holding its lease when owner is
    given): metrics, progress and verdict merge their keys into what the run holds; dataset_stats,
    method and the other columns are set. False when no run matched."""
    params: dict[str, Any] = {"run_id": run_id, "owner": owner}
    sets = _assignments(fields, params)
    where = "id = :run_id" + (" AND lease_owner = :owner" if owner else "")
    row = session.execute(text(f"UPDATE training_runs SET {', '.join(sets)} WHERE {where} RETURNING id"),
                          params).first()
    return row is not None


def supersede_others(session: Session, adapter_id: uuid.UUID, keep_run: uuid.UUID) -> None:
    """The adapter's other live or canary runs are superseded by keep_run (just promoted)."""
    session.execute(text("""
        UPDATE training_runs SET state = :to, updated_at = now(),
                                 finished_at = coalesce(finished_at, now())
        WHERE adapter_id = :a AND state IN ('live', 'canary') AND id <> :keep
    """), {"to": RunState.superseded.value, "a": adapter_id, "keep": keep_run})


def claimable_runs(session: Session, states: tuple[str, ...], limit: int = 100) -> list[uuid.UUID]:
    """Runs in `states` that no worker holds: what the sweeper re-enqueues."""
    rows = session.execute(text("""
        SELECT id FROM training_runs
        WHERE state = ANY(:states) AND (lease_owner IS NULL OR lease_expires_at < now())
        ORDER BY created_at LIMIT :limit
    """), {"states": list(states), "limit": limit})
    return [r.id for r in rows]


def to_json(value: Any) -> str:
    """value as JSON text for a jsonb parameter (UUIDs and datetimes as strings)."""
    def default(o: Any) -> Any:
        if isinstance(o, (uuid.UUID, datetime)):
            return str(o)
        raise TypeError(type(o).__name__)

    return json.dumps(value, default=default)


# What of a run's trainer_job the API and the ops page show: not its directory, pid or boot id.
_JOB_PUBLIC = ("backend", "attempt", "restarts", "host", "submitted_at", "previous_end")


def job_summary(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The public part of a run's training job reference (None before training started)."""
    if not job:
        return None
    return {k: job[k] for k in _JOB_PUBLIC if k in job}

