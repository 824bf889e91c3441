"""Training runs in Postgres: the exactly-once trigger, the worker lease, and state transitions.

Postgres is the only source of truth. The partial unique index uq_training_runs_one_active allows
one active run per adapter, so concurrent feedback from any number of API processes creates one
run; Celery messages only wake workers, and a lease makes a duplicate delivery find nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_RUN_STATES, RunState
from service.policy import Policy

_ACTIVE = ", ".join(f"'{s.value}'" for s in ACTIVE_RUN_STATES)

# One statement: count new feedback above the watermark, create the run if the policy says so,
# and advance the watermark in the same transaction. ON CONFLICT on the partial unique index
# makes a racing second insert a no-op.
_TRIGGER = text(f"""
WITH a AS (
    -- While a run is active nothing can be created: skip the count (it grows with the backlog).
    SELECT id, tenant_id, feedback_watermark, serving_version_id FROM adapters
    WHERE id = :adapter_id AND NOT EXISTS (
        SELECT 1 FROM training_runs r WHERE r.adapter_id = :adapter_id AND r.state IN ({_ACTIVE}))
), stats AS (
    SELECT count(*) AS n,
           count(*) FILTER (WHERE f.rating = 'up') AS ups,
           count(*) FILTER (WHERE f.rating = 'down') AS downs,
           count(*) FILTER (WHERE f.correction IS NOT NULL) AS corrections,
           max(f.seq) AS hi,
           min(f.created_at) AS oldest
    FROM feedback f, a WHERE f.adapter_id = a.id AND f.seq > a.feedback_watermark
      AND (f.source = 'human' OR :judge_counts)
), created AS (
    INSERT INTO training_runs (id, tenant_id, adapter_id, state, trigger, policy, feedback_seq_from,
                               feedback_seq_to, parent_version_id, attempts, progress,
                               dataset_stats, metrics, verdict, created_at, updated_at)
    SELECT :run_id, a.tenant_id, a.id, 'pending',
           jsonb_build_object('reason', CASE WHEN s.n >= :threshold THEN 'threshold' ELSE 'interval' END,
                              'new_ratings', s.n, 'ups', s.ups, 'downs', s.downs,
                              'corrections', s.corrections, 'threshold', :threshold),
           CAST(:policy AS jsonb), a.feedback_watermark, s.hi, a.serving_version_id, 0,
           '{{}}'::jsonb, '{{}}'::jsonb, '{{}}'::jsonb, '{{}}'::jsonb, now(), now()
    FROM a, stats s
    WHERE s.n > 0 AND s.ups >= :min_up AND s.downs >= :min_down
      AND (s.n >= :threshold
           OR (CAST(:interval_s AS float8) IS NOT NULL AND s.n >= :min_for_interval
               AND s.oldest < now() - make_interval(secs => CAST(:interval_s AS float8))))
    ON CONFLICT (adapter_id) WHERE state IN ({_ACTIVE}) DO NOTHING
    RETURNING id, feedback_seq_to
), moved AS (
    UPDATE adapters SET feedback_watermark = c.feedback_seq_to FROM created c
    WHERE adapters.id = :adapter_id RETURNING adapters.id
)
SELECT c.id FROM created c LEFT JOIN moved m ON true
""")


def _trigger_params(adapter_id: uuid.UUID, policy: Policy) -> dict[str, Any]:
    t = policy.trigger
    return {
        "adapter_id": adapter_id, "run_id": uuid.uuid4(), "threshold": t.min_new_ratings,
        "min_up": t.min_up, "min_down": t.min_down,
        "interval_s": t.max_interval_minutes * 60 if t.max_interval_minutes else None,
        "min_for_interval": t.min_ratings_for_interval, "policy": policy.model_dump_json(),
        # The judge's ratings ride along in the run the humans' start unless the policy says.
        "judge_counts": policy.judge.counts_toward_trigger,
    }


async def maybe_trigger_async(session: AsyncSession, adapter_id: uuid.UUID, policy: Policy
                              ) -> uuid.UUID | None:
    """Create a pending run if the adapter's new feedback crosses its policy; its id, else None."""
    return (await session.execute(_TRIGGER, _trigger_params(adapter_id, policy))).scalar()


def maybe_trigger(session: Session, adapter_id: uuid.UUID, policy: Policy) -> uuid.UUID | None:
    """Sync twin of maybe_trigger_async, for the sweeper."""
    return session.execute(_TRIGGER, _trigger_params(adapter_id, policy)).scalar()


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
    """Extend the lease (and store progress); False when the lease was lost to another worker."""
    row = session.execute(text("""
        UPDATE training_runs
        SET lease_expires_at = now() + make_interval(secs => :lease_s), updated_at = now(),
            progress = CASE WHEN CAST(:progress AS jsonb) IS NULL THEN progress
                            ELSE CAST(:progress AS jsonb) END
        WHERE id = :run_id AND lease_owner = :owner RETURNING id
    """), {"run_id": run_id, "owner": owner, "lease_s": lease_s,
           "progress": None if progress is None else _json(progress)}).first()
    return row is not None


def transition(session: Session, run_id: uuid.UUID, owner: str | None, to: RunState, *,
               release: bool = True, **fields: Any) -> bool:
    """Move the run to a new state (only while holding its lease when owner is given)."""
    sets = ["state = :to", "updated_at = now()"]
    params: dict[str, Any] = {"run_id": run_id, "to": to.value, "owner": owner}
    if release:
        sets += ["lease_owner = NULL", "lease_expires_at = NULL"]
    if to in (RunState.rejected, RunState.failed, RunState.live, RunState.superseded,
              RunState.rolled_back):
        sets.append("finished_at = coalesce(finished_at, now())")
    for name, value in fields.items():
        is_json = isinstance(value, (dict, list))
        sets.append(f"{name} = CAST(:{name} AS jsonb)" if is_json else f"{name} = :{name}")
        params[name] = _json(value) if is_json else value
    where = "id = :run_id" + (" AND lease_owner = :owner" if owner else "")
    row = session.execute(text(f"UPDATE training_runs SET {', '.join(sets)} WHERE {where} RETURNING id"),
                          params).first()
    return row is not None


def claimable_runs(session: Session, states: tuple[str, ...], limit: int = 100) -> list[uuid.UUID]:
    """Runs in `states` that no worker holds: what the sweeper re-enqueues."""
    rows = session.execute(text("""
        SELECT id FROM training_runs
        WHERE state = ANY(:states) AND (lease_owner IS NULL OR lease_expires_at < now())
        ORDER BY created_at LIMIT :limit
    """), {"states": list(states), "limit": limit})
    return [r.id for r in rows]


def _json(value: Any) -> str:
    import json

    def default(o: Any) -> Any:
        if isinstance(o, (uuid.UUID, datetime)):
            return str(o)
        raise TypeError(type(o).__name__)

    return json.dumps(value, default=default)
