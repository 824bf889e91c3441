"""The trigger: when an alias's new feedback starts a training run.

The rule is one SQL statement: count the feedback above the adapter's watermark, create a
pending run when the alias's policy says so, and advance the watermark, in one transaction. The
partial unique index uq_training_runs_one_active allows one active run per adapter, so any
number of API processes, sweepers and imports racing create one run: exactly-once comes from the
database, not from who checks.

Who checks, all through this module:
- the API: feedback marks its adapter, and a debounce loop (Debounce) checks the marked adapters
  every FLYWHEEL_TRIGGER_DEBOUNCE_S and wakes a worker for each run created;
- the workers' sweeper (sweep): every adapter, every round, which catches what the API missed
  (a crash between a rating and its check) and an interval trigger with no new rating;
- a feedback import, once at its end (service/imports/store.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ACTIVE_RUN_STATES, Adapter
from service.db.session import session_scope
from service.domain.policy import Policy, PolicyStore
from service.wakeup import wake_run

log = logging.getLogger(__name__)

_ACTIVE = ", ".join(f"'{s.value}'" for s in ACTIVE_RUN_STATES)

# ON CONFLICT on the partial unique index makes a racing second insert a no-op.
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


def _params(adapter_id: uuid.UUID, policy: Policy) -> dict[str, Any]:
    """The policy's trigger section as the statement's parameters."""
    t = policy.trigger
    return {
        "adapter_id": adapter_id, "run_id": uuid.uuid4(), "threshold": t.min_new_ratings,
        "min_up": t.min_up, "min_down": t.min_down,
        "interval_s": t.max_interval_minutes * 60 if t.max_interval_minutes else None,
        "min_for_interval": t.min_ratings_for_interval, "policy": policy.model_dump_json(),
        # The judge's ratings ride along in the run the humans' start unless the policy says.
        "judge_counts": policy.judge.counts_toward_trigger,
    }


def start_run_if_due(session: Session, adapter_id: uuid.UUID, policy: Policy) -> uuid.UUID | None:
    """Create a pending run if the adapter's new feedback crosses its policy; its id, else None."""
    return session.execute(_TRIGGER, _params(adapter_id, policy)).scalar()


async def start_run_if_due_async(session: AsyncSession, adapter_id: uuid.UUID, policy: Policy
                                 ) -> uuid.UUID | None:
    """start_run_if_due on an async session (the API)."""
    return (await session.execute(_TRIGGER, _params(adapter_id, policy))).scalar()


def sweep(sessions: sessionmaker, policies: PolicyStore) -> int:
    """The sweeper's pass: check every adapter, one transaction each; returns the runs created
    (the sweeper wakes them with every other unclaimed run)."""
    with session_scope(sessions) as s:
        adapters = list(s.execute(select(Adapter.id, Adapter.alias, Adapter.tenant_id)))
    created = 0
    for adapter_id, alias, tenant_id in adapters:
        policy = policies.for_alias(alias, tenant_id)
        with session_scope(sessions) as s:
            if start_run_if_due(s, adapter_id, policy):
                created += 1
    return created


@dataclass
class Debounce:
    """The API's side: feedback marks its adapter (mark), and check() runs the rule once per
    marked adapter, every interval_s while run() loops. A check that fails leaves its adapter
    marked for the next round; the sweeper catches what a crashed process never checked."""

    sessions: async_sessionmaker
    policies: PolicyStore
    broker_url: str
    interval_s: float
    # True while the database is unreachable: adapters stay marked until it answers again.
    paused: Callable[[], bool] = lambda: False
    # Adapters with new feedback since the last check: id -> (alias, tenant).
    marked: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)

    def mark(self, adapter_id: uuid.UUID, alias: str, tenant_id: str) -> None:
        """Note new feedback; the adapter is checked within interval_s."""
        self.marked[adapter_id] = (alias, tenant_id)

    async def check(self) -> int:
        """Run the rule for every marked adapter; wake a worker per run created."""
        if self.paused():
            return 0
        batch, self.marked = self.marked, {}
        created = 0
        for adapter_id, (alias, tenant_id) in batch.items():
            try:
                policy = self.policies.for_alias(alias, tenant_id)
                async with self.sessions() as session, session.begin():
                    run_id = await start_run_if_due_async(session, adapter_id, policy)
            except Exception as exc:  # noqa: BLE001 - retried on the next feedback or sweep
                log.warning("trigger check for %s failed: %s", alias, type(exc).__name__)
                self.marked.setdefault(adapter_id, (alias, tenant_id))
                continue
            if run_id is not None:
                created += 1
                log.info("feedback crossed the threshold of %s: run %s created", alias, run_id)
                await asyncio.to_thread(wake_run, self.broker_url, run_id)
        return created

    async def run(self) -> None:
        """Background task: check the marked adapters every interval_s."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self.marked:
                await self.check()

    async def flush(self) -> None:
        """Check what is still marked (at shutdown)."""
        if self.marked:
            await self.check()
